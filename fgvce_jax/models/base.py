"""The interface every classifier port implements: a split into features f and head g (SPEC 1)."""
from __future__ import annotations

import jax
from flax import nnx

from fgvce_jax.errors import FgvceError


class Classifier(nnx.Module):
    """Base class: ``logits = head(*encode(x, at), at=at)`` for each named split point.

    Subclasses set ``family``, ``arch``, ``num_classes``, ``split_points`` (the
    first is the default) and implement ``encode`` and ``head``.
    """

    family: str = ""
    split_points: tuple[str, ...] = ()

    @property
    def default_split(self) -> str:
        return self.split_points[0]

    def resolve_split(self, at: str | None) -> str:
        """``at`` or the default split; an unknown name is an FgvceError listing the valid ones."""
        if at is None:
            return self.default_split
        if at not in self.split_points:
            raise FgvceError(f"unknown split point {at!r} for {self.arch}; choose one of {', '.join(self.split_points)}")
        return at

    def encode(self, x: jax.Array, at: str | None = None) -> tuple[jax.Array, dict]:
        """Images (N,H,W,3) -> (z (N,H',W',D), ctx dict of per-image arrays the head needs)."""
        raise NotImplementedError

    def head(self, z: jax.Array, ctx: dict | None = None, at: str | None = None, token_mask=None) -> jax.Array:
        """Feature map z (N,H',W',D) -> logits (N,C)."""
        raise NotImplementedError

    def features(self, x: jax.Array, at: str | None = None) -> jax.Array:
        """The feature map z (N,H',W',D) at split ``at`` (= ``encode(x, at)[0]``)."""
        return self.encode(x, at)[0]

    def __call__(self, x: jax.Array) -> jax.Array:
        """Images (N,H,W,3), preprocessed -> logits (N,C)."""
        at = self.default_split
        z, ctx = self.encode(x, at)
        return self.head(z, ctx, at=at)

    def linear_head(self, at: str | None = None):
        """(W (D,C), b (C,)) when g = global-average-pool + linear at split ``at``, else None."""
        self.resolve_split(at)
        return None
