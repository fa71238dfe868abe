"""Variance reduction at no extra evaluations: the rank control variate (permutation_cv, antithetic_cv) and
local's size-stratified draws (stratified=True)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_saliency import LIN_PARAMS, Z, LinearSplit
from test_saliency import H as SH
from test_saliency import W as SW
from test_shapley import KEY, affine_game, elementwise_game, mlp_game, softmax_game
from test_shapley_local import affine_game as local_affine_game
from test_shapley_local import per_window_reference, sigmoid_game

from fgvce_jax import saliency, shapley
from fgvce_jax.errors import FgvceError
from fgvce_jax.shapley.estimate import plan, run_batch
from fgvce_jax.shapley.game import Game, as_game, is_affine
from fgvce_jax.shapley.local import plan as local_plan
from fgvce_jax.shapley.local import run_batch as run_local
from fgvce_jax.shapley.permutation_cv import pooled, rank_counts
from fgvce_jax.sharding import device_mesh

CV = ("permutation_cv", "antithetic_cv")
PLAIN = {"permutation_cv": "permutation", "antithetic_cv": "antithetic"}


def many(game, n, method, budget, reps, seed=7):
    """phi (reps, n): one run per key through the engine's batch of games, in one compiled call."""
    game = as_game(game)
    mesh = device_mesh()
    p = plan(method, n, budget, 64, reps, None, mesh)
    keys = jax.random.split(jax.random.key(seed), reps)
    args = jax.tree.map(lambda a: jnp.broadcast_to(a, (reps, *jnp.shape(a))), game.args)
    return np.asarray(run_batch(p.est, game.fn, args, keys, n_units=p.n_units, u=p.u, n_chunks=p.n_chunks,
                                mesh=mesh, r=p.r), np.float64)


def size_game(n, seed=0):
    """v(S) = sigmoid(8 (|S| - n/2) / n) + sum_{j in S} w_j: phi_j = (f(n) - f(0)) / n + w_j in closed form,
    and the marginals depend on the rank far more than on the player (a size-dominated game)."""
    w = 0.01 * jax.random.normal(jax.random.key(seed), (n,))
    f = lambda s: jax.nn.sigmoid(8.0 * (s - n / 2) / n)  # noqa: E731
    phi = (f(float(n)) - f(0.0)) / n + np.asarray(w, np.float64)
    return (lambda m: f(m.sum(-1).astype(jnp.float32)) + m.astype(jnp.float32) @ w), phi


