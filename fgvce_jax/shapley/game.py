"""Games: vectorised value functions ``bool[B, ...] -> float[B]``, and the feature-map game of SPEC 2.

A :class:`Game` pairs a static pure function ``fn(args, masks)`` with a pytree
of arrays ``args``. It is itself a pytree whose static part is ``fn``, so a jit
keyed on it compiles once per function and shape, not once per image or set
of weights. For an image with feature map Z (H, W, D) and class c,

    v(m) = out_c( g( Z * m + B * (1 - m) ) )

with B the baseline (``zero``, a per-channel mean, a given map) or, for ViT,
``attention`` masking of absent tokens. Two structural fast paths are chosen
automatically and give the generic path's numbers:

- a residual convolutional head (``split_model.conv_head(params)`` is not None, ResNet ``layer4.0`` and
  ``layer3``): :class:`ConvHead` mixes the first block's point-wise prefix of Z and B instead of Z and B,
  and for local windows with ``outside="absent"`` evaluates the blocks on the window's receptive field
  only (``fgvce_jax.shapley.crop``).

- g = GAP + linear (``split_model.linear_head(params)`` is not None): the
  logits are affine in m, ``l(m) = b + W^T mean_p B_p + sum_p m_p W^T (Z_p - B_p) / HW``,
  so the per-position contributions (HW, C) are computed once and a coalition
  costs one (HW,) x (HW, C) product.
- the last ViT block with ``attention``: ``split_model.last_block_cache`` (the
  patch K/V, once per image) and ``last_block_logits`` (the class token's row).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fgvce_jax.errors import FgvceError
from fgvce_jax.shapley import crop

OUTPUTS = ("prob", "logit", "log_prob")
BASELINES = ("zero", "mean", "attention")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Game:
    """``game(masks bool[B, H, W] or bool[B, n]) -> float[B]`` = ``fn(args, masks)``.

    fn: a hashable pure function (static under jit); args: a pytree of arrays;
    bytes_per_evaluation: memory one evaluation needs, used to size chunks.
    """

    fn: Callable = dataclasses.field(metadata={"static": True})
    args: Any
    bytes_per_evaluation: int = dataclasses.field(default=4096, metadata={"static": True})

    def __call__(self, masks: jax.Array) -> jax.Array:
        if masks.dtype != jnp.bool_:
            raise FgvceError(f"game masks must be boolean, got {masks.dtype}")
        return self.fn(self.args, masks)


@dataclasses.dataclass(frozen=True)
class _Plain:
    """A plain callable ``f(masks)`` as a Game function (hashed by the callable itself)."""

    f: Callable

    def __call__(self, args, masks):
        return self.f(masks)


def as_game(game: Game | Callable) -> Game:
    """A Game as is; a plain callable ``masks -> values`` wrapped with no array arguments."""
    if isinstance(game, Game):
        return game
    if callable(game):
        return Game(_Plain(game), ())
    raise FgvceError(f"a game must be a Game or a callable bool[B, n] -> float[B], got {type(game).__name__}")


_CHECKED: set = set()  # (fn, argument structure, mask shape) of games that passed check_game


def check_game(game: Game, mask_shape: tuple[int, ...]) -> None:
    """FgvceError unless ``game`` maps bool[2, *mask_shape] to a float array of shape (2,).

    A game function that passed with the same argument shapes is not traced again.
    """
    leaves, treedef = jax.tree.flatten(game.args)
    signature = (game.fn, treedef, tuple((jnp.shape(a), jnp.result_type(a)) for a in leaves), tuple(mask_shape))
    try:
        if signature in _CHECKED:
            return
    except TypeError:  # an unhashable game function: check it every time
        signature = None
    _check_game(game, mask_shape)
    if signature is not None:
        if len(_CHECKED) >= 1024:  # bounded: entries keep their functions (and closures) alive
            _CHECKED.clear()
        _CHECKED.add(signature)


def _check_game(game: Game, mask_shape: tuple[int, ...]) -> None:
    masks = jax.ShapeDtypeStruct((2, *mask_shape), jnp.bool_)
    want = f"bool[B, {', '.join(map(str, mask_shape))}] -> float[B]"
    try:
        out = jax.eval_shape(game.fn, game.args, masks)
    except FgvceError:
        raise
    except Exception as e:  # noqa: BLE001 -- any tracing failure means the game does not fit the masks
        raise FgvceError(f"the game must map {want}; calling it failed: {type(e).__name__}: {e}") from None
    if not (hasattr(out, "dtype") and jnp.issubdtype(out.dtype, jnp.floating) and out.shape == (2,)):
        got = f"{out.dtype}{list(out.shape)}" if hasattr(out, "dtype") else type(out).__name__
        raise FgvceError(f"the game must map {want}; for B = 2 it returned {got}")


def read_output(logits: jax.Array, cls: jax.Array, output: str) -> jax.Array:
    """out_c: (B, C) logits -> (B,) float32 softmax probability, logit or log-probability of class ``cls``
    (read in float32 whatever the head's dtype)."""
    logits = logits.astype(jnp.float32)
    if output == "prob":  # 1 / sum_j exp(l_j - l_c): no max pass, one division; the clip keeps exp (and grads) finite
        gap = jnp.minimum(logits - jnp.take(logits, cls, axis=-1)[:, None], 80.0)
        return 1.0 / jnp.exp(gap).sum(axis=-1)
    if output == "log_prob":
        return jax.nn.log_softmax(logits, axis=-1)[:, cls]
    return logits[:, cls]


def with_shared(shared: dict | None, args):
    """One game's args from the arguments shared by a batch of games (e.g. model parameters, no image axis)
    and its own: ``{**shared, **args}``; ``args`` as is when nothing is shared.

    Batched engines (``run_batch``) vmap only the per-game ``args`` and close over ``shared``, so a batch
    of N images runs every convolution with one kernel, not N per-image copies of it."""
    return {**shared, **args} if shared else args


def _grid_masks(masks: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """masks bool (B, H, W) or (B, H*W) -> (B, H, W)."""
    return masks.reshape(masks.shape[0], *grid)


def _broadcast(tree, b: int):
    return jax.tree.map(lambda a: jnp.broadcast_to(a[None], (b, *a.shape)), tree)


@dataclasses.dataclass(frozen=True)
class GenericHead:
    """v(m) by running the head on ``where(m, Z, B)`` (or with ``token_mask = m`` for attention)."""

    split_model: Any
    output: str
    attention: bool

    def __call__(self, args, masks):
        z = args["z"]
        m = _grid_masks(masks, z.shape[:2])
        b = m.shape[0]
        ctx = _broadcast(args["ctx"], b)
        if self.attention:
            logits = self.split_model.head(args["params"], _broadcast(z, b), ctx, token_mask=m)
        else:
            logits = self.split_model.head(args["params"], jnp.where(m[..., None], z, args["base"]), ctx)
        return read_output(logits, args["cls"], self.output)


@dataclasses.dataclass(frozen=True)
class LinearHead:
    """v(m) = out_c(offset + m_flat @ contrib) for a GAP + linear head (contrib (HW, C), offset (C,)).

    An *affine* game function (see :func:`is_affine`): ``args`` hold ``offset`` (C,) and ``contrib`` (n, C)
    and ``v(m) = readout(args, offset + m @ contrib)``, so an engine may build the logits of related
    coalitions incrementally (a prefix from the previous one, a complement from the window total).
    """

    output: str

    def readout(self, args, logits: jax.Array) -> jax.Array:
        """(B, C) logits -> (B,) values."""
        return read_output(logits, args["cls"], self.output)

    def __call__(self, args, masks):
        m = masks.reshape(masks.shape[0], -1).astype(args["contrib"].dtype)
        return self.readout(args, args["offset"] + m @ args["contrib"])


def is_affine(fn) -> bool:
    """Whether a game function is affine before its readout: ``fn(args, m) = fn.readout(args, s(m))`` with
    ``s(m) = args["offset"] + m_flat @ args["contrib"]``. Engines use this to evaluate chains of coalitions
    incrementally; a plain callable never is (wrap a game in a lambda to force the generic path)."""
    return isinstance(fn, LinearHead)


@dataclasses.dataclass(frozen=True)
class ConvHead:
    """v(m) = out_c(fc(mean_hw(blocks(where(m, Z, B))))) for a residual head, with the first block's
    point-wise prefix and shortcut mixed from per-image maps (``crop.head_args``: ``fz, fb, sz, sb,
    levels``, plus ``params`` and ``cls``).

    A *croppable* game function (see :func:`is_croppable`): ``cropped(args, masks, centres, kernel)``
    gives the same values for masks that are False outside the k x k window around each flat position
    ``centres`` (B,), evaluating the blocks on that window's receptive field only. ``convs`` is each
    block's spatial convs as (radius, stride).
    """

    split_model: Any
    output: str
    convs: tuple

    def _readout(self, args, fc, pooled: jax.Array) -> jax.Array:
        return read_output(fc(pooled), args["cls"], self.output)

    def __call__(self, args, masks):
        blocks, fc = self.split_model.conv_head(args["params"])
        m = _grid_masks(masks, args["fz"].shape[:2])
        return self._readout(args, fc, crop.full_pooled(blocks, args, m))

    def cropped(self, args, masks, centres, kernel: int):
        """float[B]: the game on masks bool[B, H, W] (or [B, H*W]) each inside its window (B,) of size k."""
        blocks, fc = self.split_model.conv_head(args["params"])
        m = _grid_masks(masks, args["fz"].shape[:2])
        return self._readout(args, fc, crop.cropped_pooled(blocks, args, m, centres, kernel, self.convs))


def is_croppable(fn) -> bool:
    """Whether a game function offers ``fn.cropped(args, masks, centres, kernel)`` (:class:`ConvHead`)."""
    return isinstance(fn, ConvHead)


@dataclasses.dataclass(frozen=True)
class LastBlockAttention:
    """v(m) = out_c(last_block_logits(cache, token_mask = m)) for a ViT split at its last block."""

    split_model: Any
    output: str
    grid: tuple[int, int]

    def __call__(self, args, masks):
        m = _grid_masks(masks, self.grid)
        logits = self.split_model.last_block_logits(args["params"], args["cache"], m)
        return read_output(logits, args["cls"], self.output)


def baseline_map(z: jax.Array, baseline) -> jax.Array:
    """B (H, W, D) for one feature map z (H, W, D).

    ``zero``; ``mean`` = the image's own per-channel mean over positions; an array
    (D,) (e.g. a dataset's per-channel mean) or (H, W, D) (a given map).
    """
    if isinstance(baseline, str):
        if baseline == "zero":
            return jnp.zeros_like(z)
        if baseline == "mean":
            return jnp.broadcast_to(z.mean(axis=(0, 1)), z.shape)
        raise FgvceError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}, or pass an array")
    base = jnp.asarray(baseline, z.dtype)
    if base.shape not in ((z.shape[-1],), z.shape):
        raise FgvceError(f"a baseline array must have shape ({z.shape[-1]},) or {tuple(z.shape)}, got {base.shape}")
    return jnp.broadcast_to(base, z.shape)


def _vit_cache(split_model, params, z, ctx):
    """The last-block K/V cache, or None when the model offers no last-block fast path at this split."""
    make = getattr(split_model, "last_block_cache", None)
    if make is None:
        return None
    return make(params, z[None], _broadcast(ctx, 1))


def feature_game(split_model, params, z: jax.Array, ctx: dict | None, cls, *, baseline="zero",
                 output: str = "prob", fast: bool = True) -> Game:
    """The game of SPEC 2 for one image: masks bool[B, H, W] (or bool[B, H*W]) -> out_c, float[B].

    Args:
      split_model, params: the functional split view (``fgvce_jax.models.split``).
      z: (H, W, D) the image's feature map; ctx: its per-image head context (no batch axis) or None.
      cls: int, the explained class.
      baseline: ``zero`` | ``mean`` | ``attention`` (ViT) | an array (D,) or (H, W, D).
      output: ``prob`` | ``logit`` | ``log_prob``.
      fast: use a structural fast path when one applies (the default; False forces the generic path).
    """
    if output not in OUTPUTS:
        raise FgvceError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    z = jnp.asarray(z)
    if z.ndim != 3:
        raise FgvceError(f"feature_game expects one feature map (H, W, D), got shape {tuple(z.shape)}")
    ctx = {} if ctx is None else ctx
    h, w, d = z.shape
    cls = jnp.asarray(cls, jnp.int32)
    attention = isinstance(baseline, str) and baseline == "attention"
    if attention and getattr(split_model, "family", "vit") != "vit":
        raise FgvceError("the attention baseline masks ViT tokens; use zero, mean or a map for a CNN")
    generic_bytes = 4 * h * w * d * 8
    if attention:
        cache = _vit_cache(split_model, params, z, ctx) if fast else None
        if cache is not None:
            args = {"params": params, "cache": cache, "cls": cls}
            return Game(LastBlockAttention(split_model, output, (h, w)), args, 4 * (h * w * 16 + 8 * d))
        return Game(GenericHead(split_model, output, True), {"params": params, "z": z, "ctx": ctx, "cls": cls},
                    generic_bytes)
    base = baseline_map(z, baseline)
    linear = split_model.linear_head(params) if fast else None
    if linear is not None:
        W, b = linear
        contrib = ((z - base) @ W).reshape(h * w, -1).astype(jnp.float32) / (h * w)  # the sums stay float32
        offset = (b + base.mean(axis=(0, 1)) @ W).astype(jnp.float32)
        return Game(LinearHead(output), {"contrib": contrib, "offset": offset, "cls": cls},
                    4 * (h * w + 2 * W.shape[-1]))
    conv = getattr(split_model, "conv_head", None) if fast else None
    head = conv(params) if conv is not None else None
    if head is not None and not ctx:
        blocks = head[0]
        args = {"params": params, "cls": cls, **crop.head_args(blocks, z, base)}
        return Game(ConvHead(split_model, output, tuple(b.convs for b in blocks)), args, generic_bytes)
    return Game(GenericHead(split_model, output, False),
                {"params": params, "z": z, "ctx": ctx, "cls": cls, "base": base}, generic_bytes)
