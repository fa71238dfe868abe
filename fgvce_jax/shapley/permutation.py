"""Permutation sampling (Castro, Gomez and Tejada 2009).

For a uniform random permutation pi, the marginal contribution of player j is
``v(P_j + {j}) - v(P_j)`` with ``P_j`` the players before j in pi. Its mean
over permutations is the Shapley value phi_j. One permutation costs n + 1
evaluations (the n + 1 prefixes of pi, empty and full included), and the
marginals telescope, so every permutation satisfies efficiency exactly.
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


PAIRWISE_RANK_MAX = 1024  # up to this many items, ranks by O(n^2) comparisons beat XLA's CPU sort


def uniform_ranks(u: jax.Array) -> jax.Array:
    """rank (n,) int32 of each entry of u (n,) (distinct values): ``#{j : u_j < u_i}``."""
    if u.shape[0] <= PAIRWISE_RANK_MAX:
        return (u[None, :] < u[:, None]).sum(axis=1).astype(jnp.int32)
    return jnp.argsort(jnp.argsort(u)).astype(jnp.int32)


def random_rank(key: jax.Array, n: int) -> jax.Array:
    """rank (n,) int32 of each player in a uniform random permutation (ranks of n uniforms)."""
    return uniform_ranks(jax.random.uniform(key, (n,)))


def rank_of(prefixes: jax.Array) -> jax.Array:
    """rank (..., n) int32 recovered from prefix masks (..., n + 1, n): ``n - #prefixes holding j``."""
    n = prefixes.shape[-1]
    return (n - prefixes.sum(axis=-2)).astype(jnp.int32)


@register("permutation")
class Permutation(Estimator):
    """One unit = one random permutation: n + 1 evaluations; phi = mean of the marginals."""

    def evals_per_unit(self):
        return self.n + 1

    def masks(self, key, index):
        return prefix_masks(random_rank(key, self.n))

    def stats(self, masks, values, valid):
        phi = jax.vmap(marginals)(values, rank_of(masks))
        return jnp.where(valid[:, None], phi, 0.0).sum(axis=0)

    def finalize(self, total, n_units, anchor_values):
        return total / n_units
