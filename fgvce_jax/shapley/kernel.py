"""KernelSHAP (Lundberg and Lee 2017): paired, size-enumerated where the budget allows, stratified, efficiency
exact.

The Shapley values solve the kernel-weighted least squares over all coalitions
0 < |S| < n (Charnes et al. 1988; Lundberg and Lee 2017)

    min_phi  sum_S w(|S|) (z_S . phi - (v(S) - v(0)))^2   s.t.   1 . phi = v(1) - v(0),
    w(s) = (n - 1) / (C(n, s) s (n - s)),   K(s) = C(n, s) w(s) = (n - 1) / (s (n - s))

(K(s): the kernel mass of size s). The estimator keeps the sum exact where it is cheap and
samples the rest:

- **border**: every coalition of the sizes 1..L and n - L..n - 1 is an anchor, evaluated once per game
  and weighted w(s) exactly. L >= 1 always (the 2n singletons and complements, as Musco and Witter 2025
  do); :meth:`Kernel.for_budget` raises L while the budget would spend at least as many evaluations on the
  next sizes {L + 1, n - L - 1} by sampling as they have coalitions (the "border trick" of shapiq's
  coalition sampler: a stratum the samples would cover is enumerated instead, so it carries no sampling
  noise). On the 9-player image games at 500 evaluations that enumerates sizes 1-3 and 6-8 (258 of the
  512 coalitions) and samples only sizes 4 and 5;
- **sampled sizes** L+1..n-L-1: unit i is a coalition z of size s_i and its complement
  (paired sampling, Covert and Lee 2021), z a uniform subset of that size from unit i's key.
  Sizes follow q(s) ∝ K(s) / k_s with integer size weights k_s (here k_s = 1: sizes
  proportional to the kernel; :mod:`fgvce_jax.shapley.leverage` makes them nearly uniform).
  s_i is the inverse CDF of q at the golden-ratio (Weyl) point u_i = frac(i phi + 1/2), a
  deterministic low-discrepancy sequence in the unit index: for every size the number of
  units of U with that size is within a few of U q(s) (no multinomial noise in the size
  counts), and unit i still depends on (key, i) alone.

The importance weight of a sampled pair is K(s) / q(s) / 2 per row = Z k_s / 2 with
Z = sum_{s=L+1}^{n-L-1} K(s) / k_s, so over U units the sampled rows carry c2 k_s, c2 = Z / (2 U).
With A_b = sum_border w(|S|) z z^T, b_b = sum_border w(|S|) z (v - v(0)),
A_s = sum_units k_s (z z^T + ~z ~z^T) and b_s = sum_units k_s (z (v(z) - v0) + ~z (v(~z) - v0)):

    A = A_b + c2 A_s,   b = b_b + c2 b_s,
    phi = A^-1 (b - lam 1),   lam = (1^T A^-1 b - (v(1) - v(0))) / (1^T A^-1 1),

the projected (efficiency-constrained) solve, so efficiency holds exactly whatever A is.
A_s holds exact integer counts (int32 ``counts``: a float product of 0/1 rows times
k_s < 1024 is exact below 2^24 per block); ``k_s sum z v`` is a per-unit float statistic
that the engine sums in its fixed order. A gets a ridge of 1e-6 mean(diag A).

Deviation from sampling proper: the sizes are a fixed sequence, so the size counts differ from
U q(s) by the sequence's discrepancy (O(log U) units per size), a relative weight error that
vanishes as 1/U; given its size, each subset is uniform, so the estimate is consistent.
Coalitions are drawn with replacement (units are independent; see docs/shapley.md).

v(empty), v(full) and the border are the 2 + 2 sum_{s<=L} C(n, s) anchors; one unit is a pair
(2 evaluations), so the smallest budget is 2 n + 4. Fewer than 4 players have no sampled sizes (and
2^n <= 2 n + 4 is exact in the engine).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fgvce_jax.errors import FgvceError
from fgvce_jax.shapley.permutation import uniform_ranks
from fgvce_jax.shapley.registry import Estimator, register

GOLDEN = 2654435769  # round(2^32 (sqrt(5) - 1) / 2): the Weyl step frac(phi) in 32-bit fixed point
MAX_SIZE_WEIGHT = 1023  # k_s * (2 rows * 2^13 units per block) stays below 2^24: exact float counts


def kernel_mass(n: int) -> np.ndarray:
    """K (n + 1,) float64: K(s) = (n - 1) / (s (n - s)) for s = 1..n-1, the Shapley kernel summed
    over the C(n, s) coalitions of size s; 0 for s = 0 and n."""
    s = np.arange(n + 1)
    inner = (s > 0) & (s < n)
    return np.where(inner, (n - 1) / np.where(inner, s * (n - s), 1), 0.0)


def size_cdf(n: int, k: np.ndarray, border: int = 1) -> np.ndarray:
    """cdf (n - 2 border - 1,) float64 of q(s) ∝ K(s) / k_s over the sampled sizes s = border+1..n-border-1."""
    q = kernel_mass(n)[border + 1:n - border] / k[border + 1:n - border]
    return np.cumsum(q) / q.sum()


def border_size(n: int, budget: int, k: np.ndarray) -> int:
    """L >= 1: the sizes 1..L and n-L..n-1 to enumerate for a ``budget`` (the border trick, see the module).

    With L enumerated, the rest of the budget (after v(empty), v(full) and the border) samples pairs whose
    sizes follow q over L+1..n-L-1; its expected evaluations of sizes {s, n - s}, s = L + 1, are
    rest * (q(s) + q(n - s)). When that is at least their 2 C(n, s) coalitions (C(n, s) for s = n / 2, where
    a pair is two coalitions of the same size), those sizes are enumerated instead, as long as a sampled size
    and one pair of samples remain."""
    rest = budget - 2 - 2 * n
    border = 1
    while 2 * border + 4 <= n:
        s = border + 1
        q = np.diff(size_cdf(n, k, border), prepend=0.0)  # q[j]: size border + 1 + j
        coalitions = math.comb(n, s) * (1 if 2 * s == n else 2)
        expected = rest * (q[0] + q[-1]) if 2 * s != n else rest * q[0]
        if expected < coalitions or rest - coalitions < 2:
            break
        rest -= coalitions
        border += 1
    return border


@functools.cache
def border_rows(n: int, border: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows bool (a, n), w float64 (a,)): every coalition of sizes 1..border in lexicographic order, then
    their complements (sizes n-1..n-border), and each row's kernel weight w(|S|) = K(|S|) / C(n, |S|)."""
    small = [np.isin(np.arange(n), c) for s in range(1, border + 1) for c in itertools.combinations(range(n), s)]
    rows = np.asarray(small, bool).reshape(-1, n)
    rows = np.concatenate([rows, ~rows])
    sizes = rows.sum(1)
    return rows, kernel_mass(n)[sizes] / np.asarray([math.comb(n, int(s)) for s in sizes], np.float64)


