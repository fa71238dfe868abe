"""The estimation engine: ``estimate(game, n, method=..., budget=..., key=...)``.

Units (see :mod:`fgvce_jax.shapley.registry`) are numbered 0..U-1 and unit i
draws from ``fold_in(key, i)``. Results are bit-identical for any device count,
and for any ``chunk_size`` too unless the game itself rounds a row differently
at another batch size, because nothing else that touches a float depends on them:

- by default the game is called on one *evaluation block* of E units (E m
  masks). E depends only on the estimator, n, the budget, the game's bytes per
  evaluation and the device type's memory budget (XLA may round a matmul's
  rows differently for another batch size, so the batch shape must not move
  with the devices). A smaller ``chunk_size`` makes the calls smaller (a
  divisor of R), which bounds memory without moving the summation order;
- the per-unit float statistics of each *reduction block* of R units (R a
  multiple of E, canonical too) are summed in a fixed pairwise order, the
  block sums are gathered from all devices and summed in the same fixed order;
- integer statistics (``counts``, e.g. KernelSHAP's A = sum z z^T) are summed
  as int32, exact in any order.

Each device of a 1-D mesh walks a contiguous range of reduction blocks in a
``fori_loop``; units past U (padding) contribute zero. Kept statistics are one
per-unit buffer of R units plus ceil(U / R) block sums of at most
``STATS_BYTES``. The same code runs vmapped over a batch of games (one per
image) for :func:`fgvce_jax.saliency.compute`. For an affine game
(:func:`fgvce_jax.shapley.game.is_affine`) and an estimator with an
``affine_values`` hook (permutation, antithetic) the values are built from
prefix sums of contrib's rows instead of the generic masks-times-contrib product.
When the budget covers all 2^n coalitions every method runs as ``exact``
(:func:`estimator`, the one place this is decided).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fgvce_jax.errors import FgvceError
from fgvce_jax import sharding
from fgvce_jax.shapley import exact, registry
from fgvce_jax.shapley.game import as_game, check_game, is_affine, with_shared

MAX_BLOCK_EVALUATIONS = 2 ** 14  # evaluations of one game per game call (an evaluation block)
MIN_BLOCKS = sharding.MIN_CHUNKS  # a job is cut into at least this many evaluation blocks, any device count
STATS_BYTES = 8 * 2 ** 20  # at most this many bytes of block sums kept per game


class ShapleyResult(NamedTuple):
    """phi (n,) (or (N, n) for a batch of games) and the number of game evaluations used per game."""

    phi: jax.Array
    evaluations: int


def tree_sum(x: jax.Array) -> jax.Array:
    """Sum over the leading axis in a fixed pairwise order: zero-padded to a power of two, then halved
    by elementwise adds (``x[:h] + x[h:]``), so the bits depend on x alone, not on shapes around it."""
    k = x.shape[0]
    p = 1 << max(0, (k - 1).bit_length())
    if p > k:
        x = jnp.concatenate([x, jnp.zeros((p - k, *x.shape[1:]), x.dtype)])
    while x.shape[0] > 1:
        h = x.shape[0] // 2
        x = x[:h] + x[h:]
    return x[0]


@functools.cache  # estimators are hashable; tracing them costs about a millisecond per request
def _stat_shapes(est):
    return est.stat_shapes()


def evaluation_block(est, n_units: int, bytes_per_evaluation: int, n_games: int,
                     most_evaluations: int = MAX_BLOCK_EVALUATIONS) -> int:
    """E, units per game call: the memory budget (for n_games games at once), ``most_evaluations`` per game,
    and at least MIN_BLOCKS blocks; at least 1. Never depends on chunk_size or the device count."""
    m = est.evals_per_unit()
    by_memory = sharding.memory_budget() // max(1, (m * int(bytes_per_evaluation) + est.draw_bytes()) * n_games)
    return max(1, min(by_memory, most_evaluations // m, math.ceil(n_units / MIN_BLOCKS)))


def reduction_block(est, n_units: int, e: int) -> int:
    """R, units per kept block sum: the smallest multiple of E whose ceil(U / R) block sums fit STATS_BYTES."""
    per_unit = sum(4 * math.prod(s.shape) for s in jax.tree.leaves(_stat_shapes(est)))
    most_blocks = max(1, STATS_BYTES // max(1, per_unit))
    return e * math.ceil(math.ceil(n_units / e) / most_blocks)


def _use_affine(est, fn) -> bool:
    return is_affine(fn) and type(est).affine_values is not registry.Estimator.affine_values


def _device_blocks(est, fn, args, key, select, n_units, e, r, n_chunks, axis):
    """This device's block sums (n_chunks, ...) and summed counts for one game (inside shard_map)."""
    m, n, sub = est.evals_per_unit(), est.n, r // e
    first = jax.lax.axis_index(axis) * n_chunks * r
    fast = _use_affine(est, fn)

    def evaluate(start):  # one evaluation block: per-unit stats (e, ...) and counts
        idx = start + jnp.arange(e, dtype=jnp.int32)
        valid = idx < n_units
        own = est.evaluate(fn, args, key, idx, select if select.shape[0] else None)
        if own is not None:
            draws, values = own
        elif fast:
            draws = est.draws(key, idx)
            readout = functools.partial(fn.readout, args)
            values = jax.vmap(lambda d: est.affine_values(d, args["offset"], args["contrib"], readout))(draws)
        else:
            draws = est.draws(key, idx)
            masks = jax.vmap(est.masks)(draws)
            values = fn(args, masks.reshape(e * m, n)).reshape(e, m)
        stats = jax.vmap(est.unit_stats)(draws, values.astype(jnp.float32))
        stats = jax.tree.map(lambda s: jnp.where(valid.reshape(-1, *(1,) * (s.ndim - 1)), s, 0.0), stats)
        return stats, est.counts(draws, valid)

    stats_shape, counts_shape = jax.eval_shape(evaluate, jnp.int32(0))
    zeros = functools.partial(jax.tree.map, lambda s: jnp.zeros(s.shape, s.dtype))

    def reduction(c, carry):
        blocks, counts = carry
        start = first + c * r
        if sub == 1:
            stats, cnt = evaluate(start)
        else:
            def step(j, acc):
                s, k = evaluate(start + j * e)
                buf = jax.tree.map(lambda b, x: jax.lax.dynamic_update_slice_in_dim(b, x, j * e, 0), acc[0], s)
                return buf, jax.tree.map(jnp.add, acc[1], k)

            buf0 = jax.tree.map(lambda s: jnp.zeros((r, *s.shape[1:]), s.dtype), stats_shape)
            stats, cnt = jax.lax.fori_loop(0, sub, step, (buf0, zeros(counts_shape)))
        blocks = jax.tree.map(lambda b, s: b.at[c].set(tree_sum(s)), blocks, stats)
        return blocks, jax.tree.map(jnp.add, counts, cnt)

    blocks0 = jax.tree.map(lambda s: jnp.zeros((n_chunks, *s.shape[1:]), s.dtype), stats_shape)
    return jax.lax.fori_loop(0, n_chunks, reduction, (blocks0, zeros(counts_shape)))


