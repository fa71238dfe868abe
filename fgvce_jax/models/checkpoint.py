"""Model checkpoints: an orbax tree of every variable plus ``info.json`` (a :class:`ModelInfo`).

Layout of a checkpoint directory::

    DIR/info.json   arch, num_classes, class names, preprocessing, default split
    DIR/state/      orbax StandardCheckpointer tree (parameters and BatchNorm statistics)
    DIR/state.sha256.json  sha256 of every file under state/, checked before a restore (a damaged file is
                    named in one line; checkpoints saved before this file existed are restored unchecked)

``save`` writes into a hidden sibling directory and renames it into place, so
an interrupted save never leaves a half-written ``DIR``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from fgvce_jax import models, store
from fgvce_jax.errors import FgvceError
from fgvce_jax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD

INFO_FILE = "info.json"
STATE_DIR = "state"
DIGESTS_FILE = "state.sha256.json"  # {file under state/: sha256} as saved, checked before a restore


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint records besides the weights.

    ``image_size`` is the center crop side, ``resize_size`` the shorter side the
    image is first resized to (torchvision's eval transform); ``mean``/``std``
    normalise [0, 1] RGB.
    """

    arch: str
    num_classes: int
    class_names: tuple[str, ...] | None = None
    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    default_split: str | None = None

    def __post_init__(self):
        if self.arch not in models.ARCHS:
            raise FgvceError(f"unknown arch {self.arch!r}; choose one of {', '.join(models.ARCHS)}")
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
            if len(self.class_names) != self.num_classes:
                raise FgvceError(f"{len(self.class_names)} class names given for {self.num_classes} classes")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @classmethod
    def for_model(cls, model: nnx.Module, class_names=None, image_size: int | None = None,
                  resize_size: int | None = None) -> "ModelInfo":
        """Defaults for ``model``: its own image size (ViT) or 224 (32 for resnet_tiny); resize = size * 256/224."""
        if image_size is None:
            image_size = getattr(model, "image_size", 32 if model.arch == "resnet_tiny" else 224)
        if resize_size is None:
            resize_size = image_size if model.arch == "resnet_tiny" else round(image_size * 256 / 224)
        return cls(model.arch, model.num_classes, class_names, int(image_size), int(resize_size),
                   default_split=model.default_split)


def save(path: str | os.PathLike, model: nnx.Module, info: ModelInfo, *, overwrite: bool = False) -> Path:
    """Write ``model``'s variables and ``info`` to directory ``path``; returns the absolute path.

    Raises FgvceError if ``path`` exists (unless ``overwrite``) or ``info`` does not describe ``model``.
    """
    path = Path(path).expanduser().absolute()
    if (info.arch, info.num_classes) != (model.arch, model.num_classes):
        raise FgvceError(f"info describes {info.arch} with {info.num_classes} classes but the model is "
                         f"{model.arch} with {model.num_classes}")
    if path.exists() and not overwrite:
        raise FgvceError(f"{path} already exists; choose another output directory or pass overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / STATE_DIR, nnx.to_pure_dict(nnx.state(model)))
        (tmp / DIGESTS_FILE).write_text(json.dumps(_digests(tmp / STATE_DIR), indent=1, sort_keys=True))
        (tmp / INFO_FILE).write_text(json.dumps(dataclasses.asdict(info), indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_info(path: str | os.PathLike) -> ModelInfo:
    """The :class:`ModelInfo` of checkpoint ``path``."""
    file = Path(path).expanduser().absolute() / INFO_FILE
    if not file.is_file():
        raise FgvceError(f"{file.parent} is not a model checkpoint (no {INFO_FILE})")
    try:
        return ModelInfo(**json.loads(file.read_text()))
    except (ValueError, TypeError) as e:
        raise FgvceError(f"{file} is not a valid model description: {e}") from None


def _clip(text: str, most: int = 160) -> str:
    return text if len(text) <= most else text[:most - 3] + "..."


def _names(tree) -> dict[str, tuple]:
    """{'a.b.c': shape} of a weight tree's leaves."""
    return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key): tuple(getattr(leaf, "shape", ()))
            for key, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_layout(path: Path, info: ModelInfo, metadata, target) -> None:
    """FgvceError in one line when the stored weights are not those of ``info``'s architecture: how many
    names are missing or extra, and the first few, or the first shapes that differ."""
    stored = _names(getattr(metadata, "item_metadata", metadata))
    if not stored:  # the metadata files are missing or cut short
        raise FgvceError(f"checkpoint {path} is damaged or incomplete: the list of weights in "
                         f"{path / STATE_DIR} cannot be read")
    wanted = _names(target)
    missing, extra = sorted(wanted.keys() - stored.keys()), sorted(stored.keys() - wanted.keys())
    shapes = [k for k in sorted(wanted.keys() & stored.keys()) if stored[k] and stored[k] != wanted[k]]
    if not (missing or extra or shapes):
        return
    parts = [f"{len(missing)} expected weights missing (e.g. {', '.join(missing[:3])})" if missing else "",
             f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})" if extra else "",
             f"{len(shapes)} of other shapes (e.g. {shapes[0]} {stored[shapes[0]]}, expected "
             f"{wanted[shapes[0]]})" if shapes else ""]
    raise FgvceError(f"checkpoint {path} does not hold {info.arch} weights with {info.num_classes} classes, as its "
                     f"info.json says: {'; '.join(p for p in parts if p)}")


