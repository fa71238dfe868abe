"""A functional, hashable view of a model cut at a split point: f = ``encode``, g = ``head`` (SPEC 1).

``split(model, at)`` returns ``(SplitModel, params)``. ``SplitModel`` holds only
the static graph definition and names, so it can be a static argument of
``jax.jit``; ``params`` is the pytree of every variable (parameters and
BatchNorm statistics). Its methods are pure functions of ``(params, arrays)``:
jitting them and calling again with new images or new params of the same
shapes does not recompile.

Example::

    sm, params = split(create("resnet_tiny", 10), at="layer4")
    z, ctx = jax.jit(sm.encode)(params, images)          # (N, 8, 8, 128), {}
    logits = jax.jit(sm.head)(params, z, ctx)            # (N, 10)
"""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """Static description of a model split at ``at``; all methods take ``params`` first."""

    graphdef: nnx.GraphDef
    at: str
    arch: str
    family: str
    num_classes: int

    def module(self, params) -> nnx.Module:
        """The NNX module with ``params`` (works on tracers inside jit)."""
        return nnx.merge(self.graphdef, params)

    def encode(self, params, images: jax.Array) -> tuple[jax.Array, dict]:
        """Images (N,H,W,3) -> (z (N,H',W',D), ctx): f of SPEC 1."""
        return self.module(params).encode(images, at=self.at)

    def head(self, params, z: jax.Array, ctx: dict | None = None, token_mask: jax.Array | None = None) -> jax.Array:
        """z (N,H',W',D) (+ ctx) -> logits (N,C): g of SPEC 1. ``token_mask`` (N,H',W') bool, ViT only."""
        return self.module(params).head(z, ctx, at=self.at, token_mask=token_mask)

    def logits(self, params, images: jax.Array) -> jax.Array:
        """Images (N,H,W,3) -> logits (N,C) = head(encode(images))."""
        z, ctx = self.encode(params, images)
        return self.head(params, z, ctx)

    def linear_head(self, params):
        """(W (D,C), b (C,)) with ``head(z) == mean_hw(z) @ W + b`` when g is GAP + linear, else None."""
        return self.module(params).linear_head(at=self.at)

    def conv_head(self, params):
        """(blocks, fc) with ``head(z) == fc(mean_hw(blocks(z)))`` for a residual head (``ResNet.conv_head``);
        None for any other model or split. Each block has ``prefix``, ``shortcut``, ``body`` and ``convs``."""
        make = getattr(self.module(params), "conv_head", None)
        return None if make is None else make(at=self.at)

    def last_block_cache(self, params, z: jax.Array, ctx: dict):
        """ViT split at its last block: per-image attention scores and values (``ViT.last_block_cache``);
        None for any other model or split (no last-block fast path there)."""
        module = self.module(params)
        if getattr(module, "last_block", None) != self.at:
            return None
        return module.last_block_cache(z, ctx, at=self.at)

    def last_block_logits(self, params, cache, token_mask: jax.Array) -> jax.Array:
        """ViT at its last block only: logits with absent tokens masked, see ``ViT.last_block_logits``."""
        return self.module(params).last_block_logits(cache, token_mask)


def split(model: nnx.Module, at: str | None = None) -> tuple[SplitModel, nnx.State]:
    """Cut ``model`` at split point ``at`` (None: its default) in eval mode.

    Returns ``(SplitModel, params)``; ``model`` itself is not modified.
    """
    at = model.resolve_split(at)
    graphdef, params = nnx.split(model)
    copy = nnx.merge(graphdef, params)  # eval() on a copy, so the caller's train/eval mode is kept
    copy.eval()
    graphdef, params = nnx.split(copy)
    return SplitModel(graphdef, at, model.arch, model.family, model.num_classes), params