def anchor_values_of(fn, args, anchors: jax.Array, rows: int) -> jax.Array:
    """float32 (a,): the game on the anchors (a, n), in calls of at most ``rows`` masks (the request's
    game-call size, so ``chunk_size`` bounds these calls too; no padding, so every row is a counted
    evaluation). The masks go through an optimization barrier: XLA would otherwise fold the constant
    masks into the game and round its rows differently from the same rows computed from drawn masks."""
    anchors = jax.lax.optimization_barrier(anchors)
    a, n = anchors.shape
    rows = max(1, min(rows, a))
    full, rest = divmod(a, rows)
    values = [jax.lax.map(lambda m: fn(args, m).astype(jnp.float32), anchors[:full * rows].reshape(full, rows, n))
              .reshape(-1)] if full > 1 else [fn(args, anchors[:rows]).astype(jnp.float32)]
    if rest:
        values.append(fn(args, anchors[full * rows:]).astype(jnp.float32))
    return jnp.concatenate(values)


def over_games(f, *xs):
    """``jax.vmap(f)(*xs)`` over the games' leading axis, except that a single game is called directly.

    Under vmap XLA keeps a game's ops from fusing with their reductions (a masked map times features,
    then pooled, becomes a materialised (B, n, D) product): one opaque game in the engine ran 3-10x
    slower than the same game bare (``benchmarks/opaque_game.py``). For several games the batched
    layout is what lets a model's layers see one batch."""
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        return jax.tree.map(lambda a: a[None], f(*jax.tree.map(lambda a: a[0], xs)))
    return jax.vmap(f)(*xs)


