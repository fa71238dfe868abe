"""Estimators of fgvce_jax.shapley.estimate against closed forms, brute force and each other."""
import importlib
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax import shapley
from fgvce_jax.errors import FgvceError
from fgvce_jax.shapley.estimate import plan, run_batch
from fgvce_jax.shapley.game import Game, LinearHead, as_game
from fgvce_jax.sharding import device_mesh

MC = ("permutation", "antithetic", "kernel", "leverage")
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
    ("exact", 2 ** N + 5, 2 ** N), ("permutation", 60, 56), ("antithetic", 60, 56), ("kernel", 61, 60),
    ("leverage", 61, 60)])  # budgets below 2^N = 64, which would be exact
def test_efficiency_and_honest_evaluation_counts(method, budget, used):
    game = mlp_game(N)
    res = shapley.estimate(game, N, method=method, budget=budget, key=KEY)
    full, empty = game(jnp.ones((1, N), bool))[0], game(jnp.zeros((1, N), bool))[0]
    assert abs(float(res.phi.sum()) - float(full - empty)) < 1e-5 * max(1.0, abs(float(full)))
    assert res.evaluations == used


def test_null_player_gets_zero_from_permutation_methods():
    game = TOY["null_player"][0]
    for method in ("permutation", "antithetic"):
        assert float(shapley.estimate(game, N, method=method, budget=63, key=KEY).phi[-1]) == 0.0


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
        p = plan(method, n, budget, 64, reps, None, mesh)
        return np.asarray(run_batch(p.est, game.fn, (), keys, n_units=p.n_units, u=p.u, n_chunks=p.n_chunks,
                                    mesh=mesh, r=p.r))

    # one game of the batch is the game run alone, to float32 rounding (a batch of 64 games is another shape)
    np.testing.assert_allclose(many("permutation", 44)[5],
                               shapley.estimate(game, n, method="permutation", budget=44, key=keys[5]).phi,
                               rtol=1e-5, atol=1e-7)
    for method, budget in [("permutation", 44), ("antithetic", 44), ("kernel", 82)]:
        small, big = many(method, budget), many(method, 8 * budget)
        se = small.std(axis=0, ddof=1) / np.sqrt(reps)
        if method != "kernel":  # KernelSHAP is consistent but only asymptotically unbiased
            assert np.all(np.abs(small.mean(0) - exact) <= 5 * se + 1e-6), method
        rms_small = np.sqrt(((small - exact) ** 2).mean())
        rms_big = np.sqrt(((big - exact) ** 2).mean())
        assert rms_big < 0.6 * rms_small, (method, rms_small, rms_big)


def _one_device_mesh():
    devices = jax.devices()
    assert len(devices) == 4
    return jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:1])


def affine_game(n, c=5, seed=2, output="prob"):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return Game(LinearHead(output), {"contrib": jax.random.normal(k1, (n, c)), "offset": jax.random.normal(k2, (c,)),
                                     "cls": jnp.int32(1)})


def elementwise_game(n, seed=5):
    """A nonlinear game with no matmul: sigmoid(sum_j a_j m_j + sum_j b_j m_j m_j+1), whose rows XLA
    computes the same way at any batch size."""
    ka, kb = jax.random.split(jax.random.key(seed))
    a, b = jax.random.normal(ka, (n,)), jax.random.normal(kb, (n - 1,))

    def game(m):
        m = m.astype(jnp.float32)
        return jax.nn.sigmoid((a * m).sum(-1) + (b * m[:, 1:] * m[:, :-1]).sum(-1))
    return game


@pytest.mark.parametrize("method", ("exact",) + MC)
@pytest.mark.parametrize("game_kind", ["mlp", "elementwise", "affine"])
def test_chunk_size_and_device_count_do_not_change_results(method, game_kind):
    """Bit-identical (not just close) on 1, 2 and 4 devices, for chunk sizes default, huge, 7 and 1.

    A small chunk_size really makes the game calls smaller; a game evaluated by a matmul gets rows of a
    tiny batch rounded differently by XLA, so for those small chunks are only checked to float tolerance."""
    n = 8
    game = {"mlp": mlp_game(n), "elementwise": elementwise_game(n), "affine": affine_game(n)}[game_kind]
    budget = 2 ** n if method == "exact" else 200  # below 2^n: sampled
    meshes = [jax.make_mesh((d,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:d])
              for d in (1, 2, 4)]
    ref = np.asarray(shapley.estimate(game, n, method=method, budget=budget, key=KEY, mesh=meshes[0]).phi)
    for chunk in (None, 10 ** 6, 7, 1):
        for mesh in meshes:
            got = np.asarray(shapley.estimate(game, n, method=method, budget=budget, key=KEY, chunk_size=chunk,
                                              mesh=mesh).phi)
            matmul = game_kind == "mlp" or (game_kind == "affine" and method not in ("permutation", "antithetic"))
            if matmul and chunk in (1, 7):
                np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(got, ref, err_msg=f"chunk_size={chunk}, {mesh.size} devices")


