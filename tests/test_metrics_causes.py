"""Cause precision / recall (SPEC 10) and the rasterisation of part masks, on hand-built cases."""
import math

import numpy as np
import pytest
from fake_explanations import explanations

from fgvce_jax.errors import FgvceError
from fgvce_jax.metrics.causes import cause_metrics, cell_parts


def test_cell_parts_share_threshold():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0] = True  # 1 of the 4 pixels of cell (0, 0)
    masks[1, 2:4, 0:3] = True  # all of cell (1, 0), half of cell (1, 1)
    any_pixel = cell_parts(masks, (2, 2))
    np.testing.assert_array_equal(any_pixel[0], [[True, False], [False, False]])
    np.testing.assert_array_equal(any_pixel[1], [[False, False], [True, True]])
    np.testing.assert_array_equal(cell_parts(masks, (2, 2), 0.25)[0], np.zeros((2, 2), bool))  # 1/4 is not > 1/4
    np.testing.assert_array_equal(cell_parts(masks, (2, 2), 0.5)[1], [[False, False], [True, False]])  # 2/4
    np.testing.assert_array_equal(cell_parts(masks, (2, 2), 0.49)[1], [[False, False], [True, True]])


def test_cell_parts_uneven_cells_and_batch():
    # S = 5 onto 2 rows: pixel rows 0-1 (centres 0.5, 1.5 -> 0.2, 0.6) go to cell 0, rows 2-4 to cell 1
    masks = np.zeros((3, 1, 5, 5), bool)
    masks[0, 0, 1, 4] = True
    masks[1, 0, 2, 0] = True
    masks[2, 0, 2:5, 0:2] = True  # cell (1, 0) of a 2 x 2 grid holds rows 2-4 x cols 0-1: all 6 pixels
    out = cell_parts(masks, (2, 2), 0.0)
    assert out.shape == (3, 1, 2, 2)
    np.testing.assert_array_equal(out[0, 0], [[False, True], [False, False]])
    np.testing.assert_array_equal(out[1, 0], [[False, False], [True, False]])
    np.testing.assert_array_equal(cell_parts(masks, (2, 2), 0.9)[2, 0], [[False, False], [True, False]])
    np.testing.assert_array_equal(cell_parts(masks, (2, 2), 0.9)[1, 0], np.zeros((2, 2), bool))  # 1/6


def test_cell_parts_bad_input():
    with pytest.raises(FgvceError, match="S >= the grid"):
        cell_parts(np.zeros((1, 4, 4), bool), (8, 8))
    with pytest.raises(FgvceError, match="min_share"):
        cell_parts(np.zeros((1, 4, 4), bool), (2, 2), 1.0)


def _cells(*cells, grid=(4, 4)):
    out = np.zeros(grid, bool)
    for r, c in cells:
        out[r, c] = True
    return out


@pytest.fixture
def case():
    """Four queries on a 4 x 4 grid, 3 part types, region size 1 (numbers worked out in the tests)."""
    parts = np.zeros((4, 3, 4, 4), bool)
    parts[0, 0], parts[0, 1], parts[0, 2] = _cells((0, 0), (0, 1)), _cells((2, 2)), _cells((3, 3))
    parts[1, 2] = _cells((1, 1))
    parts[2, 0] = _cells((0, 0))
    parts[3, 0] = _cells((0, 0))  # part 1, its cause, is hidden
    cause = np.array([[1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]], bool)
    e = explanations(success=[1, 1, 0, 1], n_edits=[2, 1, 1, 1],
                     query_region=[[(0, 0), (1, 1)], [(1, 1), (-1, -1)], [(3, 0), (-1, -1)], [(0, 0), (-1, -1)]],
                     ref_split_index=[[0, 0], [0, -1], [0, -1], [0, -1]],
                     ref_region=[[(0, 0), (0, 0)], [(0, 0), (-1, -1)], [(0, 0), (-1, -1)], [(0, 0), (-1, -1)]])
    return e, parts, cause


def test_cause_metrics_hand_computed(case):
    e, parts, cause = case
    # query 0: edited (0,0) on cause 0, (1,1) on nothing; recall 1 of causes {0, 1}
    # query 1: edited (1,1) on cause 2; recall 1/1.  query 2 failed.  query 3: (0,0) on part 0, not a cause;
    # its cause is hidden, so it has no recall.  precision = (1 + 1 + 0) / (2 + 1 + 1)
    got = cause_metrics(e, parts, cause)
    assert got["cause_precision"] == pytest.approx(2 / 4)
    assert got["cause_recall"] == pytest.approx((1 / 2 + 1) / 2)
    # with the failed query 2: its edit (3,0) misses its cause 0
    got = cause_metrics(e, parts, cause, only_successful=False)
    assert got["cause_precision"] == pytest.approx(2 / 5)
    assert got["cause_recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_cause_metrics_region_window_and_edit_mask():
    parts = np.zeros((1, 2, 4, 4), bool)
    parts[0, 0] = _cells((1, 1))
    parts[0, 1] = _cells((3, 3))
    cause = np.array([[True, True]])
    # region size 3 at (0, 0): the window's cells inside the grid are (0,0), (0,1), (1,0), (1,1)
    e = explanations(success=[1], n_edits=[1], query_region=[[(0, 0)]], ref_split_index=[[0]],
                     ref_region=[[(1, 1)]], region_size=3)
    got = cause_metrics(e, parts, cause)
    assert got["cause_precision"] == pytest.approx(1 / 4)
    assert got["cause_recall"] == pytest.approx(1 / 2)  # part 1 at (3, 3) is untouched
    # the search wrote only (0, 0) of that window
    e.edit_mask = _cells((0, 0))[None, None]
    got = cause_metrics(e, parts, cause)
    assert got["cause_precision"] == 0.0 and got["cause_recall"] == 0.0


def test_cause_metrics_nothing_to_average(case):
    e, parts, cause = case
    e.success[:] = False
    got = cause_metrics(e, parts, cause)
    assert math.isnan(got["cause_precision"]) and math.isnan(got["cause_recall"])


def test_cause_metrics_bad_shapes(case):
    e, parts, cause = case
    with pytest.raises(FgvceError, match="query_parts must be"):
        cause_metrics(e, parts[:, :, :2], cause)
    with pytest.raises(FgvceError, match="cause must be"):
        cause_metrics(e, parts, cause[:, :2])


def test_cause_metrics_on_birds_masks():
    from fgvce_jax.data import birds

    ds = birds.load("test", samples_per_class=4)
    queries = [int(np.flatnonzero(ds.labels == 0)[0]), int(np.flatnonzero(ds.labels == 4)[0])]
    masks = np.stack([ds.part_masks(i) for i in queries])  # (2, 7, 64, 64)
    grid = (8, 8)
    cells = cell_parts(masks, grid)
    cause = birds.cause_parts(ds.labels[queries], [1, 0])  # 0 -> 1: the beak; 4 -> 0: the body
    beak, body = birds.PARTS.index("beak"), birds.PARTS.index("body")
    assert cause[:, beak].tolist() == [True, False] and cause[:, body].tolist() == [False, True]
    on_beak, off_body = tuple(np.argwhere(cells[0, beak])[0]), tuple(np.argwhere(~cells[1, body])[0])
    e = explanations(success=[1, 1], n_edits=[1, 1], query_region=[[on_beak], [off_body]], ref_split_index=[[0], [0]],
                     ref_region=[[(4, 4)], [(4, 4)]], grid=grid)
    got = cause_metrics(e, cells, cause)  # query 0 edits its beak, query 1 misses its body
    assert got["cause_precision"] == 0.5 and got["cause_recall"] == 0.5
