"""Metrics of counterfactual explanations and saliency maps (SPEC section 6).

- :mod:`~fgvce_jax.metrics.counterfactual`: validity, edits in regions and cells.
- :mod:`~fgvce_jax.metrics.rise`: RISE deletion / insertion curves, AUC, Del-Ins.
- :mod:`~fgvce_jax.metrics.parts`: Near-KP, Same-KP, Part IoU, coverage, misleading regions.
- :mod:`~fgvce_jax.metrics.causes`: cause precision and recall (SPEC section 10).
"""
from fgvce_jax.metrics.causes import cause_metrics
from fgvce_jax.metrics.counterfactual import (edited_cells, edits_in_cells, edits_in_regions,
                                              region_offsets, summary, validity)
from fgvce_jax.metrics.parts import part_metrics
from fgvce_jax.metrics.rise import RiseCurves, auc, blur, curve, deletion_insertion, pixel_ranks

__all__ = [
    "RiseCurves", "auc", "blur", "cause_metrics", "curve", "deletion_insertion", "edited_cells", "edits_in_cells",
    "edits_in_regions", "part_metrics", "pixel_ranks", "region_offsets", "summary", "validity",
]
