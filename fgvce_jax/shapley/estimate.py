"""The estimation engine: ``estimate(game, n, method=..., budget=..., key=...)``.

Units (see :mod:`fgvce_jax.shapley.registry`) are numbered 0..U_total-1 and
unit i uses ``fold_in(key, i)``. Each device of a 1-D mesh walks a contiguous
range of units in chunks (a ``fori_loop``), the game is evaluated on a whole
chunk's masks at once, and the per-device statistics are summed with ``psum``.
Units past U_total (padding) are masked out. The same code runs vmapped over
a batch of games (one per image) for :func:`fgvce_jax.saliency.compute`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fgvce_jax.errors import FgvceError
from fgvce_jax.shapley import registry, sharding
from fgvce_jax.shapley.game import as_game, check_game


class ShapleyResult(NamedTuple):
    """phi (n,) (or (N, n) for a batch of games) and the number of game evaluations used per game."""

    phi: jax.Array
    evaluations: int


def _unit_sums(est, fn, args, key, n_units, u, n_chunks, axis):
    """Statistics summed over this device's units of one game (runs inside shard_map)."""
    m, n = est.evals_per_unit(), est.n
    first = jax.lax.axis_index(axis) * n_chunks * u

    def chunk(c, acc):
        idx = first + c * u + jnp.arange(u)
        masks = jax.vmap(lambda i: est.masks(jax.random.fold_in(key, i), i))(idx)  # (u, m, n)
        values = fn(args, masks.reshape(u * m, n)).reshape(u, m).astype(jnp.float32)
        return jax.tree.map(jnp.add, acc, est.stats(masks, values, idx < n_units))

    shapes = jax.eval_shape(est.stats, jax.ShapeDtypeStruct((u, m, n), jnp.bool_),
                            jax.ShapeDtypeStruct((u, m), jnp.float32), jax.ShapeDtypeStruct((u,), jnp.bool_))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.fori_loop(0, n_chunks, chunk, zero)


@functools.partial(jax.jit, static_argnames=("est", "fn", "n_units", "u", "n_chunks", "mesh"))
def run_batch(est, fn, args, keys, *, n_units, u, n_chunks, mesh):
    """phi (N, n) for N games ``fn(args[i], .)`` with keys (N,); args carry a leading N axis."""
    axis = mesh.axis_names[0]

    def body(args, keys):
        sums = jax.vmap(lambda a, k: _unit_sums(est, fn, a, k, n_units, u, n_chunks, axis))(args, keys)
        return jax.lax.psum(sums, axis)

    total = jax.shard_map(body, mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False)(args, keys)
    anchors = jnp.asarray(est.anchors())
    if len(anchors):
        anchor_values = jax.vmap(lambda a, k: fn(a, anchors).astype(jnp.float32))(args, keys)
    else:
        anchor_values = jnp.zeros((keys.shape[0], 0), jnp.float32)
    return jax.vmap(lambda t, av: est.finalize(t, n_units, av))(total, anchor_values)


def plan(method: str, n_players: int, budget, bytes_per_evaluation: int, n_games: int, chunk_size, mesh):
    """(estimator, units, units per chunk, chunks per device, evaluations per game) for a request."""
    if not isinstance(n_players, int) or n_players < 1:
        raise FgvceError(f"n_players must be a positive integer, got {n_players!r}")
    if budget is None or int(budget) < 1:
        raise FgvceError(f"budget must be a positive number of game evaluations, got {budget!r}")
    est = registry.get(method)(n_players)
    n_units = est.n_units(int(budget))
    m = est.evals_per_unit()
    per_chunk = sharding.evaluations_per_chunk(bytes_per_evaluation, chunk_size)
    u, n_chunks = sharding.layout(n_units, max(1, per_chunk // (m * n_games)), mesh.size)
    return est, n_units, u, n_chunks, n_units * m + len(est.anchors())


def estimate(game, n_players: int, *, method: str, budget: int, key: jax.Array,
             chunk_size: int | None = None, mesh=None) -> ShapleyResult:
    """Shapley values of an n-player game.

    Args:
      game: a :class:`Game` or a jax-traceable callable ``bool[B, n] -> float[B]``.
      n_players: n.
      method: a registered estimator (``exact``, ``permutation``, ``antithetic``, ``kernel``, ...).
      budget: the most game evaluations to use; the result reports how many were used.
      key: a PRNG key; the same key gives bit-identical results.
      chunk_size: game evaluations per chunk on one device (default: from the memory budget).
        It never changes the result beyond float rounding of the sums.
      mesh: a 1-D device mesh (default: all devices).

    Returns:
      ShapleyResult(phi (n,) float32, evaluations int).
    """
    game = as_game(game)
    check_game(game, (n_players,))
    mesh = sharding.device_mesh(mesh)
    est, n_units, u, n_chunks, evaluations = plan(method, n_players, budget, game.bytes_per_evaluation, 1,
                                                  chunk_size, mesh)
    args = jax.tree.map(lambda a: jnp.asarray(a)[None], game.args)
    phi = run_batch(est, game.fn, args, key[None], n_units=n_units, u=u, n_chunks=n_chunks, mesh=mesh)
    return ShapleyResult(phi[0], evaluations)