@functools.partial(jax.jit, static_argnames=("est", "fn", "n_units", "u", "n_chunks", "mesh", "r"))
def run_batch(est, fn, args, keys, *, n_units, u, n_chunks, mesh, r=None, shared=None, select=None):
    """phi (N, n) for N games ``fn(with_shared(shared, args[i]), .)`` with keys (N,); args carry a leading
    N axis, ``shared`` (e.g. the model parameters) none.

    u: units per game call (a divisor of r); n_chunks: reduction blocks per device; r: units per kept
    block sum (default ``reduction_block(est, n_units, u)``). :func:`plan` gives all of them.
    select: int32 (N, S), each game's selection handed to ``est.evaluate`` (e.g. the windows a screened
    local request estimates); None: none.
    """
    axis = mesh.axis_names[0]
    r = reduction_block(est, n_units, u) if r is None else r
    if r % u:
        raise ValueError(f"units per game call ({u}) must divide units per block ({r})")
    n_blocks = math.ceil(n_units / r)
    if select is None:
        select = jnp.zeros((keys.shape[0], 0), jnp.int32)

    def body(shared, args, keys, select):
        blocks, counts = over_games(lambda a, k, s: _device_blocks(est, fn, with_shared(shared, a), k, s, n_units,
                                                                   u, r, n_chunks, axis), args, keys, select)
        blocks = jax.tree.map(lambda b: jax.lax.all_gather(b, axis, axis=1, tiled=True)[:, :n_blocks], blocks)
        return jax.tree.map(jax.vmap(tree_sum), blocks), jax.lax.psum(counts, axis)

    total, counts = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(), P()), out_specs=P(),
                                  check_vma=False)(shared, args, keys, select)
    anchors = jnp.asarray(est.anchors())
    if len(anchors):
        anchor_values = over_games(lambda a, k: anchor_values_of(fn, with_shared(shared, a), anchors,
                                                                 u * est.evals_per_unit()),
                                   args, keys)  # keys give the games' axis when args is empty (a plain callable)
    else:
        anchor_values = jnp.zeros((keys.shape[0], 0), jnp.float32)
    return jax.vmap(lambda t, c, av: est.finalize(t, c, n_units, av))(total, counts, anchor_values)


class Plan(NamedTuple):
    """How a request is cut: units, units per game call ``u``, reduction blocks per device, evaluations
    per game, and units per kept block sum ``r`` (canonical: never from chunk_size or the devices)."""

    est: registry.Estimator
    n_units: int
    u: int
    n_chunks: int
    evaluations: int
    r: int


def _largest_divisor_at_most(r: int, limit: int) -> int:
    return max(d for d in range(1, min(r, max(1, limit)) + 1) if r % d == 0)


AUTO_SMALL = 20  # ``method="auto"``: games of at most this many players take ``stratified_kernel``, larger ones ``antithetic_cv``


def auto_method(n_players: int) -> str:
    """The estimator ``method="auto"`` runs for an n-player game (below the exact budget).

    From the estimator benchmark (error at equal evaluations): on the shapiq image games (n = 9, 14, 16;
    ``benchmarks/results/estimators_image_games.json``, budgets 200, 500, 1,000) ``stratified_kernel`` has the
    least error of ours at 7 of the 9 (model, budget) points and is within 1.07x of the best at the other two.
    For n = 196 (``estimators.json``) no estimator leads on every family: ``leverage`` has the least error on
    four families from 3,000 evaluations, but ``antithetic_cv`` leads on the size-dominated game, where
    ``kernel`` has 3.8x its error (``leverage`` 3.1x), and is never more than 2.1x from the best MSE (the
    independent CUB game at 30,000 evaluations, where ``leverage`` leads) while taking 10-20x less time than
    ``leverage``. So large games take ``antithetic_cv``."""
    return "stratified_kernel" if n_players <= AUTO_SMALL else "antithetic_cv"


