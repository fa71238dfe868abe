"""``single-step``: FG-VCE's ablation without early stopping (SPEC 5): every query region is replaced (up to
``t_max``), and only the final map is judged."""
from __future__ import annotations

from fgvce_jax.counterfactual.methods.registry import Method, register


@register("single-step")
class SingleStep(Method):
    """FG-VCE that never stops early."""

    early_stop = False
