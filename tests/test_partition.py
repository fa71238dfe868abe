"""Saliency partition (SPEC 4) against a plain-Python NMS written here."""
import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax.counterfactual import partition


def nms_reference(phi, r, k):
    """Plain-Python NMS: list of (center, cells (H, W) bool, score), in the order found."""
    h, w = phi.shape
    free = np.ones((h, w), bool)
    out = []
    while len(out) < k and free.any():
        best = max(((phi[i, j], i, j) for i in range(h) for j in range(w) if free[i, j]),
                   key=lambda t: (t[0], -t[1] * w - t[2]))
        if best[0] <= 0:
            break
        _, i, j = best
        cells = np.zeros((h, w), bool)
        for a in range(i - (r - 1) // 2, i + r // 2 + 1):
            for b in range(j - (r - 1) // 2, j + r // 2 + 1):
                if 0 <= a < h and 0 <= b < w and free[a, b]:
                    cells[a, b] = True
        free &= ~cells
        out.append(((i, j), cells, float(phi[cells].sum())))
    return out


@pytest.mark.parametrize("r,k", [(1, 5), (2, 4), (3, 6), (3, 30)])
def test_matches_reference(r, k):
    rng = np.random.default_rng(r * 100 + k)
    phi = rng.normal(size=(3, 6, 5)).astype(np.float32)
    got = partition(jnp.asarray(phi), region_size=r, max_regions=k)
    assert got.center.shape == (3, k, 2) and got.cells.shape == (3, k, 6, 5)
    for n in range(3):
        ref = nms_reference(phi[n], r, k)
        assert int(got.valid[n].sum()) == len(ref)
        assert not np.any(np.asarray(got.valid[n])[len(ref):])  # valid ones come first
        for slot, (center, cells, score) in enumerate(ref):
            assert tuple(np.asarray(got.center[n, slot])) == center
            np.testing.assert_array_equal(np.asarray(got.cells[n, slot]), cells)
            np.testing.assert_allclose(float(got.score[n, slot]), score, rtol=1e-5, atol=1e-6)
        # Regions never overlap and every region centre has positive Phi.
        assert np.asarray(got.cells[n]).sum(0).max() <= 1
        centers = np.asarray(got.center[n])[np.asarray(got.valid[n])]
        assert np.all(phi[n][centers[:, 0], centers[:, 1]] > 0)


def test_no_positive_phi_gives_no_regions():
    phi = -np.abs(np.random.default_rng(0).normal(size=(2, 4, 4))).astype(np.float32)
    phi[1] = 0.0
    got = partition(jnp.asarray(phi), region_size=3, max_regions=4)
    assert not np.any(np.asarray(got.valid))
    assert not np.any(np.asarray(got.cells))
    assert np.all(np.asarray(got.center) == -1)


def test_full_cover_stops_before_k():
    """A 3x3 window on a positive 3x3 map covers it: one region, however large K is."""
    phi = np.ones((1, 3, 3), np.float32)
    phi[0, 1, 1] = 5.0
    got = partition(jnp.asarray(phi), region_size=3, max_regions=5)
    assert np.asarray(got.valid).tolist() == [[True, False, False, False, False]]
    assert float(got.score[0, 0]) == pytest.approx(13.0)
    assert tuple(np.asarray(got.center[0, 0])) == (1, 1)


def test_batch_invariance():
    phi = np.random.default_rng(1).normal(size=(4, 5, 5)).astype(np.float32)
    whole = partition(jnp.asarray(phi), region_size=2, max_regions=6)
    for n in range(4):
        one = partition(jnp.asarray(phi[n:n + 1]), region_size=2, max_regions=6)
        for a, b in zip(whole, one):
            np.testing.assert_array_equal(np.asarray(a)[n], np.asarray(b)[0])
