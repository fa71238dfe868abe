"""Stratified SVARM (Kolpaczki, Bengs, Muschalik and Huellermeier, "Approximating the Shapley Value
without Marginal Contributions", AAAI 2024), stratified by coalition size.

With phi_{i,l}^+ the mean of v(S + {i}) and phi_{i,l}^- the mean of v(S) over the S of size l among
the other players,

    phi_i = (1 / n) sum_{l=0}^{n-1} (phi_{i,l}^+ - phi_{i,l}^-).

Any one coalition A of size s is a uniform sample of stratum (i, s - 1, +) for every i in A and of
(i, s, -) for every i outside A, so one evaluation updates all n players.

Exact part (the paper's ExactCalculation, the 2n + 2 ``anchors``): v(empty), v({i}), v(N - {i}) and
v(N) give the strata of sizes 0, 1, n - 1 and n exactly: phi_{i,0}^+ = v({i}), phi_{i,0}^- = v(empty),
phi_{i,n-1}^+ = v(N), phi_{i,n-1}^- = v(N - {i}), phi_{i,1}^- = mean_{j != i} v({j}),
phi_{i,n-2}^+ = mean_{j != i} v(N - {j}).

Sampled part, sizes s = 2..n-2. The paper draws s i.i.d. from its distribution P(s) (proportional
to 1 / min(s, n - s); for even n the middle size gets 1 / (n ln n)) and A uniform of size s. Here one
unit is a fixed allocation of that distribution instead, ``m_s = max(1, round((n - 3) P(s)))`` per size,
drawn in *complementary pairs*: for each size s <= n / 2, m_s coalitions A of size s, each from its own
random permutation (the players of rank < s), together with its complement N - A (size n - s, so P's
symmetry gives sizes above n / 2 their m_s; the middle size of an even n gets 2 m_{n/2}). Every size is
sampled in every unit, and every coalition is uniform given its size. Coalitions of different pairs are
independent: an earlier version took all sizes' coalitions as nested prefixes of a few shared
permutations, and that correlation between a player's strata multiplied its error by 1.8 on the
49-player peers game and by 30-70 on the 196-player games (``docs/shapley.md``). A stratum's estimate is
a ratio of a float sum (``unit_stats``: v(A) per slot and player, and v(A) per slot) to an int32 count
(``counts``); the sums of ``minus`` are recovered as ``sum v - sum plus`` per slot. A sampled stratum
that no coalition hit (possible at small budgets: a player is in a coalition of size s with probability
s / n) takes the mean of v over all the sampled coalitions of its size, i.e. no effect of the player at
that size. The authors' code instead leaves such a stratum out and averages the player's other strata,
which in a game whose value grows with |S| is far off: on the 196-player size-dominated CUB game at
1,000 evaluations that gave 5.8e4 times antithetic's MSE. Either way the estimate is biased until every
stratum is hit, which it is with high probability after a few units.

For an affine game a pair's two values come from one (n,) x (n, C) product a = A.c: s(A) = o + a and
s(N - A) = o + T - a, with o the offset and T the sum of contrib's rows.

Efficiency is imposed: the estimate is projected onto sum_i phi_i = v(N) - v(empty) (both anchors) by
subtracting the mean excess from every player (``registry.efficient``). The projection keeps the estimate
unbiased and is not tuned to any game; on the 49-player peers game at 2,500 evaluations it moved the
relative error from 0.0524 to 0.0521 (100 seeds).

Per-unit statistics are (m, n + 1) floats with m ~ (n - 3) + the extra small/large-size slots
(m = 278 for n = 196: 218 kB per unit), which the engine keeps for one reduction block.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fgvce_jax.errors import FgvceError
from fgvce_jax.shapley.permutation import random_rank
from fgvce_jax.shapley.registry import Estimator, efficient, register


def size_distribution(n: int) -> np.ndarray:
    """P (n - 3,) over sizes s = 2..n-2, the paper's: proportional to 1 / min(s, n - s), and for even n
    the middle size n / 2 gets 1 / (n ln n) (normalised, which only matters for n = 4)."""
    s = np.arange(2, n - 1)
    h = np.sum(1.0 / np.arange(2, (n - 1) // 2 + 1))  # H_{floor((n - 1) / 2)} - 1
    middle = 1.0 / (n * math.log(n)) if n % 2 == 0 else 0.0
    p = np.where(2 * s == n, middle, (1.0 - middle) / (2.0 * max(h, 1e-30) * np.minimum(s, n - s)))
    return p / p.sum()


def allocation(n: int) -> np.ndarray:
    """m_s (n - 3,) int: coalitions of size s = 2..n-2 per unit, ``max(1, round((n - 3) P(s)))``."""
    return np.maximum(1, np.rint((n - 3) * size_distribution(n))).astype(int)


def pair_sizes(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(layer (P,), size (P,)) int: the unit's pairs, layer-major: pair (k, s) for s = 2..n/2 and k < m_s."""
    m_s = allocation(n)
    layer, size = zip(*[(k, s) for k in range(m_s.max()) for s in range(2, n // 2 + 1) if k < m_s[s - 2]])
    return np.array(layer), np.array(size)


def slots(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(group (m,), size (m,)) int: the unit's m = 2P coalitions, the pairs' A then their complements; within
    a group (a layer of A's, or of complements) every size occurs at most once."""
    layer, size = pair_sizes(n)
    return np.concatenate([2 * layer, 2 * layer + 1]), np.concatenate([size, n - size])


def border_masks(n: int) -> np.ndarray:
    """bool (2n + 2, n): empty, the n singletons, the n complements of singletons, the grand coalition."""
    eye = np.eye(n, dtype=bool)
    return np.concatenate([np.zeros((1, n), bool), eye, ~eye, np.ones((1, n), bool)])


def by_size(slot_totals: jax.Array, n: int) -> jax.Array:
    """(n - 3, ...) per size s = 2..n-2: the slots' totals (m, ...) summed per size, group by group in a
    fixed order (elementwise adds only, so the bits never depend on the backend's scatter order)."""
    group, size = slots(n)
    out = jnp.zeros((n - 3, *slot_totals.shape[1:]), slot_totals.dtype)
    for k in range(group.max() + 1):
        rows = np.flatnonzero(group == k)
        out = out.at[size[rows] - 2].add(slot_totals[rows], unique_indices=True)
    return out


def stratum_means(sums: jax.Array, counts: jax.Array, size_mean: jax.Array) -> jax.Array:
    """Stratum means (n - 3, n) from sums and int counts of that shape: sums / counts where counts > 0, else the
    mean of v over all the sampled coalitions of the stratum's size, ``size_mean`` (n - 3,)."""
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), size_mean[:, None])


@register("stratified_svarm")
class StratifiedSvarm(Estimator):
    """One unit = the allocation's m coalitions (P uniform coalitions and their complements), plus 2n + 2
    exact anchors."""

    def n_units(self, budget):
        if self.n < 4:
            raise FgvceError(f"stratified_svarm needs at least 4 players (the anchors alone are exact for "
                             f"{self.n}); use exact")
        return super().n_units(budget)

    def anchors(self):
        return border_masks(self.n)

    def evals_per_unit(self):
        return len(slots(self.n)[0])

    def draw_bytes(self):
        pairs = len(pair_sizes(self.n)[0])
        return 4 * self.n * (pairs * self.n + 2 * self.evals_per_unit())  # pairwise ranks; masks and statistics

    def draw(self, key, index):
        """rank (P, n) int32: one random permutation's ranks per pair."""
        pairs = len(pair_sizes(self.n)[0])
        return jax.vmap(lambda k: random_rank(k, self.n))(jax.random.split(key, pairs))

    def masks(self, rank):
        first = rank < pair_sizes(self.n)[1][:, None]
        return jnp.concatenate([first, ~first])

    def unit_stats(self, rank, values):
        return {"plus": jnp.where(self.masks(rank), values[:, None], 0.0), "value": values}

    def affine_values(self, rank, offset, contrib, readout):
        first = (rank < pair_sizes(self.n)[1][:, None]).astype(contrib.dtype) @ contrib  # (P, C)
        return jnp.concatenate([readout(offset + first), readout(offset + contrib.sum(0) - first)])

    def counts(self, ranks, valid):
        return {"plus": (jax.vmap(self.masks)(ranks) & valid[:, None, None]).sum(0, dtype=jnp.int32)}

    def finalize(self, total, counts, n_units, anchor_values):
        n = self.n
        v0, single, co, v1 = anchor_values[0], anchor_values[1:n + 1], anchor_values[n + 1:2 * n + 1], anchor_values[-1]
        per_size = n_units * np.bincount(slots(n)[1] - 2, minlength=n - 3)  # coalitions of each size (n - 3,)
        plus_count = by_size(counts["plus"], n)  # (n - 3, n)
        minus_count = per_size[:, None] - plus_count
        value_sum = by_size(total["value"], n)
        plus_sum = by_size(total["plus"], n)
        size_mean = value_sum / per_size
        plus = stratum_means(plus_sum, plus_count, size_mean)
        minus = stratum_means(value_sum[:, None] - plus_sum, minus_count, size_mean)
        others = lambda v: (v.sum() - v) / (n - 1)  # mean over j != i
        plus_exact = single + others(co) + v1  # sizes 1, n - 1, n
        minus_exact = v0 + others(single) + co  # sizes 0, 1, n - 1
        return efficient(((plus_exact + plus.sum(0)) - (minus_exact + minus.sum(0))) / n, v1 - v0)
