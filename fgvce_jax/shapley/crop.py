"""Exact fast evaluation of a residual convolutional head on masked feature maps (SPEC 2, 3).

The head is ``g(X) = fc(mean_hw(blocks(X)))`` with X = where(m, Z, B) (``SplitModel.conv_head``).

Point-wise prefixes. A block is ``body(prefix(x), shortcut(x))`` with ``prefix`` (a Bottleneck's 1x1
conv, BN, ReLU) and ``shortcut`` (the identity or a strided 1x1 projection) point-wise, so for the
first block

    prefix(X) = where(m, prefix(Z), prefix(B)),   shortcut(X) = where(m[::s, ::s], shortcut(Z), shortcut(B)),

with the four maps computed once per image (:func:`head_args`).

Receptive-field cropping. In the local game with ``outside = absent`` a coalition differs from "all
absent" only inside the window W_p, so at level l (after l blocks) only the positions A_l whose
receptive field meets W_p differ from B_l = blocks_{1..l}(B), computed once per image. Block l then
runs on a crop of level l-1 only: the positions A_{l-1} pasted into B_{l-1}, cut to a static size C_l
around A_l plus the block's radius, with its start a multiple of the block's stride (so the crop's
positions line up with the map's), clipped to the map (where the zero padding is the map's own). Of
its outputs, those whose receptive field lies inside the crop (or leaves it only across the map's
border) are exact; the sizes are the smallest for which these cover A_l from every window, and the
others are replaced by B_l. The pooled features are then

    mean_hw(blocks(X)) = (sum B_L - sum over the crop of B_L + sum over the crop of X_L) / (H_L W_L).

For a ResNet-50 ``layer4.0`` head at 14 x 14 and a 3 x 3 window the two blocks run on 7 x 7 and
9 x 9 crops instead of 14 x 14 (3x fewer FLOPs), and the first block's 1x1 conv is never evaluated.
Both paths give the generic path's values up to float rounding (tests/test_shapley_crop.py).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _stride(convs) -> int:
    return math.prod(s for _, s in convs)


def _receptive_field(convs, lo: int, hi: int) -> tuple[int, int]:
    """The input interval (unclipped) that outputs lo..hi of a block with spatial ``convs`` read."""
    for r, s in reversed(convs):
        lo, hi = lo * s - r, hi * s + r
    return lo, hi


def _out_size(convs, n: int) -> int:
    for _, s in convs:
        n = (n - 1) // s + 1
    return n


def _axis_level(convs, n_in: int, affected: list) -> tuple[int, np.ndarray, np.ndarray, list]:
    """One block along one axis: (crop size C, starts (W,), exact (W, C_out), affected outputs per window).

    ``affected[c]`` is the interval of level-(l-1) positions that window c changes. A crop start is a
    multiple of the stride in 0..n_in - C, so C = n_in, the whole map, always qualifies."""
    s = _stride(convs)
    n_out = _out_size(convs, n_in)
    rf = [_receptive_field(convs, j, j) for j in range(n_out)]
    out_affected = []
    for lo, hi in affected:
        hit = [j for j in range(n_out) if rf[j][0] <= hi and rf[j][1] >= lo]
        out_affected.append((hit[0], hit[-1]))
    for size in range(1, n_in + 1):
        if (n_in - size) % s:
            continue
        n_c = (size - 1) // s + 1
        starts, exact = [], []
        for lo, hi in out_affected:
            start = min(max(rf[lo][0], 0) // s * s, n_in - size)
            first = start // s
            ok = [max(rf[j][0], 0) >= start and min(rf[j][1], n_in - 1) <= start + size - 1
                  for j in range(first, first + n_c)]  # the output reads inside the crop or the map's padding
            if not all(first <= j < first + n_c and ok[j - first] for j in range(lo, hi + 1)):
                break
            starts.append(start)
            exact.append(ok)
        else:
            return size, np.asarray(starts, np.int32), np.asarray(exact, bool), out_affected
    raise AssertionError("the whole map is always an exact crop")  # pragma: no cover


@functools.lru_cache(maxsize=64)
def plan(grid: tuple[int, int], kernel: int, convs: tuple) -> tuple:
    """Per block, per axis (rows, cols): (crop size, starts (n,) by window centre, exact (n, crop out)).

    ``convs``: each block's spatial convs as (radius, stride) (``block.convs``)."""
    axes = []
    for n in grid:
        half = kernel // 2
        affected = [(max(c - half, 0), min(c + half, n - 1)) for c in range(n)]
        levels, n_in = [], n
        for block in convs:
            size, starts, exact, affected = _axis_level(block, n_in, affected)
            levels.append((size, starts, exact))
            n_in = _out_size(block, n_in)
        axes.append(levels)
    return tuple(zip(*axes))


