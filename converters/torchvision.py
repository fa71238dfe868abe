"""Map torchvision ``state_dict`` tensors onto the Flax NNX ports in ``fgvce_jax.models``."""
from __future__ import annotations

import os
import re
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fgvce_jax import models
from fgvce_jax.errors import FgvceError

# Where the number of classes (and for ViT the patch size) can be read in a state_dict.
_HEAD_KEY = {"resnet": "fc.weight", "vgg": "classifier.6.weight", "vit": "heads.head.weight"}
_LEAF = {"scale": "weight", "mean": "running_mean", "var": "running_var"}
_SHOWN = 8  # keys listed per kind of mismatch before "... and N more"


def _family(arch: str) -> str:
    if arch not in models.ARCHS:
        raise FgvceError(f"unknown arch {arch!r}; choose one of {', '.join(models.ARCHS)}")
    return "vit" if arch.startswith("vit") else "vgg" if arch.startswith("vgg") else "resnet"


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _kernel(a: np.ndarray) -> np.ndarray:
    """Conv OIHW -> HWIO, Linear (out, in) -> (in, out)."""
    return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T


def _rows(j: int, fn: Callable) -> Callable:
    """Take the j-th third of in_proj along axis 0 (q, k, v), then apply ``fn``."""
    return lambda a: fn(np.split(a, 3, axis=0)[j])


def torch_source(family: str, path: tuple) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """The torchvision key a Flax variable at ``path`` comes from, and the tensor transform.

    Flax attribute paths mirror torchvision module names (``layer1.0.downsample.1.scale``
    is ``layer1.0.downsample.1.weight``); ViT adds two renames: ``encoder.layers.<i>`` is
    ``encoder.layers.encoder_layer_<i>``, and ``query/key/value`` are thirds of ``in_proj``.
    """
    *prefix, leaf = (str(p) for p in path)
    fn = _kernel if leaf == "kernel" else _identity
    name = "weight" if leaf == "kernel" else _LEAF.get(leaf, leaf)
    if family == "vit":
        if prefix[:2] == ["encoder", "layers"]:
            prefix[2] = f"encoder_layer_{prefix[2]}"
        if prefix and prefix[-1] in ("query", "key", "value"):
            j = ("query", "key", "value").index(prefix.pop())
            fn, name = _rows(j, fn), f"in_proj_{name}"
    return ".".join([*prefix, name]), fn


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``.pth`` file (a state_dict, or a dict holding one under ``state_dict``/``model``) as numpy arrays."""
    try:
        import torch
    except ImportError:
        raise FgvceError("reading .pth weights needs torch, which the default install leaves out: "
                         "pip install 'fgvce-jax[convert]' (or pip install -e '.[convert]' in a checkout)") from None

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FgvceError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, zipfile errors...
        first = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else type(e).__name__
        raise FgvceError(f"cannot read {path} as a PyTorch state_dict (truncated or not a .pth file?): {first}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FgvceError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return _as_numpy(obj)


def _as_numpy(state_dict: Mapping) -> dict[str, np.ndarray]:
    """Tensors or arrays -> numpy, without DataParallel's ``module.`` prefix."""
    return {k.removeprefix("module."): np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
            for k, v in state_dict.items()}


def guess_arch(state_dict: Mapping[str, np.ndarray]) -> str | None:
    """The torchvision arch whose key layout ``state_dict`` has, or None."""
    keys = set(state_dict)
    if "conv_proj.weight" in keys:
        n = len({m.group(1) for k in keys if (m := re.match(r"encoder\.layers\.encoder_layer_(\d+)\.", k))})
        patch = state_dict["conv_proj.weight"].shape[-1]
        return {(12, 16): "vit_b_16", (12, 32): "vit_b_32", (24, 16): "vit_l_16"}.get((n, patch))
    if "features.0.weight" in keys:
        return "vgg16_bn" if "features.1.running_mean" in keys and "classifier.6.weight" in keys else None
    if "fc.weight" in keys:
        blocks = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in keys
        return {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
                ((3, 8, 36, 3), True): "resnet152", ((1, 1, 1, 2), False): "resnet_tiny"}.get((blocks, bottleneck))
    return None


def _listed(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN]) + (f", ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")
    return f"{len(keys)} {kind} ({shown})"


def convert(arch: str, weights, *, num_classes: int | None = None) -> nnx.Module:
    """A model of ``arch`` holding the torchvision weights, in eval mode.

    Args:
      arch: one of ``fgvce_jax.models.ARCHS``.
      weights: a state_dict (name -> torch tensor or numpy array) or a ``.pth`` path.
      num_classes: C; default: read from the classifier's weight. A different C
        in the file is a mis-shaped key.

    Returns:
      The NNX model. ViT's image size is read from ``encoder.pos_embedding``.

    Raises:
      FgvceError: unreadable file, or missing / unexpected / mis-shaped keys (listed).
    """
    family = _family(arch)
    sd = load_state_dict(weights) if isinstance(weights, (str, os.PathLike)) else _as_numpy(weights)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    guess = guess_arch(sd)
    if guess is not None and guess != arch:
        raise FgvceError(f"the weights are {guess}, not {arch}: convert them as {guess}")
    head_key = _HEAD_KEY[family]
    if num_classes is None:
        if head_key not in sd:
            raise FgvceError(f"cannot infer the number of classes: {head_key!r} is not in the weights; pass num_classes")
        num_classes = int(sd[head_key].shape[0])
    image_size = None
    if family == "vit" and "encoder.pos_embedding" in sd and "conv_proj.weight" in sd:
        grid = int(round((sd["encoder.pos_embedding"].shape[1] - 1) ** 0.5))
        image_size = grid * int(sd["conv_proj.weight"].shape[-1])
    abstract = nnx.eval_shape(lambda: models.create(arch, num_classes, image_size=image_size))
    graphdef, state = nnx.split(abstract)

    values, missing, misshaped, used = [], [], [], set()
    for path, var in nnx.to_flat_state(state):
        key, fn = torch_source(family, path)
        if key not in sd:
            missing.append(key)
            continue
        used.add(key)
        value = fn(sd[key])
        if value.shape != var.shape:
            misshaped.append(f"{key} {tuple(value.shape)} != {tuple(var.shape)}")
            continue
        values.append((path, var.replace(jnp.asarray(value, dtype=jnp.float32))))
    unexpected = sorted(set(sd) - used)
    if missing or unexpected or misshaped:
        parts = [_listed(k, v) for k, v in (("missing", missing), ("unexpected", unexpected),
                                            ("mis-shaped (Flax layout, file != model)", misshaped)) if v]
        raise FgvceError(f"weights do not match {arch} with {num_classes} classes: " + "; ".join(parts))
    model = nnx.merge(graphdef, nnx.from_flat_state(values))
    model.eval()
    return model