def estimator(method: str, n_players: int, budget: int) -> registry.Estimator:
    """The estimator that runs ``method``: ``exact`` whenever the budget covers all 2^n coalitions
    (n <= exact.MAX_PLAYERS), whatever the method, so the result is the exact value and reports 2^n
    evaluations; otherwise ``method``'s own (``"auto"``: :func:`auto_method`'s), with the settings it takes
    from the budget (``Estimator.for_budget``: KernelSHAP's enumerated sizes)."""
    cls = registry.get(auto_method(n_players) if method == "auto" else method)
    if n_players <= exact.MAX_PLAYERS and 2 ** n_players <= budget:
        cls = exact.Exact
    return cls.for_budget(n_players, budget)


def plan(method: str, n_players: int, budget, bytes_per_evaluation: int, n_games: int, chunk_size, mesh) -> Plan:
    """Plan a request of ``method`` on an n-player game (see :class:`Plan` and :func:`plan_units`).
    When 2^n <= budget any method runs as ``exact`` (see :func:`estimator`)."""
    if not isinstance(n_players, int) or n_players < 1:
        raise FgvceError(f"n_players must be a positive integer, got {n_players!r}")
    if budget is None or int(budget) < 1:
        raise FgvceError(f"budget must be a positive number of game evaluations, got {budget!r}")
    est = estimator(method, n_players, int(budget))
    return plan_units(est, est.n_units(int(budget)), bytes_per_evaluation, n_games, chunk_size, mesh)


def plan_units(est: registry.Estimator, n_units: int, bytes_per_evaluation: int, n_games: int, chunk_size, mesh,
               most_evaluations: int = MAX_BLOCK_EVALUATIONS) -> Plan:
    """Cut ``n_units`` units of ``est`` over n_games games (see :class:`Plan`).

    The reduction blocks are canonical (see the module docstring). By default the game is called on
    evaluation blocks of canonical size E (at most ``most_evaluations`` per game) as well; a ``chunk_size``
    (evaluations per call) that is smaller makes the calls smaller -- the largest divisor of r that fits
    -- so memory follows it while the summation order does not move. Only a game whose rows XLA rounds
    differently at another batch size can then change (float matmuls at very small batches do, by about
    1e-7 relative).
    """
    sharding.evaluations_per_chunk(bytes_per_evaluation, chunk_size)  # FgvceError for a bad chunk_size
    e = evaluation_block(est, n_units, bytes_per_evaluation, n_games, most_evaluations)
    r = reduction_block(est, n_units, e)
    u = e
    if chunk_size is not None:
        u = _largest_divisor_at_most(r, min(e, int(chunk_size) // (est.evals_per_unit() * n_games)))
    n_chunks = math.ceil(math.ceil(n_units / r) / mesh.size)
    return Plan(est, n_units, u, n_chunks, n_units * est.evals_per_unit() + len(est.anchors()), r)


def estimate(game, n_players: int, *, method: str, budget: int, key: jax.Array,
             chunk_size: int | None = None, mesh=None) -> ShapleyResult:
    """Shapley values of an n-player game.

    Args:
      game: a :class:`Game` or a jax-traceable callable ``bool[B, n] -> float[B]``.
      n_players: n.
      method: a registered estimator (``exact``, ``permutation``, ``antithetic``, ``kernel``, ...), or ``"auto"``:
        the one the estimator benchmark shows best for the game size (:func:`auto_method`).
      budget: the most game evaluations to use; the result reports how many were used.
      key: a PRNG key; the same key gives bit-identical results.
      chunk_size: at most this many game evaluations per call (default: canonical blocks sized from the
        memory budget). Sums are taken in a canonical order, so the device count never changes a bit,
        and the chunk size does not either unless the game itself rounds rows differently at another
        batch size (see :func:`plan`).
      mesh: a 1-D device mesh (default: all devices).

    Returns:
      ShapleyResult(phi (n,) float32, evaluations int).
    """
    game = as_game(game)
    check_game(game, (n_players,))
    mesh = sharding.device_mesh(mesh)
    p = plan(method, n_players, budget, game.bytes_per_evaluation, 1, chunk_size, mesh)
    args = jax.tree.map(lambda a: jnp.asarray(a)[None], game.args)
    phi = run_batch(p.est, game.fn, args, key[None], n_units=p.n_units, u=p.u, n_chunks=p.n_chunks, mesh=mesh,
                    r=p.r)
    return ShapleyResult(phi[0], p.evaluations)
