"""torchvision ``state_dict`` -> Flax NNX model, for every arch in ``fgvce_jax.models.ARCHS``.

torch is imported only in this package (and only to read ``.pth`` files).

Each Flax variable of the freshly created model names the torchvision key it
comes from and how the tensor is transformed (``torch_source``). Every key is
then checked: a torch key that nothing reads (unexpected), a Flax variable
whose key is absent (missing), or a shape that differs after the transform
(mis-shaped) is an :class:`~fgvce_jax.errors.FgvceError` that lists the keys.

Rules (transformers' PyTorch -> Flax conventions):
  BatchNorm / LayerNorm ``weight`` -> ``scale``; ``running_mean`` -> ``mean``,
  ``running_var`` -> ``var``; ``num_batches_tracked`` is dropped.
  Conv OIHW -> HWIO with ``transpose(2, 3, 1, 0)``; Linear ``.T``.
  ViT ``in_proj_weight`` (3D, D) / ``in_proj_bias`` (3D,) split into q, k, v.

Example::

    model = converters.convert("resnet50", "resnet50.pth")     # num_classes from the fc shape
    logits = model(images)                                     # images (N, 224, 224, 3)
"""
from converters.torchvision import convert, load_state_dict, torch_source

__all__ = ["convert", "load_state_dict", "torch_source"]
