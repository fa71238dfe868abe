"""``digits``: scikit-learn's 8x8 handwritten digits, the dataset that works offline.

The 1797 images (grey levels 0..16) become uint8 RGB (``round(v * 255 / 16)``
on all three channels; fingerprinted by their bytes) and are upsampled bilinearly to ``image_size``
(default 32) by the same eval transform as every other source. Normalisation
uses one mean and std for all channels: the train split's pixel statistics in
[0, 1]. The split is a fixed seeded stratified one, two thirds train.
"""
from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from fgvce_jax.data.dataset import Dataset, Preprocessing, array_stamp, require_split, stratified_split

SPLITS = ("train", "test")
TEST_FRACTION = 1 / 3
SEED = 0
DEFAULT_SIZE = 32


def load(split: str, *, image_size: int | None = None) -> Dataset:
    """The ``digits`` split: (N,) labels 0..9, images (N, S, S, 3), S = ``image_size`` or 32."""
    require_split(split, SPLITS, "digits")
    bunch = load_digits()
    grey = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = bunch.target.astype(np.int64)
    train, test = stratified_split(labels, TEST_FRACTION, SEED)
    mean = float(grey[train].mean() / 255.0)
    std = float(grey[train].std() / 255.0)
    size = DEFAULT_SIZE if image_size is None else int(image_size)
    idx = train if split == "train" else test
    rgb = np.repeat(grey[idx][..., None], 3, axis=-1)  # (N, 8, 8, 3)
    return Dataset(
        name="digits", split=split, ids=[f"digits/{i}" for i in idx], labels=labels[idx],
        class_names=[str(c) for c in range(10)], splits=SPLITS, read=lambda i: rgb[i],
        stamp=lambda i: array_stamp(rgb[i]),
        preprocessing=Preprocessing(size, size, (mean,) * 3, (std,) * 3),
    )