def test_chunk_size_bounds_the_game_calls():
    """chunk_size is a memory bound: the game is called on at most that many evaluations at once."""
    def batch_sizes(method, n, budget, chunk_size):  # a fresh game each time, so that it is traced again
        seen = []

        def game(m):
            seen.append(m.shape[0])
            return m.sum(-1).astype(jnp.float32)
        shapley.estimate(game, n, method=method, budget=budget, key=KEY, chunk_size=chunk_size)
        return seen[1:]  # the first call is check_game's (B = 2)

    for method, n, budget in [("permutation", 10, 700), ("kernel", 10, 702), ("exact", 9, 512)]:
        small, default = batch_sizes(method, n, budget, 14), batch_sizes(method, n, budget, None)
        assert small and max(small) <= 14 < max(default), (method, small, default)


@pytest.mark.parametrize("method", ("exact",) + MC)
def test_batches_of_games_are_bit_identical_across_chunk_sizes_and_devices(method):
    """run_batch over 3 games (affine and not) with many reduction blocks: bit-identical on 1 and 4 devices."""
    n, reps = 10, 3
    budget = 2 ** n if method == "exact" else 1000  # below 2^n: sampled
    keys = jax.random.split(jax.random.key(3), reps)
    one, four = _one_device_mesh(), device_mesh()
    contrib = jax.random.normal(jax.random.key(4), (reps, n, 6))
    affine = LinearHead("prob"), {"contrib": contrib, "offset": jnp.zeros((reps, 6)), "cls": jnp.arange(reps)}
    generic = _weighted_sum, {"w": contrib[..., 0]}
    for fn, args in (affine, generic):
        def run(chunk, mesh, fn=fn, args=args):
            p = plan(method, n, budget, 64, reps, chunk, mesh)
            return np.asarray(run_batch(p.est, fn, args, keys, n_units=p.n_units, u=p.u, n_chunks=p.n_chunks,
                                        mesh=mesh, r=p.r))
        ref = run(None, one)
        for chunk, mesh in [(None, four), (10 ** 6, one), (10 ** 6, four)]:
            np.testing.assert_array_equal(run(chunk, mesh), ref)
        for chunk, mesh in [(1, four), (7, one)]:  # smaller game calls: the same sums, rows may round apart
            np.testing.assert_allclose(run(chunk, mesh), ref, rtol=1e-5, atol=1e-6)


def test_many_reduction_blocks_stay_bit_identical(monkeypatch):
    """Force tiny STATS_BYTES so that R > E (several game calls per kept block sum) and many block sums."""
    engine = importlib.import_module("fgvce_jax.shapley.estimate")
    n = 12  # 2^n > 3000: sampled, not exact
    game = mlp_game(n)
    one = _one_device_mesh()
    ref = np.asarray(shapley.estimate(game, n, method="kernel", budget=3000, key=KEY, mesh=one).phi)
    monkeypatch.setattr(engine, "STATS_BYTES", 4 * n * 3)  # 3 block sums
    monkeypatch.setattr(engine, "MIN_BLOCKS", 64)  # of about 21 game calls each
    p = plan("kernel", n, 3000, 64, 1, None, device_mesh())
    assert p.r > p.u and p.r == engine.reduction_block(p.est, p.n_units, p.u)
    got = [np.asarray(shapley.estimate(game, n, method="kernel", budget=3000, key=KEY, mesh=mesh).phi)
           for mesh in (one, None)]
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_allclose(got[0], ref, rtol=1e-5, atol=1e-6)  # another summation tree: close, not equal


