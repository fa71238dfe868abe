"""The benchmark game families of fgvce_jax.shapley.benchmark_games against brute-force `exact` and enumeration.

The real image games are read from ../shared/data/shapiq_image_games (skipped when absent). Precision: the
float64 Shapley values of a table (``table_shapley``) are checked against an independent numpy enumeration
to 1e-10; the table read as a game returns the table's float64 values bit for bit under
``jax.enable_x64``; the engine's ``exact`` (float32 by design) is checked to 1e-6.
"""
import itertools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from fgvce_jax import shapley
from fgvce_jax.errors import FgvceError
from fgvce_jax.shapley import benchmark_games as bg
from fgvce_jax.shapley.game import is_affine

KEY = jax.random.key(0)
TABLES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "shapiq_image_games"


def engine_exact(game, n):
    return np.asarray(shapley.estimate(game, n, method="exact", budget=2 ** n, key=KEY).phi, np.float64)


def assert_matches_exact(bm: bg.BenchmarkGame):
    scale = np.abs(bm.phi).max()
    assert scale > 1e-3  # not a vacuous comparison
    np.testing.assert_allclose(engine_exact(bm.game, bm.n_players), bm.phi, atol=2e-6 * max(1.0, scale))


# --------------------------------------------------------------------------- closed forms vs brute force
@pytest.mark.parametrize("n, n_terms, max_size", [(8, 12, 4), (10, 30, 10)])
def test_random_unanimity_closed_form_matches_exact(n, n_terms, max_size):
    bm = bg.random_unanimity(jax.random.key(n), n=n, n_terms=n_terms, max_size=max_size)
    assert bm.n_players == n and bm.phi.dtype == np.float64
    assert_matches_exact(bm)


def test_local_unanimity_closed_form_matches_exact():
    bm = bg.local_unanimity(jax.random.key(1), grid=(3, 3), windows=(2, 3))
    assert bm.n_players == 9
    assert_matches_exact(bm)


def test_window_terms_are_the_grid_windows():
    terms = bg.window_terms((3, 4), 2)
    assert terms.shape == (6, 12) and (terms.sum(1) == 4).all()
    np.testing.assert_array_equal(np.flatnonzero(terms[0]), [0, 1, 4, 5])
    np.testing.assert_array_equal(np.flatnonzero(terms[-1]), [6, 7, 10, 11])
    assert len(bg.local_unanimity(KEY).phi) == 196 and len(bg.window_terms((14, 14), 3)) == 144


@pytest.mark.parametrize("ops, fan_in", [(("or", "and"), (2, 4)), (("and", "or"), (1, 3)),
                                         (("or", "and", "or"), (1, 3)), (("and",), (10, 10))])
def test_tree_formula_matches_exact(ops, fan_in):
    bm = bg.random_tree(jax.random.key(3), n=10, ops=ops, fan_in=fan_in)
    assert_matches_exact(bm)


def test_tree_formula_on_overlapping_terms_equals_the_unanimity_closed_form():
    """Owen's quadrature and c_T / |T| are different routes; the 196-player terms overlap across roots."""
    rng = np.random.default_rng(0)
    terms = rng.random((60, 196)) < 0.03
    terms[~terms.any(1), 0] = True
    coef = rng.normal(size=60)
    via_tree = bg.tree_shapley([bg.Gate(terms, np.ones(60, bool))], coef, 196)
    np.testing.assert_allclose(via_tree, bg.unanimity_shapley(terms, coef), rtol=1e-12, atol=1e-14)


def test_product_of_ors_matches_inclusion_exclusion():
    """The docstring's example: phi_i = int (1-t)^(a_k - 1) prod_{j != k} (1 - (1-t)^a_j) dt
    = sum_{J subset of the other groups} (-1)^|J| / (a_k + sum_J a_j)."""
    sizes = [2, 3, 4]
    groups = np.zeros((3, 9), bool)
    groups[0, :2], groups[1, 2:5], groups[2, 5:] = True, True, True
    levels = [bg.Gate(groups, np.zeros(3, bool)), bg.Gate(np.ones((1, 3), bool), np.ones(1, bool))]
    phi = bg.tree_shapley(levels, [1.0], 9)
    for k, a in enumerate(sizes):
        others = [s for j, s in enumerate(sizes) if j != k]
        want = sum((-1) ** r * 1.0 / (a + sum(c)) for r in range(3) for c in itertools.combinations(others, r))
        np.testing.assert_allclose(phi[groups[k]], want, rtol=1e-13)
    assert math.isclose(phi.sum(), 1.0, rel_tol=1e-13)  # efficiency: v(N) - v(empty) = 1


@pytest.mark.parametrize("levels, coef, match", [
    ([bg.Gate(np.array([[1, 1, 0], [0, 0, 0]], bool), np.ones(2, bool))], [1.0, 1.0], "at least one input"),
    ([bg.Gate(np.array([[1, 1, 0], [0, 1, 1]], bool), np.ones(2, bool)),
      bg.Gate(np.ones((1, 2), bool), np.zeros(1, bool))], [1.0], "read-once"),
    ([bg.Gate(np.ones((2, 3), bool), np.ones(2, bool))], [1.0], "one entry per top-level gate"),
    ([bg.Gate(np.ones((2, 4), bool), np.ones(2, bool))], [1.0, 1.0], r"bool \(K, 3\)"),
])
def test_bad_trees_raise_clear_errors(levels, coef, match):
    with pytest.raises(FgvceError, match=match):
        bg.tree_game(levels, coef, 3)


