"""Estimators of fgvce_jax.shapley.estimate against closed forms, brute force and each other."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax import shapley
from fgvce_jax.errors import FgvceError
from fgvce_jax.shapley.estimate import plan, run_batch
from fgvce_jax.shapley.game import Game, as_game
from fgvce_jax.shapley.sharding import device_mesh

MC = ("permutation", "antithetic", "kernel")
KEY = jax.random.key(0)


def brute_force(v, n):
    """phi_j = sum_{S without j} |S|! (n-|S|-1)! / n! (v(S+j) - v(S)), in float64, v: tuple of bools -> float."""
    phi = np.zeros(n)
    for j in range(n):
        others = [i for i in range(n) if i != j]
        for r in range(n):
            w = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
            for s in itertools.combinations(others, r):
                m = np.zeros(n, bool)
                m[list(s)] = True
                with_j = m.copy()
                with_j[j] = True
                phi[j] += w * (v(with_j) - v(m))
    return phi


def on_one(game):
    """A batched jax game evaluated on one numpy mask, as a float."""
    return lambda m: float(game(jnp.asarray(m)[None])[0])


def softmax_game(n, seed=0, c=4):
    a = jax.random.normal(jax.random.key(seed), (n, c))
    return lambda m: jax.nn.softmax(m.astype(jnp.float32) @ a, axis=-1)[:, 0]


def mlp_game(n, seed=1, hidden=8):
    k1, k2 = jax.random.split(jax.random.key(seed))
    w1, w2 = jax.random.normal(k1, (n, hidden)), jax.random.normal(k2, (hidden,))
    return lambda m: jnp.tanh(m.astype(jnp.float32) @ w1) @ w2


N = 6
a = jnp.arange(1.0, N + 1)
TOY = {  # name: (game, closed-form phi)
    "additive": (lambda m: m.astype(jnp.float32) @ a, np.arange(1.0, N + 1)),
    "and": (lambda m: m[:, :3].all(-1).astype(jnp.float32), np.array([1 / 3] * 3 + [0.0] * (N - 3))),
    "symmetric": (lambda m: m.sum(-1).astype(jnp.float32) ** 2, np.full(N, N ** 2 / N)),
    "null_player": (lambda m: jnp.tanh(m[:, :-1].astype(jnp.float32) @ a[:-1] / 5), None),
}


@pytest.mark.parametrize("name", TOY)
def test_exact_matches_closed_forms(name):
    game, want = TOY[name]
    res = shapley.estimate(game, N, method="exact", budget=2 ** N, key=KEY)
    assert res.evaluations == 2 ** N
    if want is None:  # null player: 0 for the last player, the rest from brute force
        want = brute_force(on_one(game), N)
        assert abs(want[-1]) < 1e-12
    np.testing.assert_allclose(res.phi, want, atol=1e-6)


@pytest.mark.parametrize("method, budget, used", [
    ("exact", 2 ** N + 5, 2 ** N), ("permutation", 300, 294), ("antithetic", 300, 294), ("kernel", 301, 300)])
def test_efficiency_and_honest_evaluation_counts(method, budget, used):
    game = mlp_game(N)
    res = shapley.estimate(game, N, method=method, budget=budget, key=KEY)
    full, empty = game(jnp.ones((1, N), bool))[0], game(jnp.zeros((1, N), bool))[0]
    assert abs(float(res.phi.sum()) - float(full - empty)) < 1e-5 * max(1.0, abs(float(full)))
    assert res.evaluations == used


def test_null_player_gets_zero_from_permutation_methods():
    game = TOY["null_player"][0]
    for method in ("permutation", "antithetic"):
        assert float(shapley.estimate(game, N, method=method, budget=140, key=KEY).phi[-1]) == 0.0


@pytest.mark.parametrize("make", [softmax_game, mlp_game])
def test_exact_matches_brute_force_on_nonlinear_games(make):
    n = 7
    game = make(n)
    res = shapley.estimate(game, n, method="exact", budget=2 ** n, key=KEY)
    np.testing.assert_allclose(res.phi, brute_force(on_one(game), n), atol=1e-6)


def test_mc_methods_are_unbiased_and_converge():
    """Mean over R keys within 5 standard errors of exact; the RMS error falls as the budget grows 8x."""
    n, reps = 10, 64
    game = as_game(softmax_game(n, seed=3))
    exact = np.asarray(shapley.estimate(game, n, method="exact", budget=2 ** n, key=KEY).phi)
    keys = jax.random.split(jax.random.key(7), reps)
    mesh = device_mesh()

    def many(method, budget):  # the engine's batch over games: one run per key, in one compiled call
        est, units, u, chunks, _ = plan(method, n, budget, 64, reps, None, mesh)
        return np.asarray(run_batch(est, game.fn, (), keys, n_units=units, u=u, n_chunks=chunks, mesh=mesh))

    np.testing.assert_array_equal(many("permutation", 44)[5],
                                  shapley.estimate(game, n, method="permutation", budget=44, key=keys[5]).phi)
    for method, budget in [("permutation", 44), ("antithetic", 44), ("kernel", 82)]:
        small, big = many(method, budget), many(method, 8 * budget)
        se = small.std(axis=0, ddof=1) / np.sqrt(reps)
        if method != "kernel":  # KernelSHAP is consistent but only asymptotically unbiased
            assert np.all(np.abs(small.mean(0) - exact) <= 5 * se + 1e-6), method
        rms_small = np.sqrt(((small - exact) ** 2).mean())
        rms_big = np.sqrt(((big - exact) ** 2).mean())
        assert rms_big < 0.6 * rms_small, (method, rms_small, rms_big)


@pytest.mark.parametrize("method", ("exact",) + MC)
def test_chunk_size_and_device_count_do_not_change_results(method):
    n = 8
    game = mlp_game(n)
    budget = 2 ** n if method == "exact" else 400
    devices = jax.devices()
    assert len(devices) == 4
    one = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:1])
    ref = shapley.estimate(game, n, method=method, budget=budget, key=KEY, mesh=one).phi
    for chunk, mesh in [(1, one), (7, None), (10 ** 6, None)]:
        got = shapley.estimate(game, n, method=method, budget=budget, key=KEY, chunk_size=chunk, mesh=mesh).phi
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_same_key_is_bit_identical_and_other_keys_differ():
    game = mlp_game(8)
    r1 = shapley.estimate(game, 8, method="permutation", budget=90, key=KEY).phi
    r2 = shapley.estimate(game, 8, method="permutation", budget=90, key=KEY).phi
    r3 = shapley.estimate(game, 8, method="permutation", budget=90, key=jax.random.key(1)).phi
    assert np.array_equal(r1, r2) and not np.array_equal(r1, r3)


def _weighted_sum(args, masks):
    return jnp.tanh(masks.astype(jnp.float32) @ args["w"])


def test_new_game_arguments_do_not_recompile():
    n = 6
    shapley.estimate(Game(_weighted_sum, {"w": jnp.ones(n)}), n, method="permutation", budget=70, key=KEY)
    before = run_batch._cache_size()
    for s in range(3):
        w = jax.random.normal(jax.random.key(s), (n,))
        phi = shapley.estimate(Game(_weighted_sum, {"w": w}), n, method="permutation", budget=70, key=KEY).phi
        np.testing.assert_allclose(phi.sum(), jnp.tanh(w.sum()), atol=1e-5)  # efficiency with this w
    assert run_batch._cache_size() == before


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_players=21, method="exact", budget=2 ** 21), "at most 20"),
    (dict(n_players=5, method="exact", budget=31), "2\\^5 = 32"),
    (dict(n_players=5, method="permutation", budget=5), "at least 6"),
    (dict(n_players=5, method="antithetic", budget=11), "at least 12"),
    (dict(n_players=5, method="kernel", budget=3), "at least 4"),
    (dict(n_players=5, method="banzhaf", budget=100), "unknown Shapley method"),
    (dict(n_players=0, method="permutation", budget=100), "positive integer"),
])
def test_bad_requests_raise_clear_errors(kwargs, match):
    with pytest.raises(FgvceError, match=match):
        shapley.estimate(lambda m: m.sum(-1).astype(jnp.float32), key=KEY, **kwargs)


@pytest.mark.parametrize("game, match", [
    (lambda m: m.sum(-1), "returned int32"),
    (lambda m: m.astype(jnp.float32), "returned float32\\[2, 4\\]"),
    (lambda m: m.reshape(-1, 2, 2).astype(jnp.float32).sum((1, 2)) @ jnp.ones((3,)), "calling it failed"),
])
def test_bad_games_raise_clear_errors(game, match):
    with pytest.raises(FgvceError, match=match):
        shapley.estimate(game, 4, method="permutation", budget=50, key=KEY)


def test_game_refuses_non_boolean_masks():
    with pytest.raises(FgvceError, match="boolean"):
        Game(_weighted_sum, {"w": jnp.ones(3)})(jnp.ones((2, 3)))