def _digests(state_dir: Path) -> dict[str, str]:
    """{path relative to ``state_dir``: sha256} of every file orbax wrote there."""
    return {str(f.relative_to(state_dir)): store.file_digest(f) for f in sorted(state_dir.rglob("*")) if f.is_file()}


def _check_files(path: Path) -> None:
    """FgvceError naming the first weight file of checkpoint ``path`` that is missing or whose bytes differ from
    those :func:`save` wrote (``DIGESTS_FILE``). Checkpoints written before it was kept are not checked here."""
    listed = path / DIGESTS_FILE
    if not listed.is_file():
        return
    try:
        want = json.loads(listed.read_text())
    except ValueError:
        raise FgvceError(f"checkpoint {path} is damaged: {listed} is not valid JSON") from None
    for name, digest in want.items():
        f = path / STATE_DIR / name
        if not f.is_file():
            raise FgvceError(f"checkpoint {path} is damaged: {f} is missing; save or convert the checkpoint again")
        if store.file_digest(f) != digest:
            raise FgvceError(f"checkpoint {path} is damaged: {f} (its bytes differ from those written); save or "
                             "convert the checkpoint again")


def load(path: str | os.PathLike) -> tuple[nnx.Module, ModelInfo]:
    """Restore ``(model, info)`` from a checkpoint written by :func:`save`; the model is in eval mode."""
    path = Path(path).expanduser().absolute()
    info = read_info(path)
    _check_files(path)
    abstract = nnx.eval_shape(lambda: models.create(info.arch, info.num_classes, image_size=info.image_size))
    graphdef, state = nnx.split(abstract)
    # Restored onto this process's first device, also under jax.distributed (each process reads the weights).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nnx.to_pure_dict(state))
    absl = logging.getLogger("absl")  # orbax warns there about unreadable metadata, which the error below names
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            _check_layout(path, info, ckptr.metadata(path / STATE_DIR), target)
            restored = ckptr.restore(path / STATE_DIR, target)
    except FgvceError:
        raise
    except Exception as e:  # orbax raises several types for missing or corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        # TensorStore's text is array indices and a handle, no use to a user: only its type is kept
        why = type(e).__name__ if not first or "TensorStore" in first else _clip(first)
        raise FgvceError(f"checkpoint {path} is damaged or incomplete: the weights in {path / STATE_DIR} cannot be "
                         f"read ({why}); save or convert the checkpoint again") from None
    finally:
        absl.setLevel(level)
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)
    model.eval()
    return model, info
