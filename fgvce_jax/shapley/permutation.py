"""Permutation sampling (Castro, Gomez and Tejada 2009).

For a uniform random permutation pi, the marginal contribution of player j is
``v(P_j + {j}) - v(P_j)`` with ``P_j`` the players before j in pi. Its mean
over permutations is the Shapley value phi_j. One permutation costs n + 1
evaluations (the n + 1 prefixes of pi, empty and full included), and the
marginals telescope, so every permutation satisfies efficiency exactly.

For an affine game ``v(m) = readout(offset + m @ contrib)`` the n + 1 prefixes'
pre-readout sums are ``offset`` plus the running sums of contrib's rows taken in
permutation order: O(n C) adds instead of an (n + 1, n) x (n, C) product
(:meth:`Permutation.affine_values`, :func:`chain_values`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fgvce_jax.shapley.registry import Estimator, register


def prefix_masks(rank: jax.Array) -> jax.Array:
    """bool (n + 1, n): row k holds the players of rank < k (rank (n,) int, a permutation's inverse)."""
    n = rank.shape[0]
    return jnp.arange(n + 1)[:, None] > rank[None, :]


def marginals(values: jax.Array, rank: jax.Array) -> jax.Array:
    """phi (n,) of one permutation: player j gets ``values[rank_j + 1] - values[rank_j]``.

    values (n + 1,) are the game on ``prefix_masks(rank)``.
    """
    return (values[1:] - values[:-1])[rank]


def order_of(rank: jax.Array) -> jax.Array:
    """perm (n,) int32, the players in permutation order (the inverse of rank): ``perm[rank_j] = j``.

    Its own inverse too: ``order_of(perm)`` is rank.
    """
    n = rank.shape[0]
    return jnp.zeros(n, jnp.int32).at[rank].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True)


PAIRWISE_RANK_MAX = 1024  # up to this many items, ranks by O(n^2) comparisons beat XLA's CPU sort


def uniform_ranks(u: jax.Array) -> jax.Array:
    """rank (n,) int32 of each entry of u (n,): ``#{j : u_j < u_i}``, ties broken by index (a permutation).

    float32 uniforms tie often enough to matter (about 0.2% of draws of 196), and a tie would give two
    players the same rank. Up to PAIRWISE_RANK_MAX items by comparisons (measured in the engine at
    n = 196: faster than a stable argsort and its inverse), beyond by the argsort.
    """
    n = u.shape[0]
    if n <= PAIRWISE_RANK_MAX:
        i = jnp.arange(n)
        before = (u[None, :] < u[:, None]) | ((u[None, :] == u[:, None]) & (i[None, :] < i[:, None]))
        return before.sum(axis=1).astype(jnp.int32)
    return order_of(jnp.argsort(u, stable=True).astype(jnp.int32))


def random_rank(key: jax.Array, n: int) -> jax.Array:
    """rank (n,) int32 of each player in a uniform random permutation (ranks of n uniforms)."""
    return uniform_ranks(jax.random.uniform(key, (n,)))


def chain_values(orders: jax.Array, offset: jax.Array, contrib: jax.Array, readout) -> jax.Array:
    """values (k, n + 1) of an affine game on k chains of prefixes, without the (n + 1, n) x (n, C) product.

    orders (k, n) int: players in the order they join; entry (i, j) = ``readout(offset + sum of
    contrib[orders[i, :j]])``, i.e. the game on the prefix of length j. A scan over the n positions
    adds one contrib row per chain and reads the (k, C) running sums out: O(n C) per chain and
    nothing bigger than (k, C) live, which beats both the product and a materialised prefix sum
    (``jnp.cumsum`` or a blocked one: memory-bound) on XLA CPU.
    """
    def step(s, players):
        s = s + contrib[players]
        return s, readout(s)

    start = jnp.broadcast_to(offset, (orders.shape[0], offset.shape[0]))
    _, vals = jax.lax.scan(step, start, orders.T)  # (n, k)
    return jnp.concatenate([readout(start)[None], vals]).T


@register("permutation")
class Permutation(Estimator):
    """One unit = one random permutation: n + 1 evaluations; phi = mean of the marginals."""

    def evals_per_unit(self):
        return self.n + 1

    def draw(self, key, index):
        return random_rank(key, self.n)

    def masks(self, rank):
        return prefix_masks(rank)

    def unit_stats(self, rank, values):
        return marginals(values, rank)

    def affine_values(self, rank, offset, contrib, readout):
        return chain_values(order_of(rank)[None], offset, contrib, readout)[0]

    def finalize(self, total, counts, n_units, anchor_values):
        return total / n_units
