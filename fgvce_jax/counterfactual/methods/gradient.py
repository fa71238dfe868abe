"""``gradient``: FG-VCE with Phi = gradient x activation summed over channels (SPEC 5),
``sum_d z_hwd * d out_c / d z_hwd``."""
from __future__ import annotations

from fgvce_jax.counterfactual.methods.registry import COMMON_USES, REGION_USES, SALIENCY_USES, Method, register


@register("gradient")
class Gradient(Method):
    """FG-VCE on gradient x activation Phi."""

    saliency = "gradient"
    uses = COMMON_USES + REGION_USES + SALIENCY_USES
