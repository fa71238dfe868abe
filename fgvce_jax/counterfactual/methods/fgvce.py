"""``fgvce``: FG-VCE (SPEC 5). Local Shapley Phi (SPEC 3) of the query on its prediction and of each reference on
its class, NMS regions (SPEC 4), and the loop that replaces the query's top region with its best-scoring candidate
(``selection="joint"``, the default: log p_y + lam x similarity) or its most similar (``"similarity"``) until
the stop rule holds. Every hook is the registry's default."""
from __future__ import annotations

from fgvce_jax.counterfactual.methods.registry import Method, register


@register("fgvce")
class FgVce(Method):
    """FG-VCE with the shared config's settings."""
