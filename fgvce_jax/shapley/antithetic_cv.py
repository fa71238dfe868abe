"""Antithetic permutation sampling with the rank control variate of ``permutation_cv``.

A unit is a permutation pi and its reverse pi' (2 (n + 1) evaluations, as ``antithetic``); player
j has rank r_j in pi and n - 1 - r_j in pi', and the unit's plain estimate is
``a_j = (Delta_j(pi) + Delta_j(pi')) / 2``. Its control variate is
``g_j = (mu_{r_j} + mu_{n-1-r_j}) / 2 = mu~_{r_j}``, with mu~ the mean marginal per rank mirrored.
The unit's rank profile is ``rho_r = (d_r + d'_r + d_{n-1-r} + d'_{n-1-r}) / 4`` (d, d' the
per-rank marginals of pi and pi'), whose mean is mu~_r and whose sum is v(N) - v(empty). The
estimate, its unbiasedness for a fixed coefficient (h^(-u) estimated leave-one-unit-out), the
coefficient estimated from the data (now for n Var_r(mu~_r) removed per unit) and exact efficiency
follow word for word from :mod:`fgvce_jax.shapley.permutation_cv`, with C counting the ranks in pi.
"""
from __future__ import annotations

from fgvce_jax.shapley.antithetic import Antithetic
from fgvce_jax.shapley.permutation_cv import cv_stats, rank_controlled, rank_counts
from fgvce_jax.shapley.registry import register


@register("antithetic_cv")
class AntitheticCV(Antithetic):
    """One unit = a permutation and its reverse (2 (n + 1) evaluations), with the rank control variate."""

    min_units = 2

    def unit_stats(self, rank, values):
        k = self.n + 1
        d = (values[1:k] - values[:k - 1]) + (values[k + 1:] - values[k:-1])
        return cv_stats(super().unit_stats(rank, values), 0.25 * (d + d[::-1]), rank)

    def counts(self, ranks, valid):
        return rank_counts(ranks, valid)

    def finalize(self, total, counts, n_units, anchor_values):
        return rank_controlled(total, counts, n_units)
