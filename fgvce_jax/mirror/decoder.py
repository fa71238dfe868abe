"""Mirror-CFE's decoder G (SPEC 8, issue 12): a feature map Z_k at split ``layer4`` back to an image, with
skip features from the source image's earlier stages edited only inside a class-activation-map prior (CSP).

Notation. x (N, S, S, 3) is an image in the classifier's normalised input space; Z (N, H, W, D) its feature
map at ``layer4``; e_1..e_3 the outputs of the ResNet's layer1..layer3 for the *source* image (the skips,
(N, H_j, W_j, D_j)); the head is g(Z) = mean_hw(Z) @ W + b with W (D, C).

Class-activation-map prior (CSP). For class c and a path point Z_k,

    U_c = ReLU(Z_k @ W[:, c])  (N, H, W),   Û_c = U_c / max_hw U_c   (max-normalised per image),
    mask = (Û_s > rho) | (Û_t > rho),        rho = clip(1 - k, rho_lo, rho_hi),

so near the source (k = 0) only the strongest evidence of s or t may change, and the region grows towards
the mirror image (k = 1). The mask is resized to each skip's resolution (nearest neighbour).

Decoder (our reading: the paper's layer layout is not primary). h = ReLU(conv(Z_k)); then, for the skips
from the deepest (layer3) to the shallowest (layer1): h is resized (bilinear) to the skip's resolution, the
editor proposes an edit from (e_j, h), the skip becomes e_j + mask_j * edit_j (unchanged outside the mask)
and h = ReLU(conv([h, e_j'])). Finally h is resized to S x S and a 3x3 conv gives the image. With
``prior=False`` (the ablation) the mask is all ones: the editor may change the skips everywhere.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fgvce_jax.errors import FgvceError

SKIP_STAGES = ("layer1", "layer2", "layer3")
EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The decoder's architecture and prior. rho_lo, rho_hi bound the CSP threshold (our reading: 0.2, 0.8);
    ``prior=False`` is the no-spatial-prior ablation; ``width`` is the decoder's channel width."""

    width: int = 32
    rho_lo: float = 0.2
    rho_hi: float = 0.8
    prior: bool = True

    def validate(self) -> None:
        if self.width < 1:
            raise FgvceError(f"the decoder width must be >= 1, got {self.width}")
        if not 0 <= self.rho_lo <= self.rho_hi <= 1:
            raise FgvceError(f"the prior needs 0 <= rho_lo <= rho_hi <= 1, got {self.rho_lo}, {self.rho_hi}")