@pytest.mark.parametrize("method", MC)
@pytest.mark.parametrize("bytes_per_evaluation", [2384, 12_845_056])  # CUB layer4 fast path; ResNet-50 generic head
def test_ten_million_evaluations_keep_little_statistics(method, bytes_per_evaluation):
    """Kept float statistics (block sums + one reduction block's per-unit buffer) of a 10M-evaluation request."""
    engine = importlib.import_module("fgvce_jax.shapley.estimate")
    n = 196
    est, units, e, _, used, r = plan(method, n, 10 ** 7, bytes_per_evaluation, 1, None, device_mesh())
    per_unit = 4 * sum(np.prod(s.shape) for s in jax.tree.leaves(engine._stat_shapes(est)))
    kept = (math.ceil(units / r) + r) * per_unit
    assert used > 0.99 * 10 ** 7 and r % e == 0 and kept <= 100 * 2 ** 20, (e, r, kept)


def test_tree_sum_does_not_depend_on_surrounding_shapes():
    from fgvce_jax.shapley.estimate import tree_sum
    x = jax.random.normal(KEY, (6, 37, 11)) * 1e3
    whole = np.asarray(jax.jit(jax.vmap(tree_sum))(x))
    for i in range(6):
        np.testing.assert_array_equal(np.asarray(jax.jit(tree_sum)(x[i])), whole[i])
    np.testing.assert_array_equal(np.asarray(jax.jit(tree_sum)(x[0, :5])),
                                  np.asarray(((x[0, 0] + x[0, 4]) + x[0, 2]) + (x[0, 1] + x[0, 3])))


@pytest.mark.parametrize("method", ["permutation", "antithetic"])
@pytest.mark.parametrize("output", ["prob", "logit", "log_prob"])
def test_affine_fast_path_matches_generic_path(method, output):
    n = 196
    game = affine_game(n, c=20, output=output)
    game.args["contrib"] = game.args["contrib"] * 0.1
    hidden = lambda m: game(m)  # the same game with its structure hidden: the generic path
    budget = 2 * (n + 1) * 6
    fast = shapley.estimate(game, n, method=method, budget=budget, key=KEY).phi
    generic = shapley.estimate(hidden, n, method=method, budget=budget, key=KEY).phi
    np.testing.assert_allclose(fast, generic, rtol=0, atol=1e-5)
    assert not np.array_equal(fast, generic) or output == "logit"  # really two paths (logit may agree exactly)


def test_permutation_ranks_are_permutations_even_with_ties():
    from fgvce_jax.shapley.permutation import order_of, uniform_ranks
    u = jnp.array([0.5, 0.25, 0.5, 0.25, 0.1])
    rank = uniform_ranks(u)
    np.testing.assert_array_equal(rank, [3, 1, 4, 2, 0])
    np.testing.assert_array_equal(order_of(rank), [4, 1, 3, 0, 2])
    u = jax.random.uniform(KEY, (300,))
    np.testing.assert_array_equal(uniform_ranks(u), (u[None, :] < u[:, None]).sum(1))


def test_same_key_is_bit_identical_and_other_keys_differ():
    game = mlp_game(8)
    r1 = shapley.estimate(game, 8, method="permutation", budget=90, key=KEY).phi
    r2 = shapley.estimate(game, 8, method="permutation", budget=90, key=KEY).phi
    r3 = shapley.estimate(game, 8, method="permutation", budget=90, key=jax.random.key(1)).phi
    assert np.array_equal(r1, r2) and not np.array_equal(r1, r3)


def _weighted_sum(args, masks):  # elementwise and a row sum, no matmul: the same rows at any batch size
    return jnp.tanh((masks.astype(jnp.float32) * args["w"]).sum(-1))


@pytest.mark.parametrize("method, n, budget", [("permutation", 6, 63), ("leverage", 12, 300),
                                               ("stratified_kernel", 12, 300)])
def test_new_game_arguments_do_not_recompile(method, n, budget):
    shapley.estimate(Game(_weighted_sum, {"w": jnp.ones(n)}), n, method=method, budget=budget, key=KEY)
    before = run_batch._cache_size()
    for s in range(3):
        w = jax.random.normal(jax.random.key(s), (n,))
        phi = shapley.estimate(Game(_weighted_sum, {"w": w}), n, method=method, budget=budget, key=KEY).phi
        np.testing.assert_allclose(phi.sum(), jnp.tanh(w.sum()), atol=1e-5)  # efficiency with this w
    assert run_batch._cache_size() == before


