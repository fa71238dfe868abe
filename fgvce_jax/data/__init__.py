"""Datasets behind one interface: ``load(name, split, image_size=...) -> Dataset``.

Names: ``digits`` (scikit-learn, offline), ``birds`` (procedurally drawn
birds with part masks and known causes, offline; :mod:`fgvce_jax.data.birds`), ``morpho-digits`` and
``morpho-digits-shortcut`` (font digits with known factors, generated offline; the second with a slant
shortcut planted in its train split; :mod:`fgvce_jax.data.morpho_digits`), ``tfds:NAME`` (a prepared TFDS
dataset, e.g. ``tfds:caltech_birds2011``, ``tfds:stanford_dogs``),
``cub:DIR`` (the raw CUB_200_2011 folder, with part annotations) and
``folder:DIR`` (one sub-folder per class).
"""
from __future__ import annotations

from fgvce_jax.data import birds, cub, digits, folder, morpho_digits, tfds_source
from fgvce_jax.data.dataset import Dataset, Preprocessing
from fgvce_jax.data.parts import PartAnnotation
from fgvce_jax.errors import FgvceError

__all__ = ["Dataset", "PartAnnotation", "Preprocessing", "load", "NAMES"]

NAMES = ("digits", "birds", *morpho_digits.NAMES, "tfds:NAME", "cub:DIR", "folder:DIR")


def load(name: str, split: str, *, image_size: int | None = None, data_dir: str | None = None) -> Dataset:
    """Open split ``split`` of dataset ``name``.

    Args:
      name: one of ``NAMES``.
      split: usually "train" or "test" (TFDS: any split the dataset has).
      image_size: side S of the model input; default 32 for digits, 64 for birds, 28 for morpho-digits,
        224 otherwise (resized to ``round(S * 256 / 224)`` first, then centre-cropped).
      data_dir: TFDS data directory (default: TFDS's own, honouring TFDS_DATA_DIR).
    """
    kind, _, arg = name.partition(":")
    if name == "digits":
        return digits.load(split, image_size=image_size)
    if name == "birds":
        return birds.load(split, image_size=image_size)
    if name in morpho_digits.NAMES:
        return morpho_digits.load(name, split, image_size=image_size)
    if kind == "tfds" and arg:
        return tfds_source.load(arg, split, image_size=image_size, data_dir=data_dir)
    if kind == "cub" and arg:
        return cub.load(arg, split, image_size=image_size)
    if kind == "folder" and arg:
        return folder.load(arg, split, image_size=image_size)
    raise FgvceError(f"unknown dataset {name!r}; use one of: {', '.join(NAMES)}")
