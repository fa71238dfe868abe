"""Local (saliency-partition) Shapley values sampled until each window's standard error is below a tolerance.

The estimator of :mod:`fgvce_jax.shapley.local` with a per-window sample size: window p keeps drawing
in rounds of R draws (each a Shapley-weighted subset S of W_p minus {p}, with its complement when
``paired``) until the standard error of its mean marginal

    se_p = sqrt( var(m_p1..m_pn) / n ),   m_pj = mean marginal of draw j,

is at most ``tolerance`` (after at least two rounds), or until it has ``max_draws`` draws. Easy
windows (a nearly additive head there) stop after two rounds; hard ones get the samples they need.

Draw j of window p always comes from ``fold_in(key, p * max_draws + j)`` -- the key of item
(p, j) of :class:`fgvce_jax.shapley.local.LocalWindows` with ``draws = max_draws`` -- and the stop
rule of a window reads only its own draws, so a window's result does not depend on which other
windows are still running, on how many windows share a round (``bucket``) or on the device count.
Each round evaluates the game on a fixed-shape batch (``bucket`` windows x R draws, the still-active
windows first), so the loop is one compiled ``lax.while_loop``.

Sums are kept relative to each window's first marginal (shifted sums), so the variance does not
lose its digits to cancellation in float32.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fgvce_jax.errors import FgvceError
from fgvce_jax import sharding
from fgvce_jax.shapley.game import as_game, check_game, with_shared
from fgvce_jax.shapley.local import LocalWindows, check_local

MIN_ROUNDS = 2  # a standard error from fewer than 2 rounds of draws is not trusted


class ToleranceResult(NamedTuple):
    """phi (..., H, W) float32 and samples (..., H, W) int32: game-evaluation pairs (v(S), v(S + p)) used
    per window, complements included (the M of :func:`fgvce_jax.shapley.local.local`)."""

    phi: jax.Array
    samples: jax.Array


def check_tolerance(tolerance, round_draws: int, max_draws: int) -> None:
    """FgvceError unless tolerance > 0 is finite and 1 <= round_draws <= max_draws."""
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance > 0 \
            or tolerance == float("inf"):
        raise FgvceError(f"the Phi tolerance must be a positive finite number, got {tolerance!r}")
    if not (isinstance(round_draws, int) and 1 <= round_draws <= max_draws):
        raise FgvceError(f"draws per round must be an integer in 1..{max_draws}, got {round_draws!r}")


def _one_game(fn, args, key, *, grid, kernel, outside, paired, tolerance, round_draws, max_draws, bucket):
    """(phi (H, W), draws (H, W)) for one game, in a while loop over rounds (see the module docstring)."""
    hw = grid[0] * grid[1]
    est = LocalWindows(hw, grid=grid, kernel=kernel, draws=max_draws, outside=outside, paired=paired)

    def active(state):
        count, first, s1, s2 = state
        n = jnp.maximum(count, 2).astype(jnp.float32)
        var = jnp.maximum(s2 - s1 * s1 / n, 0.0) / (n - 1.0)
        settled = (count >= MIN_ROUNDS * round_draws) & (jnp.sqrt(var / n) <= tolerance)
        return (count < max_draws) & ~settled

    def body(state):
        count, first, s1, s2 = state
        live = active(state)
        order = jnp.argsort(~live, stable=True)[:bucket]  # active windows first, in raster order
        valid = live[order]
        j = count[order][:, None] + jnp.arange(round_draws)[None, :]  # (bucket, R) draw numbers
        use = valid[:, None] & (j < max_draws)
        idx = order[:, None] * max_draws + jnp.minimum(j, max_draws - 1)
        m = est.item_marginals(fn, args, key, idx.reshape(-1)).reshape(bucket, round_draws)
        first = first.at[order].set(jnp.where(valid & (count[order] == 0), m[:, 0], first[order]))
        d = jnp.where(use, m - first[order][:, None], 0.0)
        s1 = s1.at[order].add(d.sum(1))
        s2 = s2.at[order].add((d * d).sum(1))
        return count.at[order].add(use.sum(1).astype(jnp.int32)), first, s1, s2

    zeros = jnp.zeros(hw, jnp.float32)
    init = (jnp.zeros(hw, jnp.int32), zeros, zeros, zeros)
    state = jax.lax.while_loop(lambda s: jnp.any(active(s)), body, init)
    count, first, s1, _ = state
    phi = first + s1 / jnp.maximum(count, 1).astype(jnp.float32)
    return phi.reshape(grid), count.reshape(grid)


@functools.partial(jax.jit, static_argnames=("fn", "grid", "kernel", "outside", "paired", "round_draws",
                                             "max_draws", "bucket", "mesh"))
def run_batch(fn, args, keys, tolerance, *, grid, kernel, outside, paired, round_draws, max_draws, bucket,
              mesh, shared=None) -> ToleranceResult:
    """Tolerance-sampled Phi for N games ``fn(with_shared(shared, args[i]), .)`` (args with a leading N axis,
    N a multiple of the mesh size) and keys (N,). Games are split over the mesh; each device runs its games'
    while loops one after the other (``lax.map``), so every game call has the same shape on any device count."""
    axis = mesh.axis_names[0]
    one = functools.partial(_one_game, fn, grid=grid, kernel=kernel, outside=outside, paired=paired,
                            round_draws=round_draws, max_draws=max_draws, bucket=bucket)

    def body(shared, args, keys, tol):
        return jax.lax.map(lambda ak: one(with_shared(shared, ak[0]), ak[1], tolerance=tol), (args, keys))

    phi, draws = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(axis), P(axis), P()), out_specs=P(axis),
                               check_vma=False)(shared, args, keys, jnp.float32(tolerance))
    return ToleranceResult(phi, draws * (2 if paired else 1))


def bucket_size(grid, round_draws: int, paired: bool, bytes_per_evaluation: int) -> int:
    """Windows per round: all of them if the round's evaluations fit the memory budget, else fewer.
    Never depends on the device count (games run one at a time on each device)."""
    per_window = round_draws * (4 if paired else 2) * max(1, int(bytes_per_evaluation))
    return max(1, min(grid[0] * grid[1], sharding.memory_budget() // per_window))


def local_to_tolerance(game, grid: tuple[int, int], *, kernel: int, tolerance: float, key: jax.Array,
                       max_samples: int = 256, round_samples: int = 8, outside: str = "absent",
                       paired: bool = True, bucket: int | None = None) -> ToleranceResult:
    """Phi (H, W) of a game ``bool[B, H, W] -> float[B]``, each window sampled until its standard error is
    at most ``tolerance`` (or ``max_samples`` samples), in rounds of ``round_samples``; see the module
    docstring. Samples count as in :func:`fgvce_jax.shapley.local.local` (a paired draw is 2).
    ``bucket``: windows evaluated per round (default from the memory budget; never changes the result)."""
    grid = tuple(int(g) for g in grid)
    max_draws = check_local(grid, kernel, max_samples, outside, paired)
    round_draws = check_local(grid, kernel, round_samples, outside, paired)
    check_tolerance(tolerance, round_draws, max_draws)
    game = as_game(game)
    check_game(game, grid)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("d",))  # one game: one device runs its loop
    b = bucket or bucket_size(grid, round_draws, paired, game.bytes_per_evaluation)
    args = jax.tree.map(lambda a: jnp.asarray(a)[None], game.args)
    out = run_batch(game.fn, args, key[None], tolerance, grid=grid, kernel=kernel, outside=outside, paired=paired,
                    round_draws=round_draws, max_draws=max_draws, bucket=b, mesh=mesh)
    return ToleranceResult(out.phi[0], out.samples[0])
