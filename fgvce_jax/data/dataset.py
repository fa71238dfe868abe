"""The one interface every data source is seen through.

A source supplies, for one split, the ids, integer labels, class names and a
reader ``read(i) -> uint8 (h, w, 3)`` of the original image; :class:`Dataset`
turns those into model inputs with the torchvision eval transform
(``Resize(resize_size) + CenterCrop(image_size) + Normalize(mean, std)``,
:func:`fgvce_jax.models.preprocess.eval_transform`), so that a checkpoint's
``ModelInfo`` preprocessing reproduces exactly what the model was trained on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fgvce_jax.errors import FgvceError
from fgvce_jax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, eval_transform, resize_center_crop

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """torchvision eval transform: resize the shorter side to ``resize_size``,
    centre-crop ``image_size`` x ``image_size``, then ``(x / 255 - mean) / std``."""

    image_size: int
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):  # as read back from JSON (lists) or numpy: compare equal to the same numbers
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "resize_size", int(self.resize_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @classmethod
    def imagenet(cls, image_size: int | None) -> "Preprocessing":
        """The standard 256 -> 224 recipe, scaled to ``image_size`` (default 224)."""
        size = 224 if image_size is None else int(image_size)
        return cls(size, int(round(size * 256 / 224)))

    @classmethod
    def of_model(cls, info) -> "Preprocessing":
        """What a checkpoint's :class:`~fgvce_jax.models.checkpoint.ModelInfo` records the model was trained on."""
        return cls(info.image_size, info.resize_size, info.mean, info.std)

    def changes_from(self, default: "Preprocessing") -> str:
        """``"mean (0.485, ...) -> (0.1, ...); resize 73 -> 64"``: each field that differs from ``default``."""
        mine, theirs = dataclasses.asdict(self), dataclasses.asdict(default)
        return "; ".join(f"{k.replace('_size', '')} {_short(theirs[k])} -> {_short(mine[k])}"
                         for k in mine if _short(mine[k]) != _short(theirs[k]))


def _short(value) -> str:
    """A preprocessing field as the notice shows it (floats to 4 significant digits)."""
    return str(value) if isinstance(value, int) else "(" + ", ".join(f"{v:.4g}" for v in value) + ")"


def file_stamp(path) -> str:
    """``"size:mtime_ns"`` of a file: changes when the file is replaced or rewritten in place."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def array_stamp(array: np.ndarray) -> str:
    """First 16 hex digits of sha256 over an array's dtype, shape and bytes."""
    a = np.ascontiguousarray(array)
    return hashlib.sha256(f"{a.dtype}{a.shape}".encode() + a.tobytes()).hexdigest()[:16]


