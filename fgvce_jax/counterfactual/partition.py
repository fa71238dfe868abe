"""Saliency partition (SPEC 4): Phi (H, W) -> up to K non-overlapping r x r regions, by NMS.

Window convention: the r x r window centred on (i, j) covers rows
``i - (r-1)//2 .. i + r//2`` (and likewise columns), i.e. it is symmetric for odd
r and extends one more cell down/right for even r. It is clipped at the borders.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Regions(NamedTuple):
    """Regions of a batch of maps, in the order NMS found them (valid ones first).

    center: (N, K, 2) int32 (row, col) of the cell the region was grown from.
    score: (N, K) float32, sum of Phi over the region's cells (0 where invalid).
    valid: (N, K) bool.
    cells: (N, K, H, W) bool, the cells the region owns: its clipped window minus
      cells owned by earlier regions, so regions never overlap.
    """

    center: jax.Array
    score: jax.Array
    valid: jax.Array
    cells: jax.Array


def window_mask(center: jax.Array, grid: tuple[int, int], region_size: int) -> jax.Array:
    """bool (H, W): the clipped r x r window around ``center`` (2,) int."""
    rows = jnp.arange(grid[0])[:, None]
    cols = jnp.arange(grid[1])[None, :]
    lo, hi = (region_size - 1) // 2, region_size // 2
    return ((rows >= center[0] - lo) & (rows <= center[0] + hi)
            & (cols >= center[1] - lo) & (cols <= center[1] + hi))


def _partition_one(phi: jax.Array, region_size: int, max_regions: int) -> Regions:
    """NMS on one map phi (H, W); see :func:`partition`."""
    grid = phi.shape

    def step(free, _):
        masked = jnp.where(free, phi, -jnp.inf).ravel()
        flat = jnp.argmax(masked)
        ok = masked[flat] > 0
        center = jnp.stack(jnp.divmod(flat, grid[1])).astype(jnp.int32)
        cells = window_mask(center, grid, region_size) & free & ok
        score = jnp.sum(jnp.where(cells, phi, 0.0))
        return free & ~cells, (center, score.astype(jnp.float32), ok, cells)

    _, (center, score, valid, cells) = jax.lax.scan(
        step, jnp.ones(grid, bool), None, length=max_regions)
    return Regions(jnp.where(valid[:, None], center, -1), score, valid, cells)


@functools.partial(jax.jit, static_argnames=("region_size", "max_regions"))
def partition(phi: jax.Array, *, region_size: int = 1, max_regions: int = 8) -> Regions:
    """Partition saliency maps into regions by non-maximum suppression (SPEC 4).

    For each map: take the unsuppressed cell with the largest Phi; while that Phi
    is > 0 (and fewer than K regions exist), its region is the clipped r x r
    window around it minus already-suppressed cells; suppress those cells; repeat.
    A region's score is sum_{p in region} Phi_p.

    Args:
      phi: (N, H, W) float saliency maps.
      region_size: r >= 1.
      max_regions: K >= 1; fixed output size, unused slots have ``valid=False``,
        centre -1, score 0 and no cells.

    Returns:
      :class:`Regions` with leading axes (N, K).
    """
    return jax.vmap(lambda p: _partition_one(p, region_size, max_regions))(phi)