def test_rank_counts_and_pooling():
    ranks = jnp.array([[0, 2, 1], [2, 1, 0], [0, 2, 1]])
    counts = rank_counts(ranks, jnp.array([True, True, False]))
    np.testing.assert_array_equal(counts, [[1, 0, 1], [0, 1, 1], [1, 1, 0]])
    x = jax.random.normal(KEY, (100,))
    k = np.asarray(jax.vmap(pooled)(jnp.eye(100)))  # rows: K e_i, i.e. K's columns
    np.testing.assert_allclose(k, k.T, atol=1e-7)  # symmetric ...
    np.testing.assert_allclose(k.sum(1), 1.0, atol=1e-6)  # ... columns (so rows) sum to 1: sum(K x) = sum(x)
    np.testing.assert_allclose(float(pooled(x).sum()), float(x.sum()), atol=1e-4)
    assert np.count_nonzero(k[50]) == 2 * (100 // 24) + 1


@pytest.mark.parametrize("method", CV)
def test_unbiased_and_efficient_on_a_nonlinear_ten_player_game(method):
    """Mean over 64 keys within 5 standard errors of exact (with U = 4 units: leave-one-out is unbiased at
    any U >= 2); every run's values sum to v(N) - v(empty)."""
    n, reps = 10, 64
    game = softmax_game(n, seed=3)
    exact = np.asarray(shapley.estimate(game, n, method="exact", budget=2 ** n, key=KEY).phi)
    runs = many(game, n, method, 4 * (n + 1) * (2 if method == "antithetic_cv" else 1), reps)
    se = runs.std(0, ddof=1) / np.sqrt(reps)
    assert np.all(np.abs(runs.mean(0) - exact) <= 5 * se + 1e-6)
    gap = float(game(jnp.ones((1, n), bool))[0] - game(jnp.zeros((1, n), bool))[0])
    np.testing.assert_allclose(runs.sum(1), gap, atol=1e-5)


@pytest.mark.parametrize("method", CV)
def test_error_shrinks_with_budget_and_beats_plain_on_a_size_dominated_game(method):
    n, reps = 48, 16
    game, phi = size_game(n)
    per = (n + 1) * (2 if method == "antithetic_cv" else 1)
    err = lambda r: np.sqrt(((r - phi) ** 2).sum(1).mean()) / np.linalg.norm(phi)  # noqa: E731
    small, big = err(many(game, n, method, 8 * per, reps)), err(many(game, n, method, 64 * per, reps))
    plain = err(many(game, n, PLAIN[method], 8 * per, reps))
    assert big < 0.6 * small, (small, big)
    assert small < 0.25 * plain, (small, plain)  # the rank variate removes the size term


def test_antithetic_cv_is_not_worse_than_antithetic_where_the_rank_does_not_matter():
    """On the 196-player CUB game with independent contributions the mean marginal hardly depends on the rank,
    so the control variate can only add noise; at 2 units (1,000 evaluations) a fixed coefficient 1 gave 1.15x
    antithetic's MSE over 40 seeds. The estimated coefficient keeps it at antithetic's (1.01x measured), and on
    the size-dominated game it still removes more than half the MSE (0.43x measured)."""
    from fgvce_jax.shapley.benchmark_games import affine_softmax_game

    ratio = {}
    for regime in ("independent", "size_dominated"):
        game = affine_softmax_game(jax.random.key(0), regime)
        ref = np.asarray(shapley.estimate(game, 196, method="antithetic_cv", budget=2_000_000, key=KEY).phi)
        mse = {m: np.mean([np.sum((np.asarray(shapley.estimate(game, 196, method=m, budget=1000,
                                                                key=jax.random.key(s)).phi) - ref) ** 2)
                           for s in range(40)]) for m in ("antithetic", "antithetic_cv")}
        ratio[regime] = mse["antithetic_cv"] / mse["antithetic"]
    assert ratio["independent"] < 1.06 and ratio["size_dominated"] < 0.6, ratio


@pytest.mark.parametrize("method", CV)
@pytest.mark.parametrize("game_kind", ["elementwise", "affine"])
def test_bit_identical_across_devices_and_chunk_sizes(method, game_kind):
    n = 8
    game = {"elementwise": elementwise_game(n), "affine": affine_game(n)}[game_kind]
    meshes = [jax.make_mesh((d,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:d])
              for d in (1, 2, 4)]
    ref = np.asarray(shapley.estimate(game, n, method=method, budget=400, key=KEY, mesh=meshes[0]).phi)
    for chunk, mesh in [(None, meshes[2]), (7, meshes[1]), (1, meshes[2])]:
        got = shapley.estimate(game, n, method=method, budget=400, key=KEY, chunk_size=chunk, mesh=mesh).phi
        if game_kind == "affine" and chunk is not None:  # anchors: matmul rows in calls of <= chunk_size rows,
            # which XLA rounds differently below 64 rows (docs/shapley.md); the device count changes no bit
            np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-7, err_msg=f"chunk_size={chunk}")
        else:
            np.testing.assert_array_equal(np.asarray(got), ref, err_msg=f"chunk_size={chunk}, {mesh.size} devices")


@pytest.mark.parametrize("method", CV)
def test_affine_fast_path_matches_generic_path(method):
    n = 60
    game = affine_game(n, c=20)
    game.args["contrib"] = game.args["contrib"] * 0.1
    fast = shapley.estimate(game, n, method=method, budget=4 * (n + 1) * 6, key=KEY).phi
    generic = shapley.estimate(lambda m: game(m), n, method=method, budget=4 * (n + 1) * 6, key=KEY).phi
    np.testing.assert_allclose(fast, generic, rtol=0, atol=1e-5)


def test_second_call_does_not_recompile():
    def weighted(args, masks):
        return jnp.tanh((masks.astype(jnp.float32) * args["w"]).sum(-1))

    n = 6
    for method in CV:
        shapley.estimate(Game(weighted, {"w": jnp.ones(n)}), n, method=method, budget=100, key=KEY)
        before = run_batch._cache_size()
        w = jax.random.normal(jax.random.key(1), (n,))
        phi = shapley.estimate(Game(weighted, {"w": w}), n, method=method, budget=100, key=jax.random.key(2)).phi
        assert run_batch._cache_size() == before
        np.testing.assert_allclose(float(phi.sum()), float(jnp.tanh(w.sum())), atol=1e-5)