def source_stages(split_model, params, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """A ResNet split at ``layer4``: images x (N, S, S, 3) -> (Z (N, H, W, D), (e_1, e_2, e_3)), e_j the output
    of layer j (N, H_j, W_j, D_j). Z equals ``split_model.encode(params, x)[0]`` (the model runs the same
    units in the same order; the test checks it)."""
    if split_model.family != "resnet" or split_model.at != "layer4":
        raise FgvceError(f"the Mirror-CFE decoder needs a ResNet split at 'layer4', got {split_model.arch} split "
                         f"at {split_model.at!r}")
    module = split_model.module(params)
    h = module._stem(x)
    skips = []
    for name in (*SKIP_STAGES, "layer4"):
        for block in getattr(module, name):
            h = block(h)
        skips.append(h)
    return skips[-1], tuple(skips[:-1])


def cam(W: jax.Array, z: jax.Array, c: jax.Array) -> jax.Array:
    """Max-normalised class activation map Û_c = ReLU(Z @ W[:, c]) / max_hw: W (D, C), z (N, H, W, D),
    c (N,) int -> (N, H, W) in [0, 1] (all zeros where U_c is zero everywhere)."""
    u = jax.nn.relu(jnp.einsum("nhwd,dn->nhw", z, W[:, c]))
    return u / jnp.maximum(u.max((1, 2), keepdims=True), EPS)


def threshold(k: jax.Array, config: DecoderConfig) -> jax.Array:
    """rho = clip(1 - k, rho_lo, rho_hi): k (N,) -> (N,)."""
    return jnp.clip(1 - k, config.rho_lo, config.rho_hi)


def csp_mask(W: jax.Array, z: jax.Array, s: jax.Array, t: jax.Array, k: jax.Array,
             config: DecoderConfig) -> jax.Array:
    """The CSP mask (Û_s > rho) | (Û_t > rho) on Z_k: z (N, H, W, D), s, t (N,) int, k (N,) -> (N, H, W) bool;
    all True with ``config.prior`` off (the ablation)."""
    if not config.prior:
        return jnp.ones(z.shape[:3], bool)
    rho = threshold(k, config)[:, None, None]
    return (cam(W, z, s) > rho) | (cam(W, z, t) > rho)


def resize_mask(mask: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of a mask (N, H, W) -> (N, h, w) float32 (1 inside)."""
    return jax.image.resize(mask.astype(jnp.float32), (mask.shape[0], *hw), "nearest")


def _resize(h: jax.Array, hw: tuple[int, int]) -> jax.Array:
    return h if h.shape[1:3] == tuple(hw) else jax.image.resize(h, (h.shape[0], *hw, h.shape[-1]), "bilinear")


class Decoder(nnx.Module):
    """G: (Z_k (N, H, W, D), skips ((N, H_j, W_j, D_j) for layer1..3), mask (N, H, W)) -> image (N, S, S, 3).

    Args:
      z_dim: D. skip_dims: (D_1, D_2, D_3). image_size: S. width: the channels of h. rngs: initialisation.
    """

    def __init__(self, z_dim: int, skip_dims: tuple[int, ...], image_size: int, width: int, *, rngs: nnx.Rngs):
        self.image_size = image_size
        conv = lambda cin, cout: nnx.Conv(cin, cout, (3, 3), rngs=rngs)  # noqa: E731
        self.inp = conv(z_dim, width)
        # the editor: two 3x3 convs from (e_j, h) to an edit of e_j; deepest skip first
        self.edit_in = nnx.List([conv(d + width, width) for d in reversed(skip_dims)])
        self.edit_out = nnx.List([conv(width, d) for d in reversed(skip_dims)])
        self.fuse = nnx.List([conv(width + d, width) for d in reversed(skip_dims)])
        self.out = conv(width, 3)

    def __call__(self, z: jax.Array, skips: tuple[jax.Array, ...], mask: jax.Array) -> jax.Array:
        h = nnx.relu(self.inp(z))
        for e, edit_in, edit_out, fuse in zip(reversed(skips), self.edit_in, self.edit_out, self.fuse):
            h = _resize(h, e.shape[1:3])
            edit = edit_out(nnx.relu(edit_in(jnp.concatenate([e, h], -1))))
            e = e + resize_mask(mask, e.shape[1:3])[..., None] * edit
            h = nnx.relu(fuse(jnp.concatenate([h, e], -1)))
        return self.out(_resize(h, (self.image_size, self.image_size)))


def build(split_model, params, image_size: int, config: DecoderConfig, seed: int = 0) -> Decoder:
    """A fresh decoder for ``split_model`` (a ResNet at ``layer4``) and images of side ``image_size``."""
    config.validate()
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    z, skips = jax.eval_shape(lambda a: source_stages(split_model, params, a), x)
    return Decoder(z.shape[-1], tuple(e.shape[-1] for e in skips), image_size, config.width, rngs=nnx.Rngs(seed))


def decode(graphdef: nnx.GraphDef, weights, config: DecoderConfig, W: jax.Array, z: jax.Array,
           skips: tuple[jax.Array, ...], s: jax.Array, t: jax.Array, k: jax.Array) -> jax.Array:
    """G(Z_k) with the CSP mask of (s, t, k): z (N, H, W, D), skips of the source, s, t (N,) int, k (N,)
    -> images (N, S, S, 3). Pure; ``graphdef``/``weights`` from ``nnx.split(decoder)``."""
    return nnx.merge(graphdef, weights)(z, skips, csp_mask(W, z, s, t, k, config))
