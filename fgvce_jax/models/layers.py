"""Small building blocks shared by the CNN ports: torchvision-exact conv, BatchNorm and pooling.

Padding is always explicit: ``SAME`` pads (0, 1) on even inputs with stride 2,
torchvision pads (k // 2, k // 2), and only the latter matches.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Kaiming-normal (fan_out), torchvision's conv initialisation. Module-level so
# that two models of the same arch have equal (hashable) graph definitions.
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(cin: int, cout: int, k: int, stride: int = 1, *, bias: bool = False, rngs: nnx.Rngs) -> nnx.Conv:
    """A k x k conv with torchvision's symmetric padding k // 2; (N,H,W,cin) -> (N,H',W',cout)."""
    p = k // 2
    return nnx.Conv(cin, cout, (k, k), (stride, stride), padding=((p, p), (p, p)),
                    use_bias=bias, kernel_init=CONV_INIT, rngs=rngs)


def batch_norm(n: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm as torchvision's (eps 1e-5, momentum 0.1 == flax 0.9), in eval mode until ``.train()``."""
    return nnx.BatchNorm(n, use_running_average=True, momentum=0.9, epsilon=1e-5, rngs=rngs)


def max_pool(x: jax.Array, k: int, stride: int, pad: int) -> jax.Array:
    """Max-pool (N,H,W,C) with padding ``pad`` on each side filled with -inf (torchvision's MaxPool2d)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, stride, stride, 1),
                                 ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def global_avg_pool(z: jax.Array) -> jax.Array:
    """Mean over the spatial axes: (N,H,W,D) -> (N,D)."""
    return jnp.mean(z, axis=(1, 2))
