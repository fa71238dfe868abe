"""Stratified KernelSHAP: the border enumerated, every other size sampled *without replacement*, each size's
kernel mass exact.

KernelSHAP's regression (:mod:`fgvce_jax.shapley.kernel`: the Shapley kernel's weighted least squares with
efficiency as an exact constraint) sums w(|S|) z z^T and w(|S|) z (v(S) - v(0)) over all coalitions. Per
size s this is K(s) times the mean over the C(n, s) coalitions of that size (K(s) = C(n, s) w(s), the size's
kernel mass). This estimator keeps that structure:

- **border**: the sizes 1..L and n-L..n-1 are enumerated (:func:`fgvce_jax.shapley.kernel.border_size`, the
  border trick), weighted w(s), as in ``kernel``;
- **strata**: the rest of the budget is split over the pair strata {s, n - s}, s = L+1..floor(n/2), in
  proportion to their kernel mass (2 K(s), or K(n/2) for the middle size), by largest remainders, capped
  at the stratum's size. Stratum s gets c_s units; a unit is a coalition z of size s and its complement
  (paired sampling); for s = n/2 the coalitions that hold player 0 stand for the C(n, n/2)/2 pairs;
- **without replacement**: unit r of stratum s takes the coalition of lexicographic rank pi_s(r), pi_s a
  random bijection of 0..N_s-1 (N_s = C(n, s), or C(n, n/2)/2) drawn from the request's key: a 4-round
  Feistel network on 2h bits (2^2h >= N_s) with cycle walking, then the combinatorial number system. Its
  c_s <= N_s units are distinct coalitions, a uniformly random c_s-subset of the stratum;
- **exact stratum weights**: each sampled row of stratum s carries K(s) / c_s (K(s) / (2 c_s) in the middle),
  so the stratum's rows estimate K(s) mean_{|S|=s} [z z^T] and K(s) mean z (v - v0) without bias, and
  carry exactly the stratum's kernel mass (no size-count noise).

    A = A_border + sum_s (K(s) / c_s) A_s,   b = b_border + sum_s (K(s) / c_s) b_s,
    phi = argmin_{1.phi = v(1) - v(0)} phi^T A phi - 2 b^T phi    (``kernel.constrained_wls``)

with A_s the int32 count sum_units (z z^T + ~z ~z^T) of stratum s (exact) and b_s = sum_units z (v(z) - v0)
+ ~z (v(~z) - v0) its float statistic, kept per stratum. A stratum with c_s = N_s is enumerated, so a budget
that covers the sizes that matter gives their exact sums. Like shapiq's KernelSHAP (border trick, sampling
without replacement), but the strata are allocated, not drawn, and unit i still depends on (key, i) alone
(:meth:`draws`), so results are bit-identical on any device count and chunking.

Players: at most :data:`MAX_PLAYERS` (ranks and binomials in int32); beyond, ``kernel`` and ``leverage``
sample with replacement, where repeats are negligible anyway. Consistent, not unbiased (a ratio of
unbiased sums), like every regression estimator.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fgvce_jax.errors import FgvceError
from fgvce_jax.shapley.kernel import border_rows, border_size, constrained_wls, kernel_mass
from fgvce_jax.shapley.registry import Estimator, register

MAX_PLAYERS = 32  # C(32, 16) < 2^31: every rank and binomial fits int32
ROUNDS = 4  # Feistel rounds of the random bijection


def pair_strata(n: int, border: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sizes s = border+1..n//2, their kernel masses 2 K(s) (K(n/2) in the middle), their pair counts N_s
    = C(n, s) (C(n, n/2) / 2 in the middle)), each (J,)."""
    sizes = np.arange(border + 1, n // 2 + 1)
    middle = 2 * sizes == n
    mass = kernel_mass(n)[sizes] * np.where(middle, 1, 2)
    pairs = np.asarray([math.comb(n, int(s)) // (2 if m else 1) for s, m in zip(sizes, middle)], np.int64)
    return sizes, mass, pairs


def allocate(units: int, mass: np.ndarray, pairs: np.ndarray) -> tuple[int, ...]:
    """c (J,): ``units`` split in proportion to ``mass`` by largest remainders, each capped at its ``pairs``."""
    raw = units * mass / mass.sum()
    c = np.floor(raw).astype(np.int64)
    c[np.argsort(-(raw - c), kind="stable")[:units - int(c.sum())]] += 1
    return tuple(int(x) for x in np.minimum(c, pairs))


def _mix(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash (the murmur3 finaliser): uint32 -> uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def feistel(x: jax.Array, half_bits: jax.Array, round_keys: jax.Array) -> jax.Array:
    """A bijection of 0..2^(2h)-1 (h = ``half_bits``): ROUNDS balanced Feistel rounds on the two h-bit halves,
    round function ``_mix(R ^ k_r)`` masked to h bits. Any round function gives a bijection."""
    mask = (jnp.uint32(1) << half_bits) - jnp.uint32(1)
    left, right = x >> half_bits, x & mask
    for r in range(ROUNDS):
        left, right = right, left ^ (_mix(right ^ round_keys[r]) & mask)
    return (left << half_bits) | right


def permute(r: jax.Array, n_items: jax.Array, half_bits: jax.Array, round_keys: jax.Array) -> jax.Array:
    """pi(r) for r in 0..n_items-1: :func:`feistel` walked until it lands below ``n_items`` (cycle walking, a
    bijection of 0..n_items-1 because r's cycle returns to r < n_items); uint32."""
    first = feistel(r.astype(jnp.uint32), half_bits, round_keys)
    return jax.lax.while_loop(lambda x: x >= n_items.astype(jnp.uint32),
                              lambda x: feistel(x, half_bits, round_keys), first)


def binomials(n: int) -> np.ndarray:
    """int64 (n + 1, n + 1): C(a, b) (0 for b > a)."""
    return np.asarray([[math.comb(a, b) for b in range(n + 1)] for a in range(n + 1)], np.int64)


def unrank(rank: jax.Array, n: int, size: jax.Array, first_fixed: jax.Array, table: jax.Array) -> jax.Array:
    """bool (n,): the coalition of ``size`` players of lexicographic rank ``rank`` (the combinatorial number
    system: player p is in when rank < C(players after p, still to choose - 1), else rank -= that count);
    with ``first_fixed`` player 0 is in and the rank runs over the C(n - 1, size - 1) choices of the rest."""
    def step(carry, p):
        x, left = carry
        forced = first_fixed & (p == 0)
        count = jnp.where(left > 0, table[n - p - 1, jnp.maximum(left - 1, 0)], 0)
        take = forced | ((left > 0) & (x < count))
        x = jnp.where(forced | take, x, x - count)
        return (x, left - take.astype(left.dtype)), take

    _, members = jax.lax.scan(step, (rank.astype(jnp.int32), size.astype(jnp.int32)), jnp.arange(n))
    return members


@register("stratified_kernel")
@dataclasses.dataclass(frozen=True)
class StratifiedKernel(Estimator):
    """One unit = a coalition of its pair stratum, drawn without replacement, and its complement (2
    evaluations); anchors as ``kernel`` (v(empty), v(full), the border). ``strata_units`` (J,) are the units
    of each pair stratum, from the budget (:meth:`for_budget`)."""

    border: int = 1
    strata_units: tuple[int, ...] = ()

    @classmethod
    def for_budget(cls, n, budget):
        if n < 4 or n > MAX_PLAYERS:
            return cls(n)
        border = border_size(n, int(budget), np.ones(n + 1, np.int64))
        rest = int(budget) - 2 - len(border_rows(n, border)[0])
        _, mass, pairs = pair_strata(n, border)
        return cls(n, border, allocate(max(0, rest // 2), mass, pairs))

    def anchors(self):
        return np.concatenate([np.zeros((1, self.n), bool), np.ones((1, self.n), bool),
                               border_rows(self.n, self.border)[0]])

    def n_units(self, budget):
        if self.n < 4 or self.n > MAX_PLAYERS:
            raise FgvceError(f"stratified_kernel takes 4 to {MAX_PLAYERS} players (it ranks coalitions in int32), "
                             f"got {self.n}; use kernel or leverage")
        units = sum(self.strata_units)
        if units < 1:
            raise FgvceError(f"stratified_kernel needs a budget of at least {2 * self.n + 4} evaluations for "
                             f"{self.n} players, got {budget}")
        return units

    def evals_per_unit(self):
        return 2

    def draw_bytes(self):
        return 8 * self.n

    def draws(self, key, index):
        """(z (U, n) bool, stratum (U,) int32): unit i's stratum j (units are laid out stratum by stratum),
        its rank r within it and the coalition of rank pi_j(r); pi_j's round keys come from ``fold_in(key, j)``.
        Units past the last (padding) repeat the last stratum's rank range and are discarded by the engine."""
        sizes, _, pairs = pair_strata(self.n, self.border)
        counts = np.asarray(self.strata_units, np.int64)
        ends = np.cumsum(counts)
        half_bits = np.asarray([max(1, -(-int(p - 1).bit_length() // 2)) for p in pairs], np.uint32)
        round_keys = jax.vmap(lambda j: jax.random.bits(jax.random.fold_in(key, j), (ROUNDS,), jnp.uint32))(
            jnp.arange(len(sizes)))
        table = jnp.asarray(binomials(self.n), jnp.int32)

        def one(i):
            j = jnp.minimum(jnp.searchsorted(jnp.asarray(ends, jnp.int32), i, side="right"), len(sizes) - 1)
            r = (i - jnp.asarray(ends - counts, jnp.int32)[j]) % jnp.asarray(np.maximum(counts, 1), jnp.int32)[j]
            x = permute(r, jnp.asarray(pairs, jnp.int32)[j], jnp.asarray(half_bits)[j], round_keys[j])
            s = jnp.asarray(sizes, jnp.int32)[j]
            return unrank(x.astype(jnp.int32), self.n, s, 2 * s == self.n, table), j.astype(jnp.int32)

        return jax.vmap(one)(index)

    def masks(self, draw):
        z, _ = draw
        return jnp.stack([z, ~z])

    def unit_stats(self, draw, values):
        """(J, n): z v(z) + ~z v(~z) in the unit's stratum row, zeros elsewhere (one term is zero: exact)."""
        z, j = draw
        row = jnp.where(z, values[0], values[1])
        return jnp.zeros((len(self.strata_units), self.n), jnp.float32).at[j].set(row)

    def counts(self, draws, valid):
        """A (J, n, n) int32: per stratum, sum over the block's valid units of z z^T + ~z ~z^T (exact)."""
        z, j = draws
        onehot = (j[:, None] == jnp.arange(len(self.strata_units))[None]) & valid[:, None]
        zf, cf, w = z.astype(jnp.float32), (~z).astype(jnp.float32), onehot.astype(jnp.float32)
        a = (jnp.einsum("uj,ua,ub->jab", w, zf, zf, precision=jax.lax.Precision.HIGHEST)
             + jnp.einsum("uj,ua,ub->jab", w, cf, cf, precision=jax.lax.Precision.HIGHEST))
        return {"A": a.astype(jnp.int32)}

    def finalize(self, total, counts, n_units, anchor_values):
        n = self.n
        v0, v1 = anchor_values[0], anchor_values[1]
        rows, w = border_rows(n, self.border)
        sizes, _, _ = pair_strata(n, self.border)
        c = np.asarray(self.strata_units, np.float64)
        per_row = np.where(c > 0, kernel_mass(n)[sizes] / np.maximum(c, 1) / np.where(2 * sizes == n, 2, 1), 0.0)
        A_j = counts["A"].astype(jnp.float32)  # (J, n, n)
        b_j = total - v0 * jnp.diagonal(A_j, axis1=1, axis2=2)  # sum z (v - v0): z binary, sum z = diag
        weights = jnp.asarray(per_row, jnp.float32)
        A_b = jnp.asarray((rows.T * w) @ rows, jnp.float32)
        b_b = jnp.matmul(jnp.asarray(rows.T * w, jnp.float32), anchor_values[2:] - v0,
                         precision=jax.lax.Precision.HIGHEST)
        A = A_b + jnp.tensordot(weights, A_j, axes=1, precision=jax.lax.Precision.HIGHEST)
        b = b_b + jnp.tensordot(weights, b_j, axes=1, precision=jax.lax.Precision.HIGHEST)
        return constrained_wls(A, b, v1 - v0)
