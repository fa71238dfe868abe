"""Validity and size of counterfactual explanations (SPEC section 6).

Works on any ``Explanations``-like object (attributes ``success (Q,)``,
``n_edits (Q,)``, ``query_region (Q, T, 2)``, ``ref_region (Q, T, 2)``,
``region_size``; see docs/ARCHITECTURE.md).

An edit with region size r replaces the r x r window of query cells around
``query_region`` by the r x r window of reference cells around ``ref_region``,
cell for cell: offset d = (di, dj), with di, dj in -((r-1)//2) .. r//2 (the
window of ``fgvce_jax.counterfactual.partition.window_mask``), maps query cell
q + d to reference cell c + d. A cell pair is *edited* when both cells lie
inside the (H, W) grid (SPEC 5: cells outside the map are dropped) and, when
the search's ``edit_mask (Q, T, H, W)`` is known, the query cell is one the
edit actually wrote (a region owns its window minus the cells of earlier,
higher-scoring regions, so windows of later regions can be cut).
"""
from __future__ import annotations

import numpy as np

from fgvce_jax.errors import FgvceError


def region_offsets(region_size: int) -> np.ndarray:
    """(r*r, 2) int32 offsets (di, dj) of an r x r region from its centre, raster order."""
    if region_size < 1:
        raise FgvceError(f"region_size must be >= 1, got {region_size}")
    d = np.arange(region_size) - (region_size - 1) // 2
    di, dj = np.meshgrid(d, d, indexing="ij")
    return np.stack([di.ravel(), dj.ravel()], -1).astype(np.int32)


def _inside(cells: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    return (cells[..., 0] >= 0) & (cells[..., 0] < grid[0]) & (cells[..., 1] >= 0) & (cells[..., 1] < grid[1])


def edit_slots(n_edits: np.ndarray, t_max: int) -> np.ndarray:
    """(Q, T) bool: slot t of query q holds an edit (t < n_edits[q])."""
    return np.arange(t_max)[None, :] < np.asarray(n_edits)[:, None]


def edited_cells(query_region, ref_region, n_edits, region_size: int, grid: tuple[int, int],
                 edit_mask=None):
    """The cell pairs of every edit.

    Args:
      query_region, ref_region: (Q, T, 2) int region centres (row, col).
      n_edits: (Q,) int, edits used per query; slots t >= n_edits are ignored.
      region_size: r.
      grid: (H, W) of the feature map.
      edit_mask: optional (Q, T, H, W) bool, the query cells each edit wrote.

    Returns:
      ``(query_cells, ref_cells, valid)``: (Q, T, r*r, 2) int32 cells and
      (Q, T, r*r) bool, true for edited pairs (used slot, both cells inside
      the grid). Invalid cells are clipped into the grid so they can index.
    """
    query_region = np.asarray(query_region, np.int32)
    ref_region = np.asarray(ref_region, np.int32)
    off = region_offsets(region_size)
    q = query_region[:, :, None, :] + off
    r = ref_region[:, :, None, :] + off
    used = edit_slots(n_edits, query_region.shape[1])[:, :, None]
    valid = used & _inside(q, grid) & _inside(r, grid)
    hi = np.asarray(grid) - 1
    q, r = np.clip(q, 0, hi), np.clip(r, 0, hi)
    if edit_mask is not None:
        edit_mask = np.asarray(edit_mask, bool)
        qi = np.arange(q.shape[0])[:, None, None]
        ti = np.arange(q.shape[1])[None, :, None]
        valid &= edit_mask[qi, ti, q[..., 0], q[..., 1]]
    return q, r, valid


def validity(success) -> float:
    """Share of queries whose counterfactual succeeds: mean(success)."""
    success = np.asarray(success, bool)
    return float(success.mean()) if success.size else float("nan")


def edits_in_regions(n_edits, success) -> float:
    """Mean number of edits (regions replaced) over the successful queries; NaN if none succeeded."""
    success = np.asarray(success, bool)
    return float(np.asarray(n_edits, np.float64)[success].mean()) if success.any() else float("nan")


def edited_query_mask(query_region, ref_region, n_edits, region_size: int, grid,
                      edit_mask=None) -> np.ndarray:
    """(Q, H, W) bool: the distinct query cells replaced by any edit (see :func:`edited_cells`)."""
    qc, _, valid = edited_cells(query_region, ref_region, n_edits, region_size, grid, edit_mask)
    mask = np.zeros((valid.shape[0], *grid), bool)
    qi = np.broadcast_to(np.arange(valid.shape[0])[:, None, None], valid.shape)
    mask[qi[valid], qc[valid][:, 0], qc[valid][:, 1]] = True
    return mask


def edits_in_cells(query_region, ref_region, n_edits, success, region_size: int, grid,
                   edit_mask=None) -> float:
    """Mean number of distinct edited query cells over the successful queries; NaN if none succeeded."""
    success = np.asarray(success, bool)
    if not success.any():
        return float("nan")
    cells = edited_query_mask(query_region, ref_region, n_edits, region_size, grid, edit_mask).sum((1, 2))
    return float(cells[success].mean())


def summary(explanations) -> dict[str, float]:
    """Validity, edits (regions) and edits (cells) of an Explanations-like object.

    Uses ``explanations.edit_mask`` when the object has one (see :func:`edited_cells`).
    """
    e = explanations
    return {
        "validity": validity(e.success),
        "edits_regions": edits_in_regions(e.n_edits, e.success),
        "edits_cells": edits_in_cells(e.query_region, e.ref_region, e.n_edits, e.success,
                                      int(e.region_size), grid_of(e), getattr(e, "edit_mask", None)),
    }


def grid_of(explanations) -> tuple[int, int]:
    """(H, W) of the feature map the explanations live on (from ``query_phi``)."""
    return tuple(int(n) for n in np.shape(explanations.query_phi)[1:3])
