"""Antithetic permutation sampling: each permutation together with its reverse.

The reverse of pi puts the players that came late in pi early, so the two
marginals of a player are negatively correlated and their average has lower
variance than two independent permutations (Mitchell et al. 2022). One pair
costs 2 (n + 1) evaluations; each half telescopes, so efficiency is exact.

For an affine game both chains of prefixes are built by running sums of
contrib's rows (:func:`fgvce_jax.shapley.permutation.chain_values`).
"""
from __future__ import annotations

import jax.numpy as jnp

from fgvce_jax.shapley.permutation import (
    chain_values,
    marginals,
    order_of,
    prefix_masks,
    random_rank,
)
from fgvce_jax.shapley.registry import Estimator, register


@register("antithetic")
class Antithetic(Estimator):
    """One unit = a permutation and its reverse: 2 (n + 1) evaluations."""

    def evals_per_unit(self):
        return 2 * (self.n + 1)

    def draw(self, key, index):
        return random_rank(key, self.n)

    def masks(self, rank):
        return jnp.concatenate([prefix_masks(rank), prefix_masks(self.n - 1 - rank)])

    def unit_stats(self, rank, values):
        k = self.n + 1
        return 0.5 * (marginals(values[:k], rank) + marginals(values[k:], self.n - 1 - rank))

    def affine_values(self, rank, offset, contrib, readout):
        perm = order_of(rank)
        return chain_values(jnp.stack([perm, perm[::-1]]), offset, contrib, readout).reshape(-1)

    def finalize(self, total, counts, n_units, anchor_values):
        return total / n_units
