"""Exact Shapley values by enumerating all 2^n coalitions (n <= 20).

    phi_j = sum_{S not containing j} w(|S|) [v(S + {j}) - v(S)],   w(s) = s! (n - s - 1)! / n!

Regrouped by coalition, each S contributes ``v(S) * c_j(S)`` with
``c_j(S) = w(|S| - 1)`` if j is in S and ``-w(|S|)`` otherwise, so one unit is
one coalition (unit i = the coalition whose bit j is bit j of i).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from fgvce_jax.errors import FgvceError
from fgvce_jax.shapley.registry import Estimator, register

MAX_PLAYERS = 20


def shapley_weights(n: int) -> np.ndarray:
    """w (n,) float64: w(s) = s! (n - s - 1)! / n! = 1 / (n * C(n - 1, s)) for s = 0..n-1."""
    return np.array([1.0 / (n * math.comb(n - 1, s)) for s in range(n)])


def coalition(index, n: int):
    """bool (..., n): the coalition whose bit j is bit j of ``index`` (int32 (...))."""
    return (index[..., None] >> jnp.arange(n)) & 1 == 1


@register("exact")
class Exact(Estimator):
    """One unit = one coalition; needs the whole 2^n budget."""

    def n_units(self, budget):
        if self.n > MAX_PLAYERS:
            raise FgvceError(f"exact enumerates 2^n coalitions and supports at most {MAX_PLAYERS} players, "
                             f"got {self.n}; use permutation, antithetic or kernel")
        if budget < 2 ** self.n:
            raise FgvceError(f"exact needs a budget of 2^{self.n} = {2 ** self.n} evaluations, got {budget}")
        return 2 ** self.n

    def evals_per_unit(self):
        return 1

    def draw_bytes(self):
        return 4 * self.n  # the coalition's bits

    def draw(self, key, index):
        return index

    def masks(self, index):
        return coalition(index, self.n)[None]

    def unit_stats(self, index, values):
        z = coalition(index, self.n)
        s = z.sum()
        w = jnp.asarray(shapley_weights(self.n), jnp.float32)
        return jnp.where(z, w[jnp.maximum(s - 1, 0)], -w[jnp.minimum(s, self.n - 1)]) * values[0]

    def finalize(self, total, counts, n_units, anchor_values):
        return total
