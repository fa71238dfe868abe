"""``global``: FG-VCE with Phi from permutation Shapley values over all H W positions at once (SPEC 5), at the
budget of the local estimate (2 H W ``samples`` evaluations per image)."""
from __future__ import annotations

from fgvce_jax.counterfactual.methods.registry import COMMON_USES, REGION_USES, SALIENCY_USES, Method, register


@register("global")
class GlobalShapley(Method):
    """FG-VCE on global Shapley Phi."""

    saliency = "global"
    uses = COMMON_USES + REGION_USES + SALIENCY_USES + ("samples",)
