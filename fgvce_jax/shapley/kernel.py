"""KernelSHAP (Lundberg and Lee 2017) with paired sampling and exact efficiency.

Coalition sizes s = 1..n-1 are drawn with probability proportional to the
Shapley kernel summed over a size, ``(n - 1) / (s (n - s))``; the coalition is
a uniform subset of that size, and each is paired with its complement
(Covert and Lee 2021). Sampling by the kernel makes every row's regression
weight 1, so phi solves

    min_phi  sum_i (z_i . phi - (v(z_i) - v(0)))^2   s.t.   1 . phi = v(1) - v(0)

in closed form from the sufficient statistics A = sum z z^T, b = sum z (v - v(0)):

    phi = A^-1 (b - lam 1),   lam = (1^T A^-1 b - (v(1) - v(0))) / (1^T A^-1 1).

A holds integer counts (int32 ``counts``, exact in any order); ``sum z v`` is a per-unit
statistic that the engine sums in its fixed order.

A gets a ridge of 1e-6 mean(diag A) so that few samples still give a solution; the
constraint holds exactly whatever A is.

v(empty) and v(full) are evaluated exactly (the two anchors); one unit is a
pair (2 evaluations).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fgvce_jax.errors import FgvceError
from fgvce_jax.shapley.permutation import uniform_ranks
from fgvce_jax.shapley.registry import Estimator, register


def size_distribution(n: int) -> np.ndarray:
    """p (n - 1,): probability of coalition size s = 1..n-1, proportional to (n - 1) / (s (n - s))."""
    s = np.arange(1, n)
    p = (n - 1) / (s * (n - s))
    return p / p.sum()


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
class Kernel(Estimator):
    """One unit = a coalition and its complement (2 evaluations), plus the empty and full anchors."""

    def anchors(self):
        return np.stack([np.zeros(self.n, bool), np.ones(self.n, bool)])

    def n_units(self, budget):
        if self.n < 2:
            raise FgvceError("kernel needs at least 2 players")
        return super().n_units(budget)

    def evals_per_unit(self):
        return 2

    def draw(self, key, index):
        k_size, k_sub = jax.random.split(key)
        p = jnp.asarray(size_distribution(self.n), jnp.float32)
        s = jax.random.choice(k_size, jnp.arange(1, self.n), p=p)
        return uniform_ranks(jax.random.uniform(k_sub, (self.n,))) < s  # z (n,): a uniform subset of size s

    def masks(self, z):
        return jnp.stack([z, ~z])

    def unit_stats(self, z, values):
        return jnp.where(z, values[0], values[1])  # z v(z) + (1 - z) v(~z): one term is zero, so exact

    def counts(self, z, valid):
        """A = sum over the block's masks of z z^T, as int32 (a float product of 0/1 is exact below 2^24)."""
        zz = jnp.concatenate([z, ~z]) & jnp.concatenate([valid, valid])[:, None]
        zz = zz.astype(jnp.float32)
        return {"A": jnp.matmul(zz.T, zz, precision=jax.lax.Precision.HIGHEST).astype(jnp.int32)}

    def finalize(self, total, counts, n_units, anchor_values):
        v0, v1 = anchor_values[0], anchor_values[1]
        A = counts["A"].astype(jnp.float32)
        b = total - v0 * jnp.diagonal(A)  # sum_i z_i (v_i - v0); z binary so sum_i z_i = diag(A)
        return constrained_wls(A, b, v1 - v0)
