"""Validity, edits and part metrics on hand-built explanations with hand-computed answers."""

import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax.counterfactual.partition import window_mask
from fgvce_jax.errors import FgvceError
from fgvce_jax.metrics import counterfactual as cf
from fgvce_jax.metrics.parts import part_metrics

from fake_explanations import explanations


def parts(count, placements, n_parts=3, grid=(4, 4)):
    """(count, P, H, W) bool with part p at cell (i, j) for each (image, p, i, j) in placements."""
    out = np.zeros((count, n_parts, *grid), bool)
    for b, p, i, j in placements:
        out[b, p, i, j] = True
    return out


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_region_offsets_match_the_partition_window(r):
    center = np.array([5, 5])
    mine = np.zeros((11, 11), bool)
    for di, dj in cf.region_offsets(r):
        mine[5 + di, 5 + dj] = True
    np.testing.assert_array_equal(mine, np.asarray(window_mask(jnp.asarray(center), (11, 11), r)))


def test_validity_and_edits_in_regions():
    assert cf.validity([True, False, True, True]) == 0.75
    assert cf.edits_in_regions([2, 5, 1, 3], [True, False, True, True]) == 2.0
    assert np.isnan(cf.edits_in_regions([2, 5], [False, False]))


def test_edits_in_cells_clips_at_borders_and_counts_distinct_cells():
    # r = 3 on a 4x4 grid. Edit 1: query (0,0) <- ref (1,1): only offsets {0,1}^2
    # keep the query cell inside -> 4 pairs, query cells (0,0),(0,1),(1,0),(1,1).
    # Edit 2: query (2,2) <- ref (3,3): the ref window leaves the grid for
    # offsets +1 -> 4 pairs, query cells (1,1),(1,2),(2,1),(2,2); (1,1) again.
    e = explanations([True, True], [2, 0], [[0, 0], [2, 2], [-1, -1], [-1, -1]],
                     [[0, 0], [-1, -1]], [[1, 1], [3, 3], [-1, -1], [-1, -1]], 3)
    _, _, valid = cf.edited_cells(e.query_region, e.ref_region, e.n_edits, 3, (4, 4))
    assert valid.sum((1, 2)).tolist() == [8, 0]
    assert cf.edited_query_mask(e.query_region, e.ref_region, e.n_edits, 3, (4, 4)).sum((1, 2)).tolist() == [7, 0]
    assert cf.summary(e) == {"validity": 1.0, "edits_regions": 1.0, "edits_cells": 3.5}


def _single_cell_case():
    # Query 0 parts: p0 (0,0), p1 (1,1), p2 (3,3). Query 1: p2 (0,1). Query 2 (failed): none.
    qp = parts(3, [(0, 0, 0, 0), (0, 1, 1, 1), (0, 2, 3, 3), (1, 2, 0, 1)])
    # Reference 0: p0 (2,2), p1 (0,0). Reference 1: no parts.
    rp = parts(2, [(0, 0, 2, 2), (0, 1, 0, 0)])
    e = explanations(
        success=[True, True, False], n_edits=[3, 1, 2],
        query_region=[[0, 0], [1, 1], [2, 0], [0, 1], [-1, -1], [-1, -1], [3, 0], [3, 1], [-1, -1]],
        ref_split_index=[[0, 0, 0], [0, -1, -1], [1, 0, -1]],
        ref_region=[[2, 2], [0, 0], [2, 2], [0, 0], [-1, -1], [-1, -1], [0, 0], [0, 0], [-1, -1]],
        region_size=1)
    return e, qp, rp


