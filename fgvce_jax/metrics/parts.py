"""Part-based metrics of counterfactual edits (CUB-format data; SPEC section 6).

Parts are given per image as a (P, H, W) bool mask on the feature grid
(P = 12 part types for CUB: visible parts only, left and right merged); a
cell "holds" part type p when ``mask[p, i, j]``. Edits are expanded to cell
pairs (query cell, reference cell) by :func:`fgvce_jax.metrics.counterfactual.edited_cells`.
With Pq(c), Pr(c) the part-type sets of the query and reference cells of pair c:

- Near-KP of a pair: 0.5 [Pq(c) != {}] + 0.5 [Pr(c) != {}].
- Same-KP of a pair: [Pq(c) & Pr(c) != {}].
  An edit's Near-KP / Same-KP is the mean over its pairs (r = 1: its one
  pair); the reported value is the mean over all edits of the evaluated
  queries, pooled (as Vandenhende et al.'s "all edits").
- Part IoU of a query: |Uq & Ur| / |Uq | Ur|, Uq = union of Pq over all its
  edited query cells, Ur likewise over its reference cells; queries with
  Uq | Ur empty have no IoU and are left out of the mean.
- Coverage of a query: |Uq| / |visible part types of the query|; queries
  without visible parts are left out of the mean.
- Misleading: the share of edited query cells that hold no part, pooled over
  the distinct edited cells of all evaluated queries.

The evaluated queries are the successful ones (``only_successful=True``) that
have at least one edited cell. A metric with nothing to average is NaN.
"""
from __future__ import annotations

import numpy as np

from fgvce_jax.errors import FgvceError
from fgvce_jax.metrics.counterfactual import edited_cells, edited_query_mask, grid_of

NAMES = ("near_kp", "same_kp", "part_iou", "coverage", "misleading")


def near_kp(query_cell_parts: np.ndarray, ref_cell_parts: np.ndarray) -> np.ndarray:
    """(..., P) bool, (..., P) bool -> (...,) 0.5 [query cell has a part] + 0.5 [reference cell has a part]."""
    return 0.5 * query_cell_parts.any(-1) + 0.5 * ref_cell_parts.any(-1)


def same_kp(query_cell_parts: np.ndarray, ref_cell_parts: np.ndarray) -> np.ndarray:
    """(..., P) bool, (..., P) bool -> (...,) float: the two cells share a part type."""
    return (query_cell_parts & ref_cell_parts).any(-1).astype(np.float64)


def set_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(..., P) bool part-type sets -> (...,) |a & b| / |a | b|, NaN where the union is empty."""
    union = (a | b).sum(-1)
    inter = (a & b).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def _check_parts(name: str, parts, count: int, grid: tuple[int, int]) -> np.ndarray:
    parts = np.asarray(parts, bool)
    if parts.ndim != 4 or parts.shape[0] != count or parts.shape[2:] != grid:
        raise FgvceError(f"{name} must be ({count}, P, {grid[0]}, {grid[1]}) bool, got {parts.shape}")
    return parts


def _mean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def part_metrics(explanations, query_parts, reference_parts, *, only_successful: bool = True) -> dict[str, float]:
    """Near-KP, Same-KP, Part IoU, coverage and misleading share of a set of explanations.

    Args:
      explanations: stored explanations (:class:`fgvce_jax.results.StoredExplanations`, or any object with
        ``success, n_edits, query_region, ref_split_index, ref_region, region_size, query_phi``, optional
        ``edit_mask``).
      query_parts: (Q, P, H, W) bool, parts of each query on the (H, W) grid.
      reference_parts: (R, P, H, W) bool, parts of each reference, indexed by
        ``ref_split_index``.
      only_successful: evaluate only the queries whose search succeeded.

    Returns:
      dict with the keys in :data:`NAMES` (floats in [0, 1] or NaN).
    """
    e = explanations
    query_region = np.asarray(e.query_region)
    q_count, t_max = query_region.shape[:2]
    grid = grid_of(e)
    query_parts = _check_parts("query_parts", query_parts, q_count, grid)
    reference_parts = np.asarray(reference_parts, bool)
    reference_parts = _check_parts("reference_parts", reference_parts, reference_parts.shape[0], grid)
    if query_parts.shape[1] != reference_parts.shape[1]:
        raise FgvceError("query_parts and reference_parts must have the same number of part types")

    n_edits = np.asarray(e.n_edits)
    if only_successful:
        n_edits = np.where(np.asarray(e.success, bool), n_edits, 0)
    edit_mask = getattr(e, "edit_mask", None)
    qc, rc, valid = edited_cells(query_region, e.ref_region, n_edits, int(e.region_size), grid, edit_mask)
    ref_split_index = np.asarray(e.ref_split_index)
    if valid.any() and (ref_split_index[valid.any(-1)].min() < 0 or ref_split_index[valid.any(-1)].max() >= reference_parts.shape[0]):
        raise FgvceError(f"ref_split_index points outside the {reference_parts.shape[0]} references given")
    ref_split_index = np.clip(ref_split_index, 0, reference_parts.shape[0] - 1)

    q_hw = query_parts.transpose(0, 2, 3, 1)  # (Q, H, W, P)
    r_hw = reference_parts.transpose(0, 2, 3, 1)
    qi = np.broadcast_to(np.arange(q_count)[:, None, None], valid.shape)
    ri = np.broadcast_to(ref_split_index[:, :, None], valid.shape)
    qp = q_hw[qi, qc[..., 0], qc[..., 1]] & valid[..., None]  # (Q, T, K, P)
    rp = r_hw[ri, rc[..., 0], rc[..., 1]] & valid[..., None]

    pairs = valid.sum(-1)  # (Q, T) edited pairs per edit
    edits = pairs > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        near_edit = np.where(valid, near_kp(qp, rp), 0).sum(-1) / pairs
        same_edit = np.where(valid, same_kp(qp, rp), 0).sum(-1) / pairs

    evaluated = edits.any(-1)  # (Q,)
    edited = edited_query_mask(query_region, e.ref_region, n_edits, int(e.region_size), grid, edit_mask)
    q_union = (query_parts & edited[:, None]).any((2, 3))  # (Q, P)
    r_union = rp.any((1, 2))
    visible = query_parts.any((2, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        coverage = np.where(visible.any(-1), q_union.sum(-1) / visible.sum(-1), np.nan)
    empty_cells = (edited & ~query_parts.any(1)).sum()
    return {
        "near_kp": _mean(near_edit[edits]),
        "same_kp": _mean(same_edit[edits]),
        "part_iou": _mean(set_iou(q_union, r_union)[evaluated]),
        "coverage": _mean(coverage[evaluated]),
        "misleading": float(empty_cells / edited.sum()) if edited.any() else float("nan"),
    }