def weyl_point(index: jax.Array) -> jax.Array:
    """u in [0, 1) float32: frac(index (sqrt(5) - 1) / 2 + 1/2) in exact 32-bit integer arithmetic
    (the golden-ratio Kronecker sequence, the lowest-discrepancy one-dimensional rotation)."""
    h = index.astype(jnp.uint32) * jnp.uint32(GOLDEN) + jnp.uint32(2 ** 31)
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def constrained_wls(A: jax.Array, b: jax.Array, total: jax.Array) -> jax.Array:
    """argmin ||Z phi - y||^2 subject to sum(phi) = total, from A = Z^T Z (n, n) and b = Z^T y (n,)."""
    n = A.shape[0]
    ridge = 1e-6 * jnp.maximum(jnp.trace(A) / n, 1.0)
    ones = jnp.ones(n, A.dtype)
    x = jnp.linalg.solve(A + ridge * jnp.eye(n, dtype=A.dtype), jnp.stack([b, ones], axis=1))
    a_b, a_1 = x[:, 0], x[:, 1]
    lam = (a_b.sum() - total) / a_1.sum()
    return a_b - lam * a_1


@register("kernel")
@dataclasses.dataclass(frozen=True)
class Kernel(Estimator):
    """One unit = a coalition of a stratified size in border+1..n-border-1 and its complement (2 evaluations);
    anchors: v(empty), v(full) and every coalition of sizes 1..border and n-border..n-1."""

    border: int = 1

    @classmethod
    def for_budget(cls, n, budget):
        """The border the budget affords (:func:`border_size`); 1 below the smallest budget."""
        return cls(n, border_size(n, int(budget), cls(n).size_weights()) if n >= 4 else 1)

    def size_weights(self) -> np.ndarray:
        """k (n + 1,) int: the integer regression weight of a sampled row of size s (q(s) ∝ K(s) / k_s).
        KernelSHAP samples sizes proportionally to the kernel: k = 1."""
        return np.ones(self.n + 1, np.int64)

    def anchors(self):
        return np.concatenate([np.zeros((1, self.n), bool), np.ones((1, self.n), bool),
                               border_rows(self.n, self.border)[0]])

    def n_units(self, budget):
        if self.n < 4:
            raise FgvceError(f"{self.name} samples coalition sizes 2..n-2 and needs at least 4 players, got "
                             f"{self.n}; a budget of 2^{self.n} = {2 ** self.n} evaluations is exact")
        units = super().n_units(budget)
        if 2 * units * int(self.size_weights().max()) >= 2 ** 31:
            raise FgvceError(f"{self.name} counts overflow int32 beyond {2 ** 30 // int(self.size_weights().max())} "
                             f"pairs for {self.n} players, got a budget of {budget}")
        return units

    def evals_per_unit(self):
        return 2

    def draw(self, key, index):
        """(z (n,) bool, k_s float32): a uniform subset of size s_index and its size weight."""
        k = self.size_weights()
        cdf = jnp.asarray(size_cdf(self.n, k, self.border)[:-1], jnp.float32)
        s = self.border + 1 + jnp.searchsorted(cdf, weyl_point(index), side="right")
        z = uniform_ranks(jax.random.uniform(key, (self.n,))) < s
        return z, jnp.asarray(k, jnp.float32)[s]

    def masks(self, draw):
        z, _ = draw
        return jnp.stack([z, ~z])

    def unit_stats(self, draw, values):
        z, k = draw
        return k * jnp.where(z, values[0], values[1])  # k (z v(z) + ~z v(~z)): one term is zero, so exact

    def counts(self, draws, valid):
        """A_s = sum over the block's pairs of k_s (z z^T + ~z ~z^T), as int32 (exact: see the module)."""
        z, k = draws
        rows = jnp.concatenate([z, ~z]).astype(jnp.float32)
        weights = jnp.where(jnp.concatenate([valid, valid]), jnp.concatenate([k, k]), 0.0)
        a = jnp.matmul((rows * weights[:, None]).T, rows, precision=jax.lax.Precision.HIGHEST)
        return {"A": a.astype(jnp.int32)}

    def finalize(self, total, counts, n_units, anchor_values):
        n, border = self.n, self.border
        v0, v1 = anchor_values[0], anchor_values[1]
        rows, w = border_rows(n, border)
        k = self.size_weights()
        c2 = float((kernel_mass(n)[border + 1:n - border] / k[border + 1:n - border]).sum() / (2 * n_units))
        A_s = counts["A"].astype(jnp.float32)
        b_s = total - v0 * jnp.diagonal(A_s)  # sum k z (v - v0); z binary, so sum k z = diag(A_s)
        A_b = jnp.asarray((rows.T * w) @ rows, jnp.float32)  # sum_border w z z^T, exact in float64
        b_b = jnp.matmul(jnp.asarray(rows.T * w, jnp.float32), anchor_values[2:] - v0,
                         precision=jax.lax.Precision.HIGHEST)
        return constrained_wls(A_b + c2 * A_s, b_b + c2 * b_s, v1 - v0)
