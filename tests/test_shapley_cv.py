"""Variance reduction at no extra evaluations: the rank control variate of permutation_cv / antithetic_cv."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_shapley import KEY, affine_game, elementwise_game, mlp_game, softmax_game

from fgvce_jax import shapley
from fgvce_jax.errors import FgvceError
from fgvce_jax.shapley.estimate import plan, run_batch
from fgvce_jax.shapley.game import Game, as_game
from fgvce_jax.shapley.permutation_cv import pooled, rank_counts
from fgvce_jax.shapley.sharding import device_mesh

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
    """Mean over 64 keys within 5 standard errors of exact (U = 4 permutations: leave-one-out is exact
    even so); every run's values sum to v(N) - v(empty)."""
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


@pytest.mark.parametrize("method", CV)
@pytest.mark.parametrize("game_kind", ["elementwise", "affine"])
def test_bit_identical_across_devices_and_chunk_sizes(method, game_kind):
    n = 8
    game = {"elementwise": elementwise_game(n), "affine": affine_game(n)}[game_kind]
    meshes = [jax.make_mesh((d,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:d])
              for d in (1, 2, 4)]
    ref = np.asarray(shapley.estimate(game, n, method=method, budget=400, key=KEY, mesh=meshes[0]).phi)
    for chunk in (None, 10 ** 6, 7, 1):
        for mesh in meshes:
            got = shapley.estimate(game, n, method=method, budget=400, key=KEY, chunk_size=chunk, mesh=mesh).phi
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
