"""SVARM and stratified SVARM (Kolpaczki et al., AAAI 2024) against exact values and closed forms, and
the engine's promises for them: bit-identical over devices and chunk sizes, one compilation, honest budgets."""
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from counting_game import counting_game
from test_shapley import (
    KEY,
    _one_device_mesh,
    _weighted_sum,
    affine_game,
    brute_force,
    elementwise_game,
    on_one,
    softmax_game,
)

from fgvce_jax import shapley
from fgvce_jax.errors import FgvceError
from fgvce_jax.shapley.estimate import plan, run_batch
from fgvce_jax.shapley.game import Game, as_game
from fgvce_jax.sharding import device_mesh
from fgvce_jax.shapley.stratified_svarm import StratifiedSvarm, pair_sizes, size_distribution, slots
from fgvce_jax.shapley.svarm import size_distributions

SVARMS = ("svarm", "stratified_svarm")


def _mesh(d):
    return jax.make_mesh((d,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:d])


def min_budget(method, n, units):
    """The budget of exactly ``units`` units: 2 anchors + 2 per unit for svarm; 2n + 2 anchors + m per unit for
    stratified."""
    return 2 + 2 * units if method == "svarm" else 2 * n + 2 + len(slots(n)[0]) * units


@pytest.mark.parametrize("method", SVARMS)
@pytest.mark.parametrize("make", [softmax_game, elementwise_game])
def test_efficiency_holds_exactly(method, make):
    """sum_i phi_i = v(N) - v(empty) to float32 rounding at small and larger budgets (the projection of
    ``registry.efficient``); without it the sums missed by 0.03 to 2 here (checked)."""
    n = 10
    game = make(n)
    gap = float(game(jnp.ones((1, n), bool))[0] - game(jnp.zeros((1, n), bool))[0])
    for units in (12, 200):
        phi = shapley.estimate(game, n, method=method, budget=min_budget(method, n, units), key=KEY).phi
        assert abs(float(phi.sum()) - gap) < 1e-5 * max(1.0, abs(gap)), (units, float(phi.sum()), gap)


def test_size_distributions_are_the_papers():
    """SVARM: P+(s) = 1 / (s H_n), P-(s) = 1 / ((n - s) H_n). Stratified: the paper's closed forms."""
    plus, minus = size_distributions(5)
    h5 = 1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5
    np.testing.assert_allclose(plus, [0, 1 / h5, 1 / (2 * h5), 1 / (3 * h5), 1 / (4 * h5), 1 / (5 * h5)])
    np.testing.assert_allclose(minus, plus[::-1])
    nlogn = 10 * math.log(10)  # n = 10 (even): sizes 2..8, frac / min(s, n - s), the middle 1 / (n ln n)
    frac = (nlogn - 1) / (2 * nlogn * (1 / 2 + 1 / 3 + 1 / 4))
    np.testing.assert_allclose(size_distribution(10), [frac / 2, frac / 3, frac / 4, 1 / nlogn, frac / 4,
                                                       frac / 3, frac / 2], rtol=1e-12)
    frac = 1 / (2 * (1 / 2 + 1 / 3))  # n = 7 (odd): sizes 2..5
    np.testing.assert_allclose(size_distribution(7), [frac / 2, frac / 3, frac / 3, frac / 2], rtol=1e-12)
    np.testing.assert_allclose(size_distribution(4), [1.0])


def test_svarm_methods_are_unbiased_and_converge():
    """Mean over 64 keys within 5 standard errors of exact on a 10-player softmax game; the RMS error
    falls as the budget grows 8x (one compiled batch of 64 games per budget)."""
    n, reps = 10, 64
    game = as_game(softmax_game(n, seed=3))
    exact = np.asarray(shapley.estimate(game, n, method="exact", budget=2 ** n, key=KEY).phi)
    keys = jax.random.split(jax.random.key(7), reps)
    mesh = device_mesh()

    def many(method, budget):
        p = plan(method, n, budget, 64, reps, None, mesh)
        return np.asarray(run_batch(p.est, game.fn, (), keys, n_units=p.n_units, u=p.u, n_chunks=p.n_chunks,
                                    mesh=mesh, r=p.r))

    for method, units in [("svarm", 40), ("stratified_svarm", 12)]:
        budget = min_budget(method, n, units)
        small, big = many(method, budget), many(method, min_budget(method, n, 8 * units))
        se = small.std(axis=0, ddof=1) / np.sqrt(reps)
        assert np.all(np.abs(small.mean(0) - exact) <= 5 * se + 1e-6), method
        rms_small = np.sqrt(((small - exact) ** 2).mean())
        rms_big = np.sqrt(((big - exact) ** 2).mean())
        assert rms_big < 0.6 * rms_small, (method, rms_small, rms_big)