class Dataset:
    """One split of a labelled image dataset.

    Attributes:
      name, split: what ``load`` was called with.
      ids: (N,) str, stable per-image identifiers (file paths for folders).
      labels: (N,) int64 in ``[0, len(class_names))``.
      class_names: list[str].
      splits: tuple[str, ...], the splits the source offers.
      preprocessing: :class:`Preprocessing` applied by :meth:`images`.
      part_names: (P,) names of the parts :meth:`part_masks` and :meth:`cause_parts` index, or None
        (a dataset without part masks and known causes, e.g. everything but ``birds``).
      fingerprint: str, 16 hex digits, of the split's content (:attr:`fingerprint`).

    ``stamp(i)`` is a short string that changes when image ``i``'s pixels may have (its file's size and mtime,
    a hash of its array, the generator's version); ``parts(i, preprocessing)`` annotates image ``i`` in the
    coordinates of the model input that ``preprocessing`` makes of it.
    """

    def __init__(self, *, name: str, split: str, ids: Sequence[str], labels: np.ndarray,
                 class_names: Sequence[str], splits: Sequence[str],
                 read: Callable[[int], np.ndarray], stamp: Callable[[int], str], preprocessing: Preprocessing,
                 parts: Callable[[int, Preprocessing], object] | None = None,
                 part_masks: Callable[[int], np.ndarray] | None = None,
                 cause_parts: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 part_names: Sequence[str] | None = None):
        self.name, self.split = name, split
        self.ids = np.asarray(list(ids), dtype=str)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.splits = tuple(splits)
        self.preprocessing = preprocessing
        self._read, self._stamp, self._parts = read, stamp, parts
        self._fingerprint = None
        self._part_masks, self._cause_parts = part_masks, cause_parts
        self.part_names = None if part_names is None else tuple(part_names)
        if (part_masks is None) != (part_names is None) or (cause_parts is not None and part_names is None):
            raise ValueError("part_masks and cause_parts need part_names (and part_names needs part_masks)")
        if len(self.ids) != len(self.labels):
            raise ValueError(f"{len(self.ids)} ids but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"classes={len(self.class_names)}, image_size={self.preprocessing.image_size})")

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of sha256 over the lines ``id \\t stamp(i)`` of every image, in order: another
        image under the same id, or another set or order of ids, gives another fingerprint."""
        if self._fingerprint is None:
            lines = "".join(f"{self.ids[i]}\t{self._stamp(i)}\n" for i in range(len(self)))
            self._fingerprint = hashlib.sha256(lines.encode()).hexdigest()[:16]
        return self._fingerprint

    def read(self, i: int) -> np.ndarray:
        """The original image ``i``: uint8 (h, w, 3), before any resize."""
        return self._read(int(i))

    def images(self, indices) -> np.ndarray:
        """Model inputs for ``indices``: (B, S, S, 3) float32, S = ``preprocessing.image_size``."""
        p = self.preprocessing
        return eval_transform([self.read(i) for i in np.asarray(indices).reshape(-1)],
                              p.resize_size, p.image_size, p.mean, p.std)

    def raw_image(self, i: int) -> np.ndarray:
        """Image ``i`` as a person sees the model input: uint8 (S, S, 3), resized and cropped, not normalised."""
        return resize_center_crop(self.read(i), self.preprocessing.resize_size, self.preprocessing.image_size)

    def subset(self, indices) -> "Dataset":
        """The same split restricted to ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        parts = None if self._parts is None else (lambda i, pre: self._parts(int(idx[i]), pre))
        masks = None if self._part_masks is None else (lambda i: self._part_masks(int(idx[i])))
        return Dataset(name=self.name, split=self.split, ids=self.ids[idx], labels=self.labels[idx],
                       class_names=self.class_names, splits=self.splits, read=lambda i: self._read(int(idx[i])),
                       stamp=lambda i: self._stamp(int(idx[i])), preprocessing=self.preprocessing, parts=parts,
                       part_masks=masks, cause_parts=self._cause_parts, part_names=self.part_names)

    def with_preprocessing(self, preprocessing: Preprocessing) -> "Dataset":
        """The same images, made into model inputs (and part coordinates) by ``preprocessing`` instead. Part
        masks (``birds``) stay as drawn, at the generator's image size."""
        return Dataset(name=self.name, split=self.split, ids=self.ids, labels=self.labels,
                       class_names=self.class_names, splits=self.splits, read=self._read, stamp=self._stamp,
                       preprocessing=preprocessing, parts=self._parts, part_masks=self._part_masks,
                       cause_parts=self._cause_parts, part_names=self.part_names)

    def parts(self, i: int):
        """:class:`fgvce_jax.data.parts.PartAnnotation` of image ``i`` (CUB, birds), else None."""
        return None if self._parts is None else self._parts(int(i), self.preprocessing)

    def part_masks(self, i: int) -> np.ndarray | None:
        """(P, S, S) bool pixel masks of image ``i``'s parts on the model input (``part_names`` order;
        ``birds`` only), else None."""
        return None if self._part_masks is None else self._part_masks(int(i))

    def cause_parts(self, y, y_hat) -> np.ndarray | None:
        """Known causes: class indices (...,), (...,) -> (..., P) bool, part p differs between classes y and
        y_hat (``birds`` only), else None."""
        return None if self._cause_parts is None else self._cause_parts(y, y_hat)


