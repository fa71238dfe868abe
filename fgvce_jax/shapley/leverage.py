"""Leverage SHAP (Musco and Witter, "Provably Accurate Shapley Value Estimation via Leverage Score
Sampling", ICLR 2025).

KernelSHAP's regression (see :mod:`fgvce_jax.shapley.kernel`, whose sampler, border, pairing and
projected solve this reuses) has rows of very unequal importance: once efficiency is projected
out, the leverage score of every coalition of size s is the same, and summed over a size it is
the same for every size. Sampling sizes *uniformly* -- by leverage, not by the kernel K(s) --
and reweighting each row by K(s) / q(s) gives a least-squares sketch with a provable
(1 + eps) error bound from O(n log n + n / eps) rows, where kernel-proportional sizes put most
rows on sizes near 1 and n - 1 and few on the middle.

Here q(s) ∝ K(s) / k_s with integer size weights k_s = max(1, round(c K(s) / K(n // 2))),
c = min(4, MAX_SIZE_WEIGHT / max K / K(n // 2)): the weights are exact integers (so the
regression's A stays exact int32 counts, k_s (z z^T + ~z ~z^T) per pair), and q is uniform over
the sizes 2..n-2 to within a factor 1 +- 1 / (2 c) (leverage sampling tolerates any constant
factor). The importance weight K(s) / q(s) is then exactly Z k_s, Z a constant, so the weighted
regression is the kernel's, not an approximation of it.

As in the reference implementation, the sizes 1 and n - 1 are enumerated exactly (the 2n border
coalitions, anchors here), each sampled coalition is paired with its complement, and phi is the
efficiency-constrained least-squares solution. Deviation: the reference samples coalitions
without replacement (Bernoulli inclusion per (size, subset) with a budget-fitted rate). That
couples units, which would break the engine's contract (unit i depends on (key, i) alone, for
bit-identity on any device count and chunking), so here sizes are stratified instead: unit i gets
the size at the golden-ratio point of a fixed low-discrepancy sequence (no size-count noise), and
the subset given its size is uniform, drawn with replacement.
"""
from __future__ import annotations

import numpy as np

from fgvce_jax.shapley.kernel import MAX_SIZE_WEIGHT, Kernel, kernel_mass
from fgvce_jax.shapley.registry import register


def leverage_size_weights(n: int) -> np.ndarray:
    """k (n + 1,) int64: integer weights k_s ∝ K(s) / K(n // 2) (at most MAX_SIZE_WEIGHT), so that
    sizes drawn with q(s) ∝ K(s) / k_s are nearly uniform over 2..n-2; 1 outside (unused)."""
    ratio = kernel_mass(n) / kernel_mass(n)[n // 2]
    c = min(4.0, MAX_SIZE_WEIGHT / ratio.max())
    return np.maximum(1, np.rint(c * ratio)).astype(np.int64)


@register("leverage")
class Leverage(Kernel):
    """KernelSHAP's units, anchors and solve with nearly uniform (leverage-score) sizes."""

    def size_weights(self):
        return leverage_size_weights(self.n)