def head_args(blocks, z: jax.Array, base: jax.Array) -> dict:
    """The per-image maps both fast paths use, from Z and B (H, W, D): the first block's prefix and
    shortcut of each (``fz``, ``fb``, ``sz``, ``sb``) and the baseline after every block (``levels``)."""
    first = blocks[0]
    pair = jnp.stack([z, base])
    f, sc = first.prefix(pair), first.shortcut(pair)
    levels, x = [], base[None]
    for block in blocks:
        x = block(x)
        levels.append(x[0])
    return {"fz": f[0], "fb": f[1], "sz": sc[0], "sb": sc[1], "levels": tuple(levels)}


def _first_block(block, args, m: jax.Array, start=(0, 0)) -> jax.Array:
    """The first block on where(m, Z, B) from the mixed prefix and shortcut: m bool (..., h, w) at
    ``start`` (a multiple of the stride) of the map -> (..., h', w', D')."""
    s = _stride(block.convs)
    size, out = m.shape[-2:], (-(-m.shape[-2] // s), -(-m.shape[-1] // s))
    cut = lambda a, at, n: jax.lax.dynamic_slice(a, (*at, 0), (*n, a.shape[-1]))  # noqa: E731
    y = jnp.where(m[..., None], cut(args["fz"], start, size), cut(args["fb"], start, size))
    at = (start[0] // s, start[1] // s)
    ms = m[..., ::s, ::s, None]
    return block.body(y, jnp.where(ms, cut(args["sz"], at, out), cut(args["sb"], at, out)))


def full_pooled(blocks, args, masks: jax.Array) -> jax.Array:
    """Pooled features (B, D) of where(m, Z, B) for masks bool (B, H, W), with the point-wise prefix."""
    x = _first_block(blocks[0], args, masks)
    for block in blocks[1:]:
        x = block(x)
    return x.mean(axis=(1, 2))


def _cropped_one(blocks, args, m, centre, geometry):
    """Pooled features (D,) for one mask m (H, W) that is False outside the window centred on ``centre``."""
    x = start = None
    for i, (block, (rows, cols)) in enumerate(zip(blocks, geometry)):
        size = (rows[0], cols[0])
        at = (jnp.asarray(rows[1])[centre[0]], jnp.asarray(cols[1])[centre[1]])
        if i == 0:
            out = _first_block(block, args, jax.lax.dynamic_slice(m, at, size)[None], at)[0]
        else:
            full = jax.lax.dynamic_update_slice(args["levels"][i - 1], x, (*start, 0))
            out = block(jax.lax.dynamic_slice(full, (*at, 0), (*size, full.shape[-1]))[None])[0]
        s = _stride(block.convs)
        start = (at[0] // s, at[1] // s)
        exact = jnp.asarray(rows[2])[centre[0]][:, None] & jnp.asarray(cols[2])[centre[1]][None, :]
        level = jax.lax.dynamic_slice(args["levels"][i], (*start, 0), out.shape)
        x = jnp.where(exact[..., None], out, level)
    last = args["levels"][-1]
    inside = jax.lax.dynamic_slice(last, (*start, 0), x.shape)
    total = last.sum(axis=(0, 1)) - inside.sum(axis=(0, 1)) + x.sum(axis=(0, 1))
    return total / (last.shape[0] * last.shape[1])


def cropped_pooled(blocks, args, masks: jax.Array, centres: jax.Array, kernel: int, convs: tuple) -> jax.Array:
    """Pooled features (B, D) of where(m, Z, B) for masks bool (B, H, W), each False outside the k x k
    window centred on its flat position ``centres`` (B,), by receptive-field cropping."""
    grid = masks.shape[1:]
    geometry = plan(tuple(grid), kernel, convs)
    rc = jnp.stack([centres // grid[1], centres % grid[1]], axis=-1)
    return jax.vmap(lambda m, c: _cropped_one(blocks, args, m, c, geometry))(masks, rc)
