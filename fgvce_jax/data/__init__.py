"""Datasets behind one interface: ``load(name, split, image_size=...) -> Dataset``.

Names: ``digits`` (scikit-learn, offline), ``birds`` (procedurally drawn
birds with part masks and known causes, offline; :mod:`fgvce_jax.data.birds`), ``morpho-digits`` and
``morpho-digits-shortcut`` (font digits with known factors, generated offline; the second with a slant
shortcut planted in its train split; :mod:`fgvce_jax.data.morpho_digits`), ``tfds:NAME`` (a prepared TFDS
dataset, e.g. ``tfds:caltech_birds2011``, ``tfds:stanford_dogs``),
``cub:DIR`` (the raw CUB_200_2011 folder, with part annotations) and
``folder:DIR`` (one sub-folder per class).

Wherever a model reads a dataset, it is opened with the checkpoint's preprocessing (``preprocessing=``), which
wins over the source's own default; what changed is printed once per dataset and change.
"""
from __future__ import annotations

import sys

from fgvce_jax.data import birds, cub, digits, folder, morpho_digits, tfds_source
from fgvce_jax.data.dataset import Dataset, Preprocessing
from fgvce_jax.data.parts import PartAnnotation
from fgvce_jax.errors import FgvceError

__all__ = ["Dataset", "PartAnnotation", "Preprocessing", "load", "load_as_run", "NAMES"]

NAMES = ("digits", "birds", *morpho_digits.NAMES, "tfds:NAME", "cub:DIR", "folder:DIR")


_NOTICED: set[tuple[str, str]] = set()  # (dataset, change) pairs already printed by this process


def load(name: str, split: str, *, image_size: int | None = None, preprocessing: Preprocessing | None = None,
         data_dir: str | None = None) -> Dataset:
    """Open split ``split`` of dataset ``name``.

    Args:
      name: one of ``NAMES``.
      split: usually "train" or "test" (TFDS: any split the dataset has).
      image_size: side S of the model input; default 32 for digits, 64 for birds, 28 for morpho-digits,
        224 otherwise (resized to ``round(S * 256 / 224)`` first, then centre-cropped).
      preprocessing: the model's (``Preprocessing.of_model(info)``); replaces the source's default for its
        ``image_size``, with a one-line notice on stderr naming the fields that differ (once per process).
      data_dir: TFDS data directory (default: TFDS's own, honouring TFDS_DATA_DIR).
    """
    ds = _open(name, split, preprocessing.image_size if preprocessing else image_size, data_dir)
    if preprocessing is None or preprocessing == ds.preprocessing:
        return ds
    change = preprocessing.changes_from(ds.preprocessing)
    if (name, change) not in _NOTICED:
        _NOTICED.add((name, change))
        print(f"notice: {name} is read with the model's preprocessing, not the dataset's default ({change})",
              file=sys.stderr)
    return ds.with_preprocessing(preprocessing)


RUN_KEYS = ("dataset", "split", "reference_split", "image_size", "preprocessing", "data")  # of load_as_run's run


def load_as_run(run: dict, split: str) -> Dataset:
    """Split ``split`` of an explain run's dataset (``run``: its stored config, :data:`RUN_KEYS` read), read as the run read it: with
    its stored preprocessing (older runs: their image size).

    FgvceError (one line) if the run stored a content fingerprint of ``split`` and the images now differ: the
    results would be shown or scored on images they were not computed for."""
    pre = run.get("preprocessing")
    ds = load(run["dataset"], split, image_size=run.get("image_size"), preprocessing=pre and Preprocessing(**pre))
    stored = (run.get("data") or {}).get(split)
    if stored is not None and stored != ds.fingerprint:
        raise FgvceError(f"the images of {run['dataset']} {split} changed since the explain run (content fingerprint "
                         f"{stored} -> {ds.fingerprint}); run `fgvce explain ... --overwrite` again")
    return ds


def _open(name: str, split: str, image_size: int | None, data_dir: str | None) -> Dataset:
    """The source's own Dataset for ``name`` (its default preprocessing for ``image_size``)."""
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
