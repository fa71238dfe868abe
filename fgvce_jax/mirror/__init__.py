"""Mirror-CFE (SPEC 8, issue 12): counterfactuals by reflecting a feature map across the s/t decision boundary.

- :mod:`~fgvce_jax.mirror.geometry`: the mirror, reflection, refinement (L-BFGS and closed form) and the path.
- :mod:`~fgvce_jax.mirror.decoder`: the decoder G and its class-activation-map spatial prior (CSP).
- :mod:`~fgvce_jax.mirror.train`: training G with the classifier frozen (resumable; ``fgvce train-decoder``).
- :mod:`~fgvce_jax.mirror.explain`: the per-query decode of the path, p_t(k) and k_first.
- :mod:`~fgvce_jax.mirror.metrics`: validity, D.Val, L1, LPIPS and FD-classifier.
"""
from fgvce_jax.mirror.geometry import (DEFAULT_KS, MirrorPath, check_classes, head_logits, least_norm, linear_head,
                                       mirror, mirror_path, path, path_batch, project, reflect, refine, swapped)

__all__ = [
    "DEFAULT_KS", "MirrorPath", "check_classes", "head_logits", "least_norm", "linear_head", "mirror",
    "mirror_path", "path", "path_batch", "project", "reflect", "refine", "swapped",
]