@pytest.mark.parametrize("method, budget", [("permutation_cv", 11), ("antithetic_cv", 23)])
def test_at_least_two_units(method, budget):
    with pytest.raises(FgvceError, match="at least"):
        shapley.estimate(mlp_game(5), 5, method=method, budget=budget, key=KEY)


# --- local: size-stratified draws (the ideal size control variate) ---------------------------------------

def local_runs(game, grid, samples, paired, stratified, reps, args=()):
    """Phi (reps, H, W) of ``local`` (3 x 3 windows, outside absent) from ``reps`` keys in one compiled call."""
    mesh = device_mesh()
    draws = samples // 2 if paired else samples
    p = local_plan(grid, 3, draws, "absent", paired, reps, 64, None, mesh, affine=is_affine(game),
                   stratified=stratified)
    keys = jax.random.split(jax.random.key(11), reps)
    args = jax.tree.map(lambda a: jnp.broadcast_to(a, (reps, *jnp.shape(a))), args)
    return np.asarray(run_local(game, args, keys, p, mesh=mesh), np.float64)


def window_size_game(grid, seed=0):
    """sigmoid(2 (|S| - 3)) + a small additive part: within a 3 x 3 window the marginal is mostly a function
    of |S| (a probability saturating with the number of present positions)."""
    a = 0.02 * jax.random.normal(jax.random.key(seed), grid)
    return lambda m: jax.nn.sigmoid(2.0 * (m.sum((1, 2)) - 3.0)) + (a * m).sum((1, 2))


@pytest.mark.parametrize("paired", [True, False])
def test_stratified_local_is_unbiased_for_each_window(paired):
    grid, reps = (3, 4), 48
    game = sigmoid_game(grid)
    runs = local_runs(lambda args, m: game(m), grid, 6, paired, True, reps)  # 3 or 6 strata over 9 sizes
    ref = per_window_reference(game, grid, 3, "absent")
    se = runs.std(0, ddof=1) / np.sqrt(reps)
    assert np.all(np.abs(runs.mean(0) - ref) <= 5 * se + 1e-6)


@pytest.mark.parametrize("paired", [True, False])
def test_stratified_local_has_lower_error_on_a_size_dominated_game(paired):
    grid, reps = (4, 4), 16
    game = window_size_game(grid)
    ref = per_window_reference(game, grid, 3, "absent")
    err = {s: np.sqrt(((local_runs(lambda args, m: game(m), grid, 16, paired, s, reps) - ref) ** 2).mean())
           for s in (False, True)}
    assert err[True] < 0.5 * err[False], err


@pytest.mark.parametrize("affine", [False, True])
def test_stratified_local_is_bit_identical_across_chunks_and_devices(affine):
    grid = (5, 6)
    game = local_affine_game(grid, "prob") if affine else sigmoid_game(grid)
    meshes = [jax.make_mesh((d,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:d])
              for d in (1, 4)]
    kw = dict(kernel=3, samples=6, key=KEY, stratified=True)
    ref = shapley.local(game, grid, mesh=meshes[0], **kw)
    for chunk, mesh in [(None, meshes[1]), (4, meshes[0]), (1, meshes[1])]:
        np.testing.assert_array_equal(shapley.local(game, grid, chunk_size=chunk, mesh=mesh, **kw), ref)
    assert not np.array_equal(ref, shapley.local(game, grid, mesh=meshes[0], **{**kw, "stratified": False}))


@pytest.mark.parametrize("paired", [True, False])
def test_stratified_local_affine_path_equals_generic_path(paired):
    grid = (5, 6)
    game = local_affine_game(grid, "prob")
    kw = dict(kernel=3, samples=4, key=KEY, paired=paired, stratified=True)
    np.testing.assert_allclose(shapley.local(game, grid, **kw), shapley.local(lambda m: game(m), grid, **kw),
                               rtol=1e-5, atol=1e-6)


def test_saliency_compute_passes_stratified_to_local():
    classes = jnp.array([0, 3])
    phi = saliency.compute(LinearSplit(), LIN_PARAMS, Z[:2], None, classes, kernel=3, samples=4, key=KEY,
                           stratified=True)
    for i in range(2):
        game = shapley.feature_game(LinearSplit(), LIN_PARAMS, Z[i], None, classes[i])
        want = shapley.local(game, (SH, SW), kernel=3, samples=4, key=jax.random.fold_in(KEY, i), stratified=True)
        np.testing.assert_allclose(phi[i], want, atol=1e-6)
