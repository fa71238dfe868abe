"""Flax NNX ports of torchvision classifiers, their split views and checkpoints.

``create(arch, num_classes)`` builds a model; ``split(model, at)`` gives the
functional (hashable) view used downstream; ``load(path)`` restores a
checkpoint written by ``fgvce convert`` or by training.
"""
from __future__ import annotations

import importlib

from flax import nnx

from fgvce_jax.errors import FgvceError
from fgvce_jax.models.split import SplitModel, split

# arch -> (module, constructor); modules are imported on first use.
_REGISTRY = {
    "resnet18": ("resnet", "ResNet18"),
    "resnet34": ("resnet", "ResNet34"),
    "resnet50": ("resnet", "ResNet50"),
    "resnet101": ("resnet", "ResNet101"),
    "resnet152": ("resnet", "ResNet152"),
    "vgg16_bn": ("vgg", "VGG16BN"),
    "vit_b_16": ("vit", "ViT_B_16"),
    "vit_b_32": ("vit", "ViT_B_32"),
    "vit_l_16": ("vit", "ViT_L_16"),
    "resnet_tiny": ("resnet", "ResNetTiny"),
}
ARCHS = tuple(_REGISTRY)


def create(arch: str, num_classes: int, *, seed: int = 0, image_size: int | None = None) -> nnx.Module:
    """A freshly initialised model in eval mode.

    Args:
      arch: one of ``ARCHS``.
      num_classes: C, the width of the logits.
      seed: initialisation seed.
      image_size: ViT only, the input side the position embedding is built for (default 224).
    """
    if arch not in _REGISTRY:
        raise FgvceError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if int(num_classes) < 1:
        raise FgvceError(f"num_classes must be >= 1, got {num_classes}")
    module, name = _REGISTRY[arch]
    ctor = getattr(importlib.import_module(f"fgvce_jax.models.{module}"), name)
    kwargs = {} if image_size is None or module != "vit" else {"image_size": int(image_size)}
    return ctor(num_classes=int(num_classes), rngs=nnx.Rngs(seed), **kwargs)


def load(path):
    """Restore ``(model, info)`` from a checkpoint directory written by ``save`` (see ``checkpoint.load``)."""
    from fgvce_jax.models import checkpoint

    return checkpoint.load(path)


def __getattr__(name):
    # save / ModelInfo live in checkpoint.py, imported on first use (orbax is slow to import).
    if name in ("save", "ModelInfo"):
        from fgvce_jax.models import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ARCHS", "ModelInfo", "SplitModel", "create", "load", "save", "split"]
