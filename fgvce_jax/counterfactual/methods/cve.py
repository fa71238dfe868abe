"""``cve``: the greedy pair search of Vandenhende et al. (ECCV 2022) in FG-VCE's engine (SPEC 5).

No saliency: every cell of the query is a region, and every cell of each reference a candidate. Each step
scores every open (query cell, candidate cell) pair by log p_y after the swap (``selection="joint"`` with
``lam = 0``; the loop then runs only the open pairs through the head) and makes the best swap, until the
stop rule holds. Those three shared settings are fixed, and stored with its results as they ran.
"""
from __future__ import annotations

import jax

from fgvce_jax.counterfactual.methods.registry import COMMON_USES, Method, cell_regions, register
from fgvce_jax.counterfactual.partition import Regions


@register("cve")
class Cve(Method):
    """Greedy (cell, cell) pair search."""

    saliency = None
    uses = COMMON_USES
    fixed = {"region_size": 1, "selection": "joint", "lam": 0.0}
    pairs = True

    def query_regions(self, config, phi: jax.Array) -> Regions:
        """Every cell of each query, in raster order (``phi`` is only read for its shape)."""
        return cell_regions(phi.shape[0], phi.shape[1:])

    def reference_candidates(self, config, phi: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every cell of each reference."""
        cells = cell_regions(phi.shape[0], phi.shape[1:])
        return cells.center, cells.valid