def test_part_metrics_single_cells_by_hand():
    e, qp, rp = _single_cell_case()
    got = part_metrics(e, qp, rp)
    # edits: (p0|p0) near 1 same 1; (p1|p1) 1, 1; (none|p0) 0.5, 0; (p2|p1) 1, 0
    assert got["near_kp"] == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert got["same_kp"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    # IoU: query 0 {0,1} vs {0,1} = 1; query 1 {2} vs {1} = 0
    assert got["part_iou"] == pytest.approx(0.5)
    # coverage: query 0 covers 2 of its 3 visible types, query 1 covers 1 of 1
    assert got["coverage"] == pytest.approx((2 / 3 + 1) / 2)
    # misleading: 4 edited cells, (2,0) of query 0 holds nothing
    assert got["misleading"] == pytest.approx(1 / 4)


def test_failed_queries_are_left_out_unless_asked():
    e, qp, rp = _single_cell_case()
    base = part_metrics(e, qp, rp)
    e.query_region[2, :2] = [[0, 0], [0, 3]]  # anything: the query failed
    assert part_metrics(e, qp, rp) == base
    # Counted: query 2 adds edits (none|none) near 0 and (none|p1 at (0,0)) near 0.5 and 2 empty cells.
    full = part_metrics(e, qp, rp, only_successful=False)
    assert full["near_kp"] == pytest.approx((1 + 1 + 0.5 + 1 + 0 + 0.5) / 6)
    assert full["misleading"] == pytest.approx(3 / 6)


def test_part_metrics_regions_of_two_cells_by_hand():
    # r = 2: window offsets {0,1}^2. Query p0 at (0,0). Reference 0: p0 (1,1), p1 (2,2).
    qp = parts(1, [(0, 0, 0, 0)])
    rp = parts(1, [(0, 0, 1, 1), (0, 1, 2, 2)])
    # Edit 1: query (0,0) <- ref (1,1): pairs (0,0)|(1,1) near 1 same 1, (0,1)|(1,2) 0,
    #   (1,0)|(2,1) 0, (1,1)|(2,2) near 0.5 same 0 -> edit near 0.375, same 0.25.
    # Edit 2: query (3,3) <- ref (0,0): one pair inside, (3,3)|(0,0), both empty.
    e = explanations([True], [2], [[0, 0], [3, 3]], [[0, 0]], [[1, 1], [0, 0]], 2)
    got = part_metrics(e, qp, rp)
    assert got["near_kp"] == pytest.approx((0.375 + 0) / 2)
    assert got["same_kp"] == pytest.approx((0.25 + 0) / 2)
    assert got["part_iou"] == pytest.approx(1 / 2)  # {0} vs {0, 1}
    assert got["coverage"] == pytest.approx(1.0)
    assert got["misleading"] == pytest.approx(4 / 5)
    assert cf.summary(e)["edits_cells"] == 5


def test_no_successful_query_gives_nan():
    e, qp, rp = _single_cell_case()
    e.success[:] = False
    assert all(np.isnan(v) for v in part_metrics(e, qp, rp).values())


def test_bad_part_inputs_raise_fgvce_error():
    e, qp, rp = _single_cell_case()
    with pytest.raises(FgvceError, match="query_parts"):
        part_metrics(e, qp[:2], rp)
    with pytest.raises(FgvceError, match="ref_split_index"):
        part_metrics(e, qp, rp[:1], only_successful=False)  # query 2 uses reference 1
    with pytest.raises(FgvceError, match="region_size"):
        cf.region_offsets(0)


@pytest.mark.parametrize("r", [1, 2, 3])
def test_cell_pairs_are_what_the_search_writes(r):
    """The search's own extract_patch + place, on maps whose features are the cell
    coordinates, write into query cell q exactly the reference cell our pairs name."""
    from fgvce_jax.counterfactual.references import extract_patch
    from fgvce_jax.counterfactual.search import place

    grid = (5, 6)
    coords = np.stack(np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij"), -1).astype(np.float32)
    rng = np.random.default_rng(r)
    for _ in range(10):
        qc, rc = rng.integers(0, grid, size=(2, 2))
        patch, patch_valid = extract_patch(jnp.asarray(coords), jnp.asarray(rc), r)
        edited, written = place(jnp.full(grid + (2,), -1.0), jnp.asarray(qc), jnp.ones(grid, bool), patch, patch_valid)
        q, ref, valid = cf.edited_cells(qc[None, None], rc[None, None], [1], r, grid)
        mine = {tuple(a): tuple(b) for a, b in zip(q[0, 0][valid[0, 0]], ref[0, 0][valid[0, 0]])}
        theirs = {(i, j): tuple(np.asarray(edited[i, j]).astype(int)) for i, j in zip(*np.nonzero(np.asarray(written)))}
        assert mine == theirs


def test_edit_mask_restricts_the_cells_of_an_edit():
    # Same r = 2 edit as above, but the search wrote only 3 of the 4 window cells:
    # cell (1,1) belonged to an earlier region. Pair (1,1)|(2,2) (near 0.5) drops out.
    qp = parts(1, [(0, 0, 0, 0)])
    rp = parts(1, [(0, 0, 1, 1), (0, 1, 2, 2)])
    e = explanations([True], [1], [[0, 0], [-1, -1]], [[0, -1]], [[1, 1], [-1, -1]], 2)
    e.edit_mask = np.zeros((1, 2, 4, 4), bool)
    e.edit_mask[0, 0, 0, :2] = e.edit_mask[0, 0, 1, 0] = True
    assert cf.summary(e)["edits_cells"] == 3
    got = part_metrics(e, qp, rp)
    assert got["near_kp"] == pytest.approx(1 / 3)
    assert got["part_iou"] == pytest.approx(1.0)  # {0} vs {0}
    assert got["misleading"] == pytest.approx(2 / 3)