@pytest.mark.parametrize("kwargs, match", [
    ({"n_players": 21, "method": "exact", "budget": 2 ** 21}, "at most 20"),
    ({"n_players": 5, "method": "exact", "budget": 31}, "2\\^5 = 32"),
    ({"n_players": 5, "method": "permutation", "budget": 5}, "at least 6"),
    ({"n_players": 5, "method": "antithetic", "budget": 11}, "at least 12"),
    ({"n_players": 5, "method": "kernel", "budget": 3}, "at least 14"),
    ({"n_players": 5, "method": "banzhaf", "budget": 100}, "unknown Shapley method"),
    ({"n_players": 0, "method": "permutation", "budget": 100}, "positive integer"),
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


def test_a_checked_game_is_not_traced_again_for_new_arguments():
    traced = []

    def fn(args, masks):
        traced.append(masks.shape)
        return (masks.astype(jnp.float32) * args["w"]).sum(-1)

    n = 5
    first = shapley.estimate(Game(fn, {"w": jnp.ones(n)}), n, method="permutation", budget=30, key=KEY).phi
    assert (2, n) in traced  # check_game traced it once
    traced.clear()
    second = shapley.estimate(Game(fn, {"w": 2 * jnp.ones(n)}), n, method="permutation", budget=30, key=KEY).phi
    assert traced == []  # neither check_game nor the engine traced it again
    np.testing.assert_allclose(second, 2 * first, rtol=1e-6)
    with pytest.raises(FgvceError, match="bool\\[B, 4\\]"):  # another shape is checked afresh
        shapley.estimate(Game(fn, {"w": jnp.ones(n)}), 4, method="permutation", budget=30, key=KEY)



def test_a_ten_million_evaluation_request_runs_in_bounded_memory(tmp_path):
    """The whole request, in a fresh process: 10^7 evaluations of a 196-player, 200-class affine game."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "ten_million.py"
    script.write_text(
        "import json, re, jax, jax.numpy as jnp\n"
        "from fgvce_jax import shapley\n"
        "from fgvce_jax.shapley.game import Game, LinearHead\n"
        "c = 0.1 * jax.random.normal(jax.random.key(1), (196, 200))\n"
        "g = Game(LinearHead('prob'), {'contrib': c, 'offset': jnp.zeros(200), 'cls': jnp.int32(3)})\n"
        "r = shapley.estimate(g, 196, method='permutation', budget=10**7, key=jax.random.key(0))\n"
        "gap = float(g(jnp.ones((1, 196), bool))[0] - g(jnp.zeros((1, 196), bool))[0])\n"
        "print(json.dumps({'evaluations': r.evaluations, 'sum': float(r.phi.sum()), 'gap': gap,\n"
        "                  'peak_mb': int(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read())[1]) / 1024}))\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device: the plain case
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["evaluations"] >= 0.99 * 10 ** 7
    assert abs(got["sum"] - got["gap"]) < 1e-4 * max(1.0, abs(got["gap"]))  # efficiency over 50,761 permutations
    # this process's own peak RSS (VmHWM; getrusage's maxrss would carry the pytest worker's over exec)
    assert got["peak_mb"] < 1500, got  # measured ~320 MB, most of it the JAX runtime


def test_auto_runs_stratified_kernel_on_small_games_antithetic_cv_on_large_ones_and_exact_when_it_fits():
    from fgvce_jax.shapley.estimate import auto_method, estimator

    assert [auto_method(n) for n in (9, 16, 20, 21, 196)] == ["stratified_kernel"] * 3 + ["antithetic_cv"] * 2
    assert type(estimator("auto", 12, 1000)).name == "stratified_kernel"
    assert type(estimator("auto", 8, 256)).name == "exact"
    for n, budget, chosen in ((12, 600, "stratified_kernel"), (40, 2000, "antithetic_cv")):
        game = mlp_game(n)
        got = shapley.estimate(game, n, method="auto", budget=budget, key=KEY)
        want = shapley.estimate(game, n, method=chosen, budget=budget, key=KEY)
        np.testing.assert_array_equal(got.phi, want.phi)
        assert got.evaluations == want.evaluations
    with pytest.raises(FgvceError, match="choose one of .* or auto"):
        shapley.estimate(mlp_game(5), 5, method="automatic", budget=10, key=KEY)
