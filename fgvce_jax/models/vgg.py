"""VGG-16 with BatchNorm (torchvision ``vgg16_bn``) as a Flax NNX module.

One split point, ``features`` (SPEC 1): Z is the output of the convolutional
trunk (after the last max-pool), (N, H/32, W/32, 512); g = adaptive average
pool to 7x7 + flatten (in torchvision's C, H, W order) + the classifier MLP.

``features`` and ``classifier`` are ``nnx.List``s indexed exactly like
torchvision's ``nn.Sequential``s; the slots of parameter-free layers (ReLU,
max-pool, dropout) hold None, so ``features.4.var`` is ``features.4.running_var``.
Dropout is omitted: the ports are for inference and fine-tuning of the head.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fgvce_jax.errors import FgvceError
from fgvce_jax.models.base import Classifier
from fgvce_jax.models.layers import batch_norm, conv, max_pool

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging matrix of torch's AdaptiveAvgPool1d.

    Output bin i averages inputs floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1.
    """
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(z: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """torchvision's AdaptiveAvgPool2d: (N,H,W,C) -> (N,out_h,out_w,C), for any H, W."""
    ph = adaptive_pool_matrix(z.shape[1], out_hw[0])
    pw = adaptive_pool_matrix(z.shape[2], out_hw[1])
    return jnp.einsum("ih,jw,nhwc->nijc", ph, pw, z)


class VGG(Classifier):
    """A torchvision VGG with BatchNorm.

    Args:
      cfg: channel widths, "M" for a 2x2 max-pool.
      num_classes: C.
      arch: the name recorded in checkpoints.
      hidden: width of the two hidden classifier layers.
      pool_hw: output of the adaptive average pool.
    """

    family = "vgg"
    split_points = ("features",)

    def __init__(self, cfg, num_classes: int, *, arch: str, hidden: int = 4096, pool_hw=(7, 7), rngs: nnx.Rngs):
        self.arch = arch
        self.num_classes = num_classes
        self.cfg = tuple(cfg)
        self.pool_hw = tuple(pool_hw)
        layers, cin = [], 3
        for v in self.cfg:
            if v == "M":
                layers.append(None)
            else:
                layers += [conv(cin, v, 3, bias=True, rngs=rngs), batch_norm(v, rngs=rngs), None]
                cin = v
        self.features = nnx.List(layers)
        d = cin * pool_hw[0] * pool_hw[1]
        self.classifier = nnx.List([nnx.Linear(d, hidden, rngs=rngs), None, None,
                                    nnx.Linear(hidden, hidden, rngs=rngs), None, None,
                                    nnx.Linear(hidden, num_classes, rngs=rngs)])

    def encode(self, x: jax.Array, at: str | None = None) -> tuple[jax.Array, dict]:
        """Images (N,H,W,3) -> (Z (N,H/32,W/32,512), {})."""
        self.resolve_split(at)
        i = 0
        for v in self.cfg:
            if v == "M":
                x, i = max_pool(x, 2, 2, 0), i + 1
            else:
                x, i = nnx.relu(self.features[i + 1](self.features[i](x))), i + 3
        return x, {}

    def head(self, z: jax.Array, ctx: dict | None = None, at: str | None = None, token_mask=None) -> jax.Array:
        """Z (N,h,w,512) -> logits (N,C): adaptive pool to 7x7, flatten as (C,H,W), MLP."""
        if token_mask is not None:
            raise FgvceError("token_mask (attention masking) is only defined for ViT models")
        self.resolve_split(at)
        p = adaptive_avg_pool(z, self.pool_hw)
        h = p.transpose(0, 3, 1, 2).reshape(p.shape[0], -1)
        h = nnx.relu(self.classifier[0](h))
        h = nnx.relu(self.classifier[3](h))
        return self.classifier[6](h)


VGG16BN = functools.partial(VGG, VGG16_CFG, arch="vgg16_bn")