# --------------------------------------------------------------------------- look-up tables
def brute_force_table(table_by_bits: np.ndarray, n: int) -> np.ndarray:
    """phi_j = sum_{S without j} w(|S|) (v(S + j) - v(S)), float64, S by its bits."""
    index = np.arange(2 ** n)
    size = np.array([bin(i).count("1") for i in index])
    phi = np.zeros(n)
    for j in range(n):
        without = index[(index >> j) & 1 == 0]
        w = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in size[without]])
        phi[j] = w @ (table_by_bits[without | (1 << j)] - table_by_bits[without])
    return phi


def test_a_shuffled_table_is_read_as_a_game():
    rng = np.random.default_rng(1)
    n = 5
    coalitions = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1).astype(bool)
    values = rng.normal(size=2 ** n)
    order = rng.permutation(2 ** n)
    game = bg.table_game(coalitions[order], values[order])
    np.testing.assert_allclose(np.asarray(game(jnp.asarray(coalitions))), values, rtol=1e-6)
    np.testing.assert_allclose(bg.table_shapley(coalitions[order], values[order]), brute_force_table(values, n),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(engine_exact(game, n), brute_force_table(values, n), atol=1e-5)


@pytest.mark.parametrize("rows, match", [("duplicate", "exactly once"), ("short", "needs 2"), ("wide", "n <= 24")])
def test_bad_tables_raise_clear_errors(rows, match):
    coalitions = ((np.arange(8)[:, None] >> np.arange(3)) & 1).astype(bool)
    values = np.zeros(8)
    if rows == "duplicate":
        coalitions[3] = coalitions[2]
    elif rows == "short":
        coalitions, values = coalitions[:7], values[:7]
    else:
        coalitions = np.zeros((8, 25), bool)
    with pytest.raises(FgvceError, match=match):
        bg.table_game(coalitions, values)


@pytest.mark.skipif(not TABLES.is_dir(), reason="needs ../shared/data/shapiq_image_games")
@pytest.mark.parametrize("stem", ["vit_9patches_01", "resnet18_14superpixels_01"])
def test_a_real_image_game_matches_its_table(stem):
    path = TABLES / f"{stem}.npz"
    bm = bg.load_table_game(path)
    with np.load(path) as data:
        coalitions, values, n = data["coalitions"], data["values"], int(data["n_players"])
    assert bm.n_players == n and bm.name == stem and values.dtype == np.float64
    by_bits = np.empty(2 ** n)
    by_bits[coalitions.astype(np.int64) @ (1 << np.arange(n))] = values
    np.testing.assert_allclose(bm.phi, brute_force_table(by_bits, n), rtol=0, atol=1e-10)  # float64 enumeration
    assert abs(bm.phi.sum() - (by_bits[-1] - by_bits[0])) < 1e-12  # efficiency
    with enable_x64():  # read as a game, the table gives back its float64 values exactly
        game64 = bg.table_game(coalitions, values)
        np.testing.assert_array_equal(np.asarray(game64(jnp.asarray(coalitions))), values)
    np.testing.assert_allclose(engine_exact(bm.game, n), bm.phi, rtol=0, atol=1e-6)  # the float32 engine


def test_load_table_game_reports_a_bad_file(tmp_path):
    np.savez(tmp_path / "t.npz", values=np.zeros(4))
    with pytest.raises(FgvceError, match="cannot read a coalition table"):
        bg.load_table_game(tmp_path / "t.npz")


# --------------------------------------------------------------------------- the affine softmax game
def size_share(game, n, key, per_size=16):
    """The share of v's variance explained by |S| (1 - mean within-size variance / variance), over
    ``per_size`` uniform coalitions of every size 0..n."""
    size = np.repeat(np.arange(n + 1), per_size)
    masks = jax.random.uniform(key, (len(size), n)).argsort(1).argsort(1) < size[:, None]
    v = np.asarray(game(masks), np.float64)
    return 1 - v.reshape(n + 1, per_size).var(1).mean() / v.var()


def test_affine_softmax_regimes():
    games = {r: bg.affine_softmax_game(jax.random.key(2), r, grid=(6, 6), channels=64, classes=10)
             for r in bg.REGIMES}
    for game in games.values():
        assert is_affine(game.fn) and game.args["contrib"].shape == (36, 10)
        full = float(game(jnp.ones((1, 36), bool))[0])
        assert 1 / 10 < full < 1  # the explained class is the one predicted on the whole map
    independent, size = (size_share(games[r], 36, jax.random.key(4)) for r in bg.REGIMES)
    assert size > 0.95 and independent < 0.6, (size, independent)
    with pytest.raises(FgvceError, match="unknown regime"):
        bg.affine_softmax_game(KEY, "other")
