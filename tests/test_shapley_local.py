"""The saliency-partition estimator fgvce_jax.shapley.local against per-window enumeration."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax import shapley
from fgvce_jax.errors import FgvceError
from fgvce_jax.shapley.game import Game, LinearHead, is_affine
from fgvce_jax.shapley.estimate import plan_units
from fgvce_jax.shapley.local import LocalWindows, plan, run_batch, window_frame
from fgvce_jax.sharding import device_mesh

KEY = jax.random.key(0)


def per_window_reference(game, grid, kernel, outside):
    """Phi (H, W): for each p, the exact Shapley value of p in its window's game, by enumeration.

    phi_p = sum_{S in W_p - p} |S|! (n - |S| - 1)! / n! (v(S + p) - v(S)), n = |W_p|, in float64.
    """
    h, w = grid
    cells = [(r, c) for r in range(h) for c in range(w)]
    half = kernel // 2
    out = np.zeros(grid)
    for p in cells:
        win = [q for q in cells if abs(q[0] - p[0]) <= half and abs(q[1] - p[1]) <= half]
        others = [q for q in win if q != p]
        n = len(win)
        base = np.zeros(grid, bool)
        if outside == "present":
            base[:] = True
            for q in win:
                base[q] = False
        masks, weights = [], []
        for r in range(n):
            for s in itertools.combinations(others, r):
                m = base.copy()
                for q in s:
                    m[q] = True
                with_p = m.copy()
                with_p[p] = True
                masks += [with_p, m]
                weights.append(math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n))
        values = np.asarray(game(jnp.asarray(np.stack(masks))), np.float64)
        out[p] = np.dot(weights, values[0::2] - values[1::2])
    return out


def pairwise_game(grid, seed=0):
    """v(m) = sum_p a_p m_p + sum over neighbouring (p, q) of b_pq m_p m_q: positions interact with neighbours."""
    h, w = grid
    ka, kh, kv = jax.random.split(jax.random.key(seed), 3)
    a = jax.random.normal(ka, grid)
    bh, bv = jax.random.normal(kh, (h, w - 1)), jax.random.normal(kv, (h - 1, w))

    def game(m):
        m = m.astype(jnp.float32)
        return ((a * m).sum((1, 2)) + (bh * m[:, :, 1:] * m[:, :, :-1]).sum((1, 2))
                + (bv * m[:, 1:] * m[:, :-1]).sum((1, 2)))
    return game


def sigmoid_game(grid, seed=1):
    """A nonlinear game: a sigmoid of the pairwise game."""
    inner = pairwise_game(grid, seed)
    return lambda m: jax.nn.sigmoid(inner(m))


@pytest.mark.parametrize("outside", ["absent", "present"])
def test_paired_sampling_is_exact_on_a_neighbour_game(outside):
    """For a game of degree 2 a draw and its complement average to the window's exact Shapley value."""
    grid = (4, 5)
    game = pairwise_game(grid)
    phi = shapley.local(game, grid, kernel=3, samples=2, key=KEY, outside=outside)
    np.testing.assert_allclose(phi, per_window_reference(game, grid, 3, outside), atol=1e-5)


def _runs(game, grid, kernel, samples, outside, paired, reps):
    """Phi (reps, H, W) from ``reps`` keys, in one compiled call of the batched engine."""
    mesh = device_mesh()
    draws = samples // 2 if paired else samples
    p = plan(grid, kernel, draws, outside, paired, reps, 64, None, mesh)
    keys = jax.random.split(jax.random.key(11), reps)
    return np.asarray(run_batch(game, (), keys, p, mesh=mesh))


@pytest.mark.parametrize("paired", [True, False])
def test_unbiased_for_each_window_on_a_nonlinear_game(paired):
    grid, reps = (3, 4), 48
    game = sigmoid_game(grid)
    runs = _runs(lambda args, m: game(m), grid, 3, 8, "absent", paired, reps)
    ref = per_window_reference(game, grid, 3, "absent")
    se = runs.std(0, ddof=1) / np.sqrt(reps)
    assert np.all(np.abs(runs.mean(0) - ref) <= 5 * se + 1e-6)


def test_whole_grid_kernel_with_outside_present_estimates_the_global_value():
    grid, reps = (3, 3), 48
    game = sigmoid_game(grid, seed=4)
    exact = shapley.estimate(lambda m: game(m.reshape(-1, 3, 3)), 9, method="exact", budget=512, key=KEY).phi
    runs = _runs(lambda args, m: game(m), grid, 5, 8, "present", True, reps)
    se = runs.std(0, ddof=1) / np.sqrt(reps)
    assert np.all(np.abs(runs.mean(0) - np.asarray(exact).reshape(grid)) <= 5 * se + 1e-6)
    # the single-game entry point agrees with the batched engine for the same key
    np.testing.assert_allclose(
        shapley.local(game, grid, kernel=5, samples=8, key=jax.random.split(jax.random.key(11), reps)[3],
                      outside="present"), runs[3], rtol=1e-6, atol=1e-7)


def affine_game(grid, output, seed=2, classes=7):
    """A random GAP + linear style game: v(m) = out_c(offset + m_flat @ contrib), which local evaluates
    a window at a time (``is_affine``)."""
    kc, ko = jax.random.split(jax.random.key(seed))
    args = {"contrib": jax.random.normal(kc, (grid[0] * grid[1], classes)),
            "offset": jax.random.normal(ko, (classes,)), "cls": jnp.int32(3)}
    return Game(LinearHead(output), args)


