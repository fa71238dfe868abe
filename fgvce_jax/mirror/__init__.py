"""Mirror-CFE (SPEC 8, issue 12): counterfactuals by reflecting a feature map across the s/t decision boundary.

- :mod:`~fgvce_jax.mirror.geometry`: the mirror, reflection, refinement (L-BFGS and closed form) and the path.
"""
from fgvce_jax.mirror.geometry import (DEFAULT_KS, MirrorPath, check_classes, head_logits, least_norm, linear_head,
                                       mirror, mirror_path, path, path_batch, project, reflect, refine, swapped)

__all__ = [
    "DEFAULT_KS", "MirrorPath", "check_classes", "head_logits", "least_norm", "linear_head", "mirror",
    "mirror_path", "path", "path_batch", "project", "reflect", "refine", "swapped",
]