@pytest.mark.parametrize("n", [4, 6])
def test_stratified_svarm_is_exact_when_sampled_strata_are_constant(n):
    """A game that is arbitrary on the border sizes 0, 1, n-1, n (computed exactly from the anchors) and
    depends only on |S| in between (so every sample of a stratum is its mean) gives the exact phi."""
    a = jnp.arange(1.0, n + 1) / n

    def game(m):
        size = m.sum(-1)
        border = (size <= 1) | (size >= n - 1)
        return jnp.where(border, jnp.tanh(m.astype(jnp.float32) @ a), (size / n) ** 2)

    want = brute_force(on_one(game), n)
    for seed in range(3):
        res = shapley.estimate(game, n, method="stratified_svarm", budget=min_budget("stratified_svarm", n, 40),
                               key=jax.random.key(seed))
        np.testing.assert_allclose(res.phi, want, atol=2e-6)


@pytest.mark.parametrize("method, game_kind", [
    ("svarm", "elementwise"), ("stratified_svarm", "elementwise"), ("stratified_svarm", "affine")])
def test_chunk_size_and_device_count_do_not_change_results(method, game_kind):
    """Bit-identical on 1, 2 and 4 devices and for chunk sizes default, 7 and 1 (elementwise games; svarm has
    no affine path). The affine game's anchors are matmul rows evaluated in calls of at most chunk_size,
    which XLA rounds differently below 64 rows: there the small chunks are checked to float rounding, as for
    the other estimators (docs/shapley.md), and the device count alone still changes no bit."""
    n, budget = 8, 400
    game = {"elementwise": elementwise_game(n), "affine": affine_game(n)}[game_kind]
    ref = np.asarray(shapley.estimate(game, n, method=method, budget=budget, key=KEY, mesh=_mesh(1)).phi)
    for chunk, devices in [(None, 4), (7, 2), (1, 4)]:
        got = np.asarray(shapley.estimate(game, n, method=method, budget=budget, key=KEY, chunk_size=chunk,
                                          mesh=_mesh(devices)).phi)
        if game_kind == "affine" and chunk is not None:
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7, err_msg=f"chunk_size={chunk}")
        else:
            np.testing.assert_array_equal(got, ref, err_msg=f"chunk_size={chunk}, {devices} devices")


@pytest.mark.parametrize("method", SVARMS)
def test_many_reduction_blocks_and_batches_stay_bit_identical(method, monkeypatch):
    """run_batch over 3 games with tiny STATS_BYTES (R > E: several game calls per kept block sum): 1 and 4
    devices agree bit for bit."""
    engine = importlib.import_module("fgvce_jax.shapley.estimate")
    monkeypatch.setattr(engine, "STATS_BYTES", 1)
    monkeypatch.setattr(engine, "MIN_BLOCKS", 32)
    n, reps = 9, 3
    keys = jax.random.split(jax.random.key(3), reps)
    args = {"w": jax.random.normal(jax.random.key(4), (reps, n))}

    def run(mesh):
        p = plan(method, n, min_budget(method, n, 64), 64, reps, None, mesh)
        assert p.r > p.u
        return np.asarray(run_batch(p.est, _weighted_sum, args, keys, n_units=p.n_units, u=p.u,
                                    n_chunks=p.n_chunks, mesh=mesh, r=p.r))
    np.testing.assert_array_equal(run(device_mesh()), run(_one_device_mesh()))


