"""``tfds:NAME``: any prepared TFDS image classification dataset, read with
``tfds.data_source`` (random access over ArrayRecord files; no TensorFlow).

Examples are indexed one at a time; the image is feature ``image`` and the
label feature ``label`` (a ``ClassLabel``, whose names become the class
names). Nothing is ever downloaded here: a dataset that is not prepared is an
error that says how to build it. The fingerprint is the dataset's name, version and the example ids
(the prepared files are taken to be what that version defines).
"""
from __future__ import annotations

import numpy as np

from fgvce_jax import progress
from fgvce_jax.data.dataset import Dataset, Preprocessing
from fgvce_jax.errors import FgvceError


def _how_to_build(name: str) -> str:
    return (f"prepare it first with `tfds build {name} --file_format=array_record` "
            "(set TFDS_DATA_DIR or pass data_dir to use another data directory)")


def open_source(name: str, split: str, data_dir: str | None = None):
    """``tfds.data_source`` without downloading, with TFDS failures turned into FgvceError."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise FgvceError(f"unknown TFDS dataset {name!r} (see `tfds.list_builders()`)") from None
    except Exception as e:  # not prepared, prepared as TFRecord, unknown split, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FgvceError(f"cannot open TFDS dataset {name!r} split {split!r} ({reason}); {_how_to_build(name)}") from None


def load(name: str, split: str, *, image_size: int | None = None, data_dir: str | None = None) -> Dataset:
    """The TFDS split as a :class:`Dataset`; labels are read once (one pass over the split)."""
    source = open_source(name, split, data_dir)
    features = source.dataset_info.features
    if "image" not in features or "label" not in features or not hasattr(features["label"], "names"):
        raise FgvceError(f"TFDS dataset {name!r} has no `image` and `label` (ClassLabel) features")
    labels = np.array([int(source[i]["label"]) for i in progress.bar(range(len(source)), desc=f"{name}/{split}: labels",
                                                                    leave=False, disable=len(source) < 1000)],
                      dtype=np.int64)
    splits = tuple(source.dataset_info.splits) or (split,)
    version = str(source.dataset_info.version)

    def read(i: int) -> np.ndarray:
        img = np.asarray(source[i]["image"])
        return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img

    return Dataset(name=f"tfds:{name}", split=split, ids=[f"{name}/{split}/{i}" for i in range(len(source))],
                   labels=labels, class_names=features["label"].names, splits=splits, read=read,
                   stamp=lambda i: version,
                   preprocessing=Preprocessing.imagenet(image_size))
