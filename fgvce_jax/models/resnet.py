"""ResNet-18/34/50/101/152 (torchvision structure, v1.5 strides) and ``resnet_tiny``, as Flax NNX modules.

The network is a flat sequence of units: the stem, then every block of
layer1..layer4, then global-average-pool + fc. A split point names the unit
after which the feature map Z is taken (SPEC 1):

- ``layer4.0``: Z is the output of the first layer4 block; g = the remaining
  layer4 blocks + GAP + fc (Vandenhende et al.). The default.
- ``layer4``: Z is the output of layer4; g = GAP + fc, so logits are affine in Z:
  ``g(Z) = mean_hw(Z) @ W + b`` (see :meth:`ResNet.linear_head`).
- ``layer3``: Z is the output of layer3; g = all of layer4 + GAP + fc.

Attribute names follow torchvision's state_dict keys (``layer2[0].downsample[1]``
is ``layer2.0.downsample.1``), which keeps the converter a renaming.
"""
from __future__ import annotations

import functools

import jax
from flax import nnx

from fgvce_jax.errors import FgvceError
from fgvce_jax.models.base import Classifier
from fgvce_jax.models.layers import batch_norm, conv, global_avg_pool, max_pool


def _downsample(cin: int, cout: int, stride: int, rngs: nnx.Rngs) -> nnx.List | None:
    """The 1x1 conv + BN projection shortcut, or None when the identity fits."""
    if stride == 1 and cin == cout:
        return None
    return nnx.List([conv(cin, cout, 1, stride, rngs=rngs), batch_norm(cout, rngs=rngs)])


