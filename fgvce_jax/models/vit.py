"""Vision Transformers ViT-B/16, B/32, L/16 (torchvision structure) as Flax NNX modules.

Split points ``block{i}`` (SPEC 1): Z is the grid of patch tokens entering
encoder block i, (N, S/p, S/p, D), and ``ctx = {"cls": (N, D)}`` is the class
token entering the same block. g = blocks i.. + final LayerNorm + head on the
class token. The default is the last block.

Attention masking (the ``attention`` baseline): ``head(z, ctx, token_mask=m)``
with m (N, H', W') bool drops the absent patch tokens as keys in every
remaining block (the class token is always present).

Last-block fast path (SPEC 2): at the last block only the class token's
attention row reaches the logits, so ``last_block_cache`` computes the
class-token query's scores against every token and the values once per image,
and ``last_block_logits`` evaluates any number of masks from the cache:

    a = softmax_s(q_cls . k_s / sqrt(d_h) + log m_s),  y = cls + W_o (a . v) + b_o,
    logits = head(LN(y + MLP(LN_2(y)))).

Layout: ``encoder.layers[i]`` is torchvision's ``encoder.layers.encoder_layer_i``;
``mlp`` is an ``nnx.List`` with torchvision's indices (0 and 3 are the Linears);
``self_attention.{query,key,value}`` are the thirds of ``in_proj``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fgvce_jax.errors import FgvceError
from fgvce_jax.models.base import Classifier

LN_EPS = 1e-6


def _layer_norm(d: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)


def _with_cls(token_mask: jax.Array) -> jax.Array:
    """(..., H', W') bool -> (..., 1 + H'W') bool, the class token first and always present."""
    flat = token_mask.reshape(*token_mask.shape[:-2], -1).astype(bool)
    return jnp.concatenate([jnp.ones((*flat.shape[:-1], 1), bool), flat], axis=-1)


def _masked_softmax(scores: jax.Array, keep: jax.Array | None) -> jax.Array:
    """Softmax over the last axis (keys) with absent keys (keep False) removed."""
    if keep is not None:
        scores = jnp.where(keep, scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)


class SelfAttention(nnx.Module):
    """torchvision's nn.MultiheadAttention(D, heads) used as self-attention, in_proj split into q/k/v."""

    def __init__(self, d: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.query = nnx.Linear(d, d, rngs=rngs)
        self.key = nnx.Linear(d, d, rngs=rngs)
        self.value = nnx.Linear(d, d, rngs=rngs)
        self.out_proj = nnx.Linear(d, d, rngs=rngs)

    def heads(self, x: jax.Array) -> jax.Array:
        """(..., D) -> (..., heads, D / heads)."""
        return x.reshape(*x.shape[:-1], self.num_heads, -1)

    def __call__(self, x: jax.Array, keep: jax.Array | None = None) -> jax.Array:
        """x (N,S,D), keep (N,S) bool or None -> (N,S,D)."""
        q, k, v = (self.heads(f(x)) for f in (self.query, self.key, self.value))
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        a = _masked_softmax(scores, None if keep is None else keep[:, None, None, :])
        out = jnp.einsum("nhqk,nkhd->nqhd", a, v)
        return self.out_proj(out.reshape(*x.shape))


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(LN1 x), then y + MLP(LN2 y); MLP = Linear, exact GELU, Linear."""

    def __init__(self, d: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(d, rngs)
        self.self_attention = SelfAttention(d, num_heads, rngs=rngs)
        self.ln_2 = _layer_norm(d, rngs)
        self.mlp = nnx.List([nnx.Linear(d, mlp_dim, rngs=rngs), None, None, nnx.Linear(mlp_dim, d, rngs=rngs)])

    def mlp_residual(self, y: jax.Array) -> jax.Array:
        """y + MLP(LN2 y), (..., D) -> (..., D)."""
        h = jax.nn.gelu(self.mlp[0](self.ln_2(y)), approximate=False)
        return y + self.mlp[3](h)

    def __call__(self, x: jax.Array, keep: jax.Array | None = None) -> jax.Array:
        """x (N,S,D), keep (N,S) bool or None -> (N,S,D)."""
        return self.mlp_residual(x + self.self_attention(self.ln_1(x), keep))


class Encoder(nnx.Module):
    """Position embedding (1, 1 + G*G, D), the blocks and the final LayerNorm."""

    def __init__(self, seq_len: int, d: int, num_layers: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.pos_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, seq_len, d)))
        self.layers = nnx.List([EncoderBlock(d, num_heads, mlp_dim, rngs=rngs) for _ in range(num_layers)])
        self.ln = _layer_norm(d, rngs)


class ViT(Classifier):
    """A torchvision VisionTransformer with a single linear head.

    Args:
      patch_size, num_layers, num_heads, hidden_dim, mlp_dim: torchvision's sizes.
      num_classes: C.
      arch: the name recorded in checkpoints.
      image_size: input side S (the position embedding has 1 + (S/p)^2 rows).
    """

    family = "vit"

    def __init__(self, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int,
                 num_classes: int, *, arch: str, image_size: int = 224, rngs: nnx.Rngs):
        if image_size % patch_size:
            raise FgvceError(f"image_size {image_size} is not a multiple of the patch size {patch_size}")
        self.arch = arch
        self.num_classes = num_classes
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.split_points = (f"block{num_layers - 1}", *(f"block{i}" for i in range(num_layers - 1)))
        self.class_token = nnx.Param(jnp.zeros((1, 1, hidden_dim)))
        self.conv_proj = nnx.Conv(3, hidden_dim, (patch_size, patch_size), (patch_size, patch_size),
                                  padding="VALID", rngs=rngs)
        self.encoder = Encoder(1 + self.grid**2, hidden_dim, num_layers, num_heads, mlp_dim, rngs=rngs)
        self.heads = nnx.Dict(head=nnx.Linear(hidden_dim, num_classes, rngs=rngs))

    @property
    def last_block(self) -> str:
        """The split whose head is the last block only (the default, and the fast path's split)."""
        return self.split_points[0]

    def _block_index(self, at: str | None) -> int:
        return int(self.resolve_split(at).removeprefix("block"))

    def _tokens(self, x: jax.Array) -> jax.Array:
        """Images (N,S,S,3) -> tokens (N, 1 + G*G, D): class token, patches row-major, plus pos-embedding."""
        if x.shape[1:3] != (self.image_size, self.image_size):
            raise FgvceError(f"{self.arch} expects {self.image_size}x{self.image_size} images, got {x.shape[1]}x{x.shape[2]}")
        p = self.conv_proj(x)
        p = p.reshape(p.shape[0], -1, p.shape[-1])
        cls = jnp.broadcast_to(self.class_token[...], (p.shape[0], 1, p.shape[-1]))
        return jnp.concatenate([cls, p], axis=1) + self.encoder.pos_embedding[...]

    def _logits(self, cls: jax.Array) -> jax.Array:
        """Class token leaving the last block (..., D) -> logits (..., C)."""
        return self.heads["head"](self.encoder.ln(cls))

    def encode(self, x: jax.Array, at: str | None = None) -> tuple[jax.Array, dict]:
        """Images (N,S,S,3) -> (patch tokens (N,G,G,D) entering block ``at``, {"cls": (N,D)})."""
        t = self._tokens(x)
        for block in self.encoder.layers[: self._block_index(at)]:
            t = block(t)
        n, _, d = t.shape
        return t[:, 1:].reshape(n, self.grid, self.grid, d), {"cls": t[:, 0]}

    def head(self, z: jax.Array, ctx: dict | None = None, at: str | None = None,
             token_mask: jax.Array | None = None) -> jax.Array:
        """Patch tokens z (N,G,G,D) + ctx["cls"] (N,D) -> logits (N,C).

        ``token_mask`` (N,G,G) bool: absent patch tokens are removed as keys in every remaining block.
        """
        if ctx is None or "cls" not in ctx:
            raise FgvceError("a ViT head needs ctx={'cls': class token}, as returned by encode")
        n, _, _, d = z.shape
        t = jnp.concatenate([ctx["cls"][:, None], z.reshape(n, -1, d)], axis=1)
        keep = None if token_mask is None else _with_cls(token_mask)
        for block in self.encoder.layers[self._block_index(at):]:
            t = block(t, keep)
        return self._logits(t[:, 0])

    def last_block_cache(self, z: jax.Array, ctx: dict, at: str | None = None) -> dict:
        """Per-image quantities of the last block: z (..., G, G, D), ctx["cls"] (..., D) ->
        {"cls": (..., D), "scores": (..., heads, 1 + G*G), "v": (..., 1 + G*G, heads, D/heads)}.

        ``scores`` are the class token's attention logits q_cls . k_s / sqrt(d_h) over all tokens.
        """
        if self.resolve_split(at) != self.last_block:
            raise FgvceError(f"the last-block fast path needs split {self.last_block}, not {at}")
        block = self.encoder.layers[-1]
        t = jnp.concatenate([ctx["cls"][..., None, :], z.reshape(*z.shape[:-3], -1, z.shape[-1])], axis=-2)
        x = block.ln_1(t)
        att = block.self_attention
        q = att.heads(att.query(x[..., 0, :]))
        k, v = att.heads(att.key(x)), att.heads(att.value(x))
        scores = jnp.einsum("...hd,...shd->...hs", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        return {"cls": ctx["cls"], "scores": scores, "v": v}

    def last_block_logits(self, cache: dict, token_mask: jax.Array) -> jax.Array:
        """Logits with absent tokens masked out of the last block's attention.

        cache: from ``last_block_cache`` with batch shape L (e.g. (N,) or ()).
        token_mask: (*E, *L, G, G) bool, any extra leading axes E (e.g. (B, N, G, G)).
        Returns: (*E, *L, C), equal to ``head(z, ctx, token_mask=m)`` for each mask.
        """
        block = self.encoder.layers[-1]
        keep = _with_cls(token_mask)[..., None, :]  # (*E, *L, 1, S)
        a = _masked_softmax(cache["scores"], keep)  # (*E, *L, heads, S)
        out = jnp.einsum("...hs,...shd->...hd", a, cache["v"])
        y = cache["cls"] + block.self_attention.out_proj(out.reshape(*out.shape[:-2], -1))
        return self._logits(block.mlp_residual(y))


ViT_B_16 = functools.partial(ViT, 16, 12, 12, 768, 3072, arch="vit_b_16")
ViT_B_32 = functools.partial(ViT, 32, 12, 12, 768, 3072, arch="vit_b_32")
ViT_L_16 = functools.partial(ViT, 16, 24, 16, 1024, 4096, arch="vit_l_16")