def positions_of(ds, ids, what: str = "images") -> np.ndarray:
    """int64 positions in ``ds`` (anything with ``ids``, ``name`` and ``split``) of the image ``ids``, looked up
    by id, so results stay attached to their images when a dataset gains, loses or reorders others. An id
    that is gone is an FgvceError naming it: the stored results no longer match the data."""
    ids = np.asarray(ids, dtype=str).reshape(-1)
    where = {i: k for k, i in enumerate(np.asarray(ds.ids, dtype=str).tolist())}
    gone = [i for i in ids.tolist() if i not in where]
    if gone:
        raise FgvceError(f"{len(gone)} {what} of the stored results are no longer in {ds.name} {ds.split} "
                         f"(e.g. {gone[0]!r}): the dataset changed since the explain run; run it again "
                         f"(`fgvce explain ... --overwrite`)")
    return np.asarray([where[i] for i in ids.tolist()], np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: in each class, ``round(test_fraction * n_c)`` items go to test.

    Returns sorted (train_indices, test_indices) into ``labels``.
    """
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.extend(rng.permutation(members)[: int(round(test_fraction * len(members)))])
    is_test = np.zeros(len(labels), bool)
    is_test[np.asarray(test, dtype=np.int64)] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


FULL_SCALE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "F": 1.0}  # PIL mode -> white


def to_uint8(values: np.ndarray, full_scale: float, path) -> np.ndarray:
    """uint8 (h, w) from one channel of any bit depth: ``round(255 values / full_scale)``.

    Non-finite pixels (NaN, inf) and values outside [0, full_scale] are refused (FgvceError naming the file):
    clipping them would silently turn a damaged image into a plausible one."""
    values = np.asarray(values, np.float64)
    if not np.isfinite(values).all():
        raise FgvceError(f"image {path} has {int((~np.isfinite(values)).sum())} non-finite pixel(s) (NaN or inf)")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > full_scale:
        raise FgvceError(f"image {path} has pixel values in [{low:g}, {high:g}], outside [0, {full_scale:g}] "
                         "for its bit depth")
    return np.rint(values * (255.0 / full_scale)).astype(np.uint8)


def read_rgb(path: Path | str) -> np.ndarray:
    """Decode an image file to uint8 (h, w, 3), scaled by its bit depth.

    8-bit images (L, P, RGB, RGBA, CMYK, ...) go through PIL's RGB conversion; 16-bit greyscale (``I;16``)
    is scaled from 0..65535, 32-bit float (``F``) from 0..1, a 32-bit integer image (``I``) from 0..65535
    when it is a PNG (PIL's mode for 16-bit PNGs) and is otherwise refused; see :func:`to_uint8`.
    """
    with Image.open(path) as img:
        mode = img.mode
        full = FULL_SCALE.get(mode, 65535 if (mode == "I" and img.format == "PNG") else None)
        if full is None and mode in ("I", "I;32"):
            raise FgvceError(f"image {path}: 32-bit integer pixels are not supported; save it as 8 or 16 bit")
        if full is None:
            return np.asarray(img.convert("RGB"))
        grey = to_uint8(np.asarray(img), full, path)
    return np.repeat(grey[..., None], 3, axis=-1)


def _is_readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.draft("RGB", (32, 32))  # JPEG: decode at reduced scale, still reads every block
            img.load()
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def drop_unreadable(paths: Sequence[Path], what: str) -> np.ndarray:
    """Indices of ``paths`` that decode as images; one warning lists the others.

    Returns (M,) int64, sorted.
    """
    ok = np.array([_is_readable(Path(p)) for p in paths], dtype=bool)
    bad = [str(p) for p, good in zip(paths, ok) if not good]
    if bad:
        warnings.warn(f"{what}: skipped {len(bad)} unreadable image(s): {', '.join(bad)}", stacklevel=3)
    return np.flatnonzero(ok)


def require_split(split: str, splits: Sequence[str], name: str) -> None:
    if split not in splits:
        raise FgvceError(f"dataset {name!r} has no split {split!r}; choose one of: {', '.join(splits)}")


def require_dir(path: Path, name: str, how: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FgvceError(f"dataset {name!r}: directory {str(path)!r} does not exist; {how}")
    return path.resolve()