class _Block(nnx.Module):
    """A residual block split at its first spatial mixing: ``block(x) = body(prefix(x), shortcut(x))``.

    ``prefix`` and ``shortcut`` are point-wise (1x1 convs, BatchNorm, ReLU; the shortcut strided), so
    they commute with a position mask: ``prefix(where(m, Z, B)) = where(m, prefix(Z), prefix(B))`` and
    ``shortcut(where(m, Z, B)) = where(m[::s, ::s], shortcut(Z), shortcut(B))``. ``convs`` lists the
    body's spatial convs as (radius, stride), in order, for receptive-field arithmetic.
    """

    def shortcut(self, x: jax.Array) -> jax.Array:
        """(N,H,W,cin) -> (N,H/s,W/s,cout): the identity or the strided 1x1 conv + BN projection."""
        if self.downsample is None:
            return x
        return self.downsample[1](self.downsample[0](x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.body(self.prefix(x), self.shortcut(x))


class BasicBlock(_Block):
    """Two 3x3 convs with a residual: (N,H,W,cin) -> (N,H/s,W/s,planes)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = conv(cin, planes, 3, stride, rngs=rngs)
        self.bn1 = batch_norm(planes, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, rngs=rngs)
        self.bn2 = batch_norm(planes, rngs=rngs)
        self.downsample = _downsample(cin, planes, stride, rngs)
        self.convs = ((1, stride), (1, 1))

    def prefix(self, x: jax.Array) -> jax.Array:
        """The identity: the first layer is already a 3x3 conv."""
        return x

    def body(self, y: jax.Array, skip: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(y)))
        return nnx.relu(self.bn2(self.conv2(y)) + skip)


class Bottleneck(_Block):
    """1x1 -> 3x3 (stride here, v1.5) -> 1x1 x4 with a residual: (N,H,W,cin) -> (N,H/s,W/s,4*planes)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = conv(cin, planes, 1, rngs=rngs)
        self.bn1 = batch_norm(planes, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, stride, rngs=rngs)
        self.bn2 = batch_norm(planes, rngs=rngs)
        self.conv3 = conv(planes, planes * 4, 1, rngs=rngs)
        self.bn3 = batch_norm(planes * 4, rngs=rngs)
        self.downsample = _downsample(cin, planes * 4, stride, rngs)
        self.convs = ((1, stride),)

    def prefix(self, x: jax.Array) -> jax.Array:
        """The point-wise 1x1 conv, BN and ReLU: (N,H,W,cin) -> (N,H,W,planes)."""
        return nnx.relu(self.bn1(self.conv1(x)))

    def body(self, y: jax.Array, skip: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn2(self.conv2(y)))
        return nnx.relu(self.bn3(self.conv3(y)) + skip)


class ResNet(Classifier):
    """A torchvision ResNet.

    Args:
      block: ``BasicBlock`` or ``Bottleneck``.
      stage_sizes: blocks in layer1..layer4.
      num_classes: C.
      arch: the name recorded in checkpoints.
      widths: ``planes`` of layer1..layer4 (output width is ``planes * block.expansion``).
      strides: stride of the first block of layer1..layer4.
      cifar_stem: a 3x3 stride-1 conv and no max-pool, instead of the 7x7 stride-2 conv + max-pool.
      rngs: initialisation keys.
    """

    family = "resnet"
    split_points = ("layer4.0", "layer4", "layer3")

    def __init__(self, block, stage_sizes, num_classes: int, *, arch: str, widths=(64, 128, 256, 512),
                 strides=(1, 2, 2, 2), cifar_stem: bool = False, rngs: nnx.Rngs):
        self.arch = arch
        self.num_classes = num_classes
        self.cifar_stem = cifar_stem
        stem_width = widths[0]
        self.conv1 = conv(3, stem_width, 3 if cifar_stem else 7, 1 if cifar_stem else 2, rngs=rngs)
        self.bn1 = batch_norm(stem_width, rngs=rngs)
        cin = stem_width
        for i, (n, planes, stride) in enumerate(zip(stage_sizes, widths, strides)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, stride if j == 0 else 1, rngs=rngs))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

    def _stem(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        return x if self.cifar_stem else max_pool(x, 3, 2, 1)

    def _blocks(self) -> list:
        return [*self.layer1, *self.layer2, *self.layer3, *self.layer4]

    def _split_index(self, at: str) -> int:
        """How many blocks (of ``_blocks()``) f runs for split ``at``."""
        before4 = len(self.layer1) + len(self.layer2) + len(self.layer3)
        return {"layer3": before4, "layer4.0": before4 + 1, "layer4": before4 + len(self.layer4)}[at]

    def encode(self, x: jax.Array, at: str | None = None) -> tuple[jax.Array, dict]:
        """Images (N,H,W,3) -> (Z (N,H',W',D) at split ``at``, {})."""
        k = self._split_index(self.resolve_split(at))
        z = self._stem(x)
        for b in self._blocks()[:k]:
            z = b(z)
        return z, {}

    def head(self, z: jax.Array, ctx: dict | None = None, at: str | None = None, token_mask=None) -> jax.Array:
        """Z (N,H',W',D) at split ``at`` -> logits (N,C): remaining blocks, GAP, fc."""
        if token_mask is not None:
            raise FgvceError("token_mask (attention masking) is only defined for ViT models")
        k = self._split_index(self.resolve_split(at))
        for b in self._blocks()[k:]:
            z = b(z)
        return self.fc(global_avg_pool(z))

    def conv_head(self, at: str | None = None):
        """(blocks, fc) with ``head(z) == fc(mean_hw(blocks(z)))`` when the head at ``at`` has residual
        blocks (``layer4.0``, ``layer3``); None at ``layer4`` (GAP + fc only)."""
        blocks = self._blocks()[self._split_index(self.resolve_split(at)):]
        return (blocks, self.fc) if blocks else None

    def linear_head(self, at: str | None = None):
        """At split ``layer4``: (W (D,C), b (C,)) with ``head(z) == mean_hw(z) @ W + b``; else None."""
        if self.resolve_split(at) != "layer4":
            return None
        return self.fc.kernel[...], self.fc.bias[...]


ResNet18 = functools.partial(ResNet, BasicBlock, (2, 2, 2, 2), arch="resnet18")
ResNet34 = functools.partial(ResNet, BasicBlock, (3, 4, 6, 3), arch="resnet34")
ResNet50 = functools.partial(ResNet, Bottleneck, (3, 4, 6, 3), arch="resnet50")
ResNet101 = functools.partial(ResNet, Bottleneck, (3, 4, 23, 3), arch="resnet101")
ResNet152 = functools.partial(ResNet, Bottleneck, (3, 8, 36, 3), arch="resnet152")
# 32x32 -> 8x8 at layer4.0 and layer4; for tests and the digits demo.
ResNetTiny = functools.partial(ResNet, BasicBlock, (1, 1, 1, 2), arch="resnet_tiny", widths=(16, 32, 64, 128),
                               strides=(1, 2, 2, 1), cifar_stem=True)