def test_stratified_affine_fast_path_matches_generic_path():
    n = 24
    game = affine_game(n, c=20)
    hidden = lambda m: game(m)  # the same game with its structure hidden: the generic path
    budget = min_budget("stratified_svarm", n, 16)
    fast = shapley.estimate(game, n, method="stratified_svarm", budget=budget, key=KEY).phi
    generic = shapley.estimate(hidden, n, method="stratified_svarm", budget=budget, key=KEY).phi
    np.testing.assert_allclose(fast, generic, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", SVARMS)
def test_new_game_arguments_do_not_recompile(method):
    n = 6
    budget = min_budget(method, n, 20)
    shapley.estimate(Game(_weighted_sum, {"w": jnp.ones(n)}), n, method=method, budget=budget, key=KEY)
    before = run_batch._cache_size()
    for s in range(3):
        w = jax.random.normal(jax.random.key(s), (n,))
        shapley.estimate(Game(_weighted_sum, {"w": w}), n, method=method, budget=budget, key=KEY)
    assert run_batch._cache_size() == before


@pytest.mark.parametrize("method", SVARMS)
def test_reported_evaluations_are_the_rows_evaluated(method):
    """A counting game sees exactly ``evaluations`` rows (16 units: whole blocks, no padding); a budget
    that is not a whole number of units is rounded down, never up."""
    n = 8  # budgets below 2^n: no exact fallback
    budget = min_budget(method, n, 16)
    spare = 1 if method == "svarm" else len(slots(n)[0]) - 1
    game, rows = counting_game(elementwise_game(n))
    res = shapley.estimate(game, n, method=method, budget=budget + spare, key=KEY, mesh=_one_device_mesh())
    jax.effects_barrier()
    assert res.evaluations == budget == rows[0]


@pytest.mark.parametrize("method, n, budget, match", [
    ("svarm", 5, 11, "at least 12"),  # 2 anchors and the warm-up: 2 n
    ("stratified_svarm", 3, 7, "at least 4 players"),  # a budget of 2^3 = 8 would run exact
    ("stratified_svarm", 5, 13, "at least 14"),  # 2 n + 2 anchors + m = 2 per unit
])
def test_bad_budgets_raise_clear_errors(method, n, budget, match):
    with pytest.raises(FgvceError, match=match):
        shapley.estimate(lambda m: m.sum(-1).astype(jnp.float32), n, method=method, budget=budget, key=KEY)


def test_stratified_statistics_stay_bounded_at_a_million_evaluations():
    """Kept float statistics (block sums + one reduction block's per-unit buffer) for n = 196, 10^6 evaluations."""
    engine = importlib.import_module("fgvce_jax.shapley.estimate")
    est, units, e, _, used, r = plan("stratified_svarm", 196, 10 ** 6, 2384, 1, None, device_mesh())
    per_unit = 4 * sum(np.prod(s.shape) for s in jax.tree.leaves(engine._stat_shapes(est)))
    kept = (math.ceil(units / r) + r) * per_unit
    assert used > 0.99 * 10 ** 6 and kept <= 64 * 2 ** 20, (e, r, kept)


def test_stratified_svarm_fills_unhit_strata_with_the_size_mean():
    """One unit at n = 30 leaves many sampled strata without a coalition (a player is in a size-s coalition
    with probability s / n). On a game of |S| alone every stratum mean is its size's value, so filling an
    unhit stratum with the mean of v over its size gives the exact phi = (v(N) - v(empty)) / n for every player
    (leaving such strata out, as the authors' code does, gives each player another average: not exact); the
    budget is the anchors plus one unit."""
    n = 30

    def game(m):
        return jnp.tanh(m.sum(-1).astype(jnp.float32) / 6.0)

    res = shapley.estimate(game, n, method="stratified_svarm", budget=min_budget("stratified_svarm", n, 1), key=KEY)
    est = StratifiedSvarm(n)
    masks, sizes = np.asarray(est.masks(jax.tree.map(lambda a: a[0], est.draws(KEY, jnp.arange(1))))), slots(n)[1]
    plus_hit = np.stack([masks[sizes == size].any(0) for size in range(2, n - 1)])  # (size, player)
    assert not plus_hit.all()  # some player is in no sampled coalition of some size: unhit strata exist
    np.testing.assert_allclose(res.phi, np.full(n, float(np.tanh(n / 6.0)) / n), atol=2e-6)
    assert res.evaluations == 2 * n + 2 + len(slots(n)[0])


def test_stratified_svarm_coalitions_are_independent_pairs():
    """Every unit's coalitions: P uniform coalitions of sizes 2..n/2 from P independent permutations, then
    their complements; and on the 196-player random unanimity game at 10,000 evaluations its MSE stays within
    4x of plain antithetic's (measured 2.0x over 4 seeds; nested prefixes of shared permutations gave 66x)."""
    from fgvce_jax.shapley.benchmark_games import random_unanimity

    n = 30
    est = StratifiedSvarm(n)
    rank = est.draw(KEY, 0)
    masks = np.asarray(est.masks(rank))
    pairs = len(pair_sizes(n)[0])
    np.testing.assert_array_equal(masks.sum(1), slots(n)[1])
    np.testing.assert_array_equal(masks[pairs:], ~masks[:pairs])
    assert len({tuple(r) for r in np.asarray(rank)}) == pairs  # one permutation per pair
    bench = random_unanimity(jax.random.key(1))
    mse = {m: np.mean([np.sum((np.asarray(shapley.estimate(bench.game, 196, method=m, budget=10_000,
                                                            key=jax.random.key(s)).phi) - bench.phi) ** 2)
                       for s in range(4)]) for m in ("antithetic", "stratified_svarm")}
    assert mse["stratified_svarm"] < 4 * mse["antithetic"], mse
