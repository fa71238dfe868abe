"""Cause precision and cause recall of counterfactual edits (SPEC section 10).

On data whose classes are defined by part types (:mod:`fgvce_jax.data.birds`),
the cause of a confusion y -> y_hat is the set of parts in which the two
classes differ. Parts are given per query as pixel masks and rasterised onto
the H x W feature grid by :func:`cell_parts`: pixel (r, c) of an S x S image
lies in cell ``(floor((r + 0.5) H / S), floor((c + 0.5) W / S))`` (its centre,
as keypoints in :mod:`fgvce_jax.data.parts`), and a cell lies on part p when p
covers *more than* ``min_share`` of the cell's pixels. The default
``min_share = 0`` means "any pixel": small parts (an eye of a few pixels)
still own the cells they are in; a cell can lie on several parts.

With E_q the distinct query cells edited in query q (:func:`fgvce_jax.metrics.counterfactual.edited_cells`),
G_q[p] the cells of part p and C_q its cause parts:

- Cause precision = sum_q |E_q & (union_{p in C_q} G_q[p])| / sum_q |E_q|,
  pooled over the edited cells of all evaluated queries (as "misleading" in
  :mod:`fgvce_jax.metrics.parts`).
- Cause recall of a query = |{p in C_q : E_q & G_q[p] != {}}| / |{p in C_q : G_q[p] != {}}|:
  the share of its cause parts present on the grid that some edit touches; a
  cause part hidden in the query cannot be touched and is left out; queries
  with no visible cause part are left out of the mean.

The evaluated queries are the successful ones (``only_successful=True``) that
have at least one edited cell. A metric with nothing to average is NaN.
"""
from __future__ import annotations

import numpy as np

from fgvce_jax.errors import FgvceError
from fgvce_jax.metrics.counterfactual import edited_query_mask, grid_of

NAMES = ("cause_precision", "cause_recall")


def cell_parts(masks, grid: tuple[int, int], min_share: float = 0.0) -> np.ndarray:
    """(..., P, S, S) bool pixel masks -> (..., P, H, W) bool: the cell holds more than ``min_share`` of its
    pixels on the part (share = covered pixels / pixels whose centre is in the cell)."""
    masks = np.asarray(masks, bool)
    size = masks.shape[-1]
    h, w = (int(n) for n in grid)
    if masks.ndim < 3 or masks.shape[-2] != size or not (1 <= h <= size and 1 <= w <= size):
        raise FgvceError(f"part masks must be (..., P, S, S) with S >= the grid {grid}, got {masks.shape}")
    if not 0.0 <= min_share < 1.0:
        raise FgvceError(f"min_share must be in [0, 1), got {min_share}")
    rows = np.floor((np.arange(size) + 0.5) * h / size).astype(np.int64)  # (S,) cell row of each pixel row
    cols = np.floor((np.arange(size) + 0.5) * w / size).astype(np.int64)
    onehot_r = rows[None, :] == np.arange(h)[:, None]  # (H, S)
    onehot_c = cols[None, :] == np.arange(w)[:, None]  # (W, S)
    covered = np.einsum("is,...st,jt->...ij", onehot_r.astype(np.int64), masks.astype(np.int64),
                        onehot_c.astype(np.int64))
    pixels = np.outer(onehot_r.sum(1), onehot_c.sum(1))  # (H, W)
    return covered > min_share * pixels


def cause_metrics(explanations, query_parts, cause, *, only_successful: bool = True) -> dict[str, float]:
    """Cause precision and recall of a set of explanations.

    Args:
      explanations: stored explanations (any object with ``success, n_edits, query_region, ref_region,
        region_size, query_phi``, optional ``edit_mask``; see :mod:`fgvce_jax.metrics.counterfactual`).
      query_parts: (Q, P, H, W) bool, the part cells of each query on the (H, W) grid (:func:`cell_parts`).
      cause: (Q, P) bool, the cause parts of each query's confusion (e.g.
        ``fgvce_jax.data.birds.cause_parts(true, pred)``).
      only_successful: evaluate only the queries whose search succeeded.

    Returns:
      dict with the keys in :data:`NAMES` (floats in [0, 1] or NaN).
    """
    e = explanations
    query_region = np.asarray(e.query_region)
    q_count = query_region.shape[0]
    grid = grid_of(e)
    query_parts = np.asarray(query_parts, bool)
    if query_parts.ndim != 4 or query_parts.shape[0] != q_count or query_parts.shape[2:] != grid:
        raise FgvceError(f"query_parts must be ({q_count}, P, {grid[0]}, {grid[1]}) bool, got {query_parts.shape}")
    cause = np.asarray(cause, bool)
    if cause.shape != query_parts.shape[:2]:
        raise FgvceError(f"cause must be {query_parts.shape[:2]} bool (queries, parts), got {cause.shape}")

    n_edits = np.asarray(e.n_edits)
    if only_successful:
        n_edits = np.where(np.asarray(e.success, bool), n_edits, 0)
    edited = edited_query_mask(query_region, e.ref_region, n_edits, int(e.region_size), grid,
                               getattr(e, "edit_mask", None))  # (Q, H, W)
    evaluated = edited.any((1, 2))
    on_cause = (query_parts & cause[:, :, None, None]).any(1)  # (Q, H, W)
    present = query_parts.any((2, 3)) & cause  # (Q, P)
    touched = (query_parts & edited[:, None]).any((2, 3)) & cause
    keep = evaluated & present.any(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = touched[keep].sum(-1) / present[keep].sum(-1)
    return {
        "cause_precision": float((edited & on_cause).sum() / edited.sum()) if edited.any() else float("nan"),
        "cause_recall": float(recall.mean()) if recall.size else float("nan"),
    }