@pytest.mark.parametrize("grid, kernel", [((5, 6), 3), ((6, 6), 5), ((3, 3), 5)])  # last: draws on the grid
@pytest.mark.parametrize("outside, paired", [("absent", True), ("present", True), ("absent", False)])
@pytest.mark.parametrize("output", ["prob", "log_prob", "logit"])
def test_affine_fast_path_equals_generic_path(grid, kernel, outside, paired, output):
    game = affine_game(grid, output)
    assert is_affine(game.fn)
    kw = dict(kernel=kernel, samples=4, key=KEY, outside=outside, paired=paired)
    fast = shapley.local(game, grid, **kw)
    generic = shapley.local(lambda m: game(m), grid, **kw)  # a plain callable hides the structure
    np.testing.assert_allclose(fast, generic, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(generic)).max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("affine", [False, True])
def test_chunk_size_and_device_count_do_not_change_results(affine):
    """Bit for bit: every (window, draw) marginal is computed alone and averaged per window at the end."""
    grid = (5, 6)
    game = affine_game(grid, "prob") if affine else sigmoid_game(grid)
    meshes = [jax.make_mesh((d,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:d])
              for d in sorted({1, 2, jax.device_count()})]
    ref = shapley.local(game, grid, kernel=3, samples=6, key=KEY, mesh=meshes[0])
    for chunk in (1, 4, 50, None, 10 ** 6):
        for mesh in meshes:
            got = shapley.local(game, grid, kernel=3, samples=6, key=KEY, chunk_size=chunk, mesh=mesh)
            np.testing.assert_array_equal(got, ref, err_msg=f"chunk_size={chunk}, {mesh.size} devices")
    assert jax.device_count() == 4  # the suite runs with 4 fake CPU devices (Makefile)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel=9), "larger than the grid"),
    (dict(kernel=4), "odd"),
    (dict(samples=3), "even when paired"),
    (dict(outside="zero"), "outside must be"),
    (dict(grid=(3, 3)), "bool\\[B, 3, 3\\]"),
])
def test_bad_requests_raise_clear_errors(kwargs, match):
    args = dict(grid=(4, 4), kernel=3, samples=4, key=KEY)
    args.update(kwargs)
    game = lambda m: m.reshape(-1, 16).sum(-1).astype(jnp.float32)  # noqa: E731  (needs a 4 x 4 grid)
    with pytest.raises(FgvceError, match=match):
        shapley.local(game, **args)


class EnumeratedWindows(LocalWindows):
    """A new local estimator written in one place (this test): unit (slot, b) is subset b of the k x k
    window's cells (a k^2-bit number), weighted by its Shapley weight |S|! (n - |S| - 1)! / n! when it lies
    among the window's players and 0 otherwise, so the engine's sum is the exact per-window value."""

    def units(self):
        return self.n * 2 ** (self.kernel ** 2)

    def evals_per_unit(self):
        return 2

    def evaluate(self, fn, args, key, index, select):
        k2, (h, w) = self.kernel ** 2, self.grid
        table = jnp.asarray([[math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) if s < n else 0.0
                              for s in range(k2 + 1)] for n in range(k2 + 1)], jnp.float32)  # [n, |S|]
        slot = jnp.minimum(index // 2 ** k2, self.n - 1)

        def one(q, b):
            rows, cols, players = window_frame(q, self.grid, self.kernel)
            bits = ((b >> jnp.arange(k2)) & 1).astype(bool).reshape(self.kernel, self.kernel)
            weight = jnp.where(jnp.any(bits & ~players), 0.0, table[players.sum() + 1, bits.sum()])
            place = lambda cells: ((rows[:, None] == jnp.arange(h)).T.astype(jnp.float32) @ cells  # noqa: E731
                                   @ (cols[:, None] == jnp.arange(w)).astype(jnp.float32)) > 0.5
            s = place((bits & players).astype(jnp.float32))
            return jnp.stack([s, s | (jnp.arange(h * w) == q).reshape(h, w)]), weight

        masks, weights = jax.vmap(one)(slot if select is None else select[slot], index % 2 ** k2)
        values = fn(args, masks.reshape(-1, h, w)).reshape(-1, 2).astype(jnp.float32)
        return slot, (weights * (values[:, 1] - values[:, 0]))[:, None]

    def finalize(self, total, counts, n_units, anchor_values):
        return total["phi"]


def test_a_local_estimator_is_one_class_on_the_unit_engine():
    """``EnumeratedWindows`` above runs on the engine unchanged: it equals per-window enumeration, and chunk
    size and device count change no bit (the engine's canonical sums), as for ``local`` itself."""
    grid = (4, 5)
    a, b = (jax.random.randint(k, grid, -3, 4).astype(jnp.float32) for k in jax.random.split(KEY))

    def game(m):  # nonlinear, and exact in float32 (small integers), so no batch size can round a row differently
        m = m.astype(jnp.float32)
        return (a * m).sum((1, 2)) ** 2 + (b * m).sum((1, 2))
    est = EnumeratedWindows(20, grid=grid, kernel=3)
    runs = []
    for chunk, devices in [(None, 1), (None, 4), (6, 4), (64, 2)]:
        mesh = jax.make_mesh((devices,), ("d",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.devices()[:devices])
        p = plan_units(est, est.units(), 64, 1, chunk, mesh)
        runs.append(np.asarray(run_batch(lambda args, m: game(m), (), KEY[None], p, mesh=mesh)[0]))
    np.testing.assert_allclose(runs[0], per_window_reference(game, grid, 3, "absent"), atol=1e-5)
    for got, name in zip(runs[1:], ["4 devices", "chunk 6", "chunk 64 on 2"]):
        np.testing.assert_array_equal(got, runs[0], err_msg=name)
