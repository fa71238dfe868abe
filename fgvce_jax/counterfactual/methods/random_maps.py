"""``random``: FG-VCE's loop on random Phi (SPEC 5): i.i.d. uniform on (0, 1] per cell, so NMS yields random
regions in random order. Each image's map comes from its own key (``fgvce_jax.keys``), so a query's map does
not depend on its shard, the run's ``--limit`` or the other queries."""
from __future__ import annotations

import jax

from fgvce_jax.counterfactual.methods.registry import COMMON_USES, REGION_USES, Method, register


def random_phi(key: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """One image's Phi (H, W): i.i.d. uniform on (0, 1] from ``key``."""
    return 1.0 - jax.random.uniform(key, grid)


@register("random")
class RandomMaps(Method):
    """FG-VCE on random Phi."""

    saliency = None
    uses = COMMON_USES + REGION_USES

    def own_phi(self, keys: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """(N, H, W): :func:`random_phi` of each image's key."""
        return jax.vmap(lambda k: random_phi(k, grid))(keys)
