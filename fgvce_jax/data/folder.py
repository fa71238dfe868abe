"""``folder:DIR``: one sub-folder per class, like torchvision's ``ImageFolder``.

Class names are the sorted sub-folder names. If ``DIR/train`` and ``DIR/test``
exist they are the splits (classes taken from ``train/``); otherwise all
images are split per class with a fixed seed, a fifth to test. Files are
kept if their extension is an image one; those that do not decode are
skipped with one warning listing them. The fingerprint is each file's id, size and mtime.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fgvce_jax.data.dataset import (IMAGE_EXTENSIONS, Dataset, Preprocessing, drop_unreadable, file_stamp, read_rgb,
                                    require_dir, require_split, stratified_split)
from fgvce_jax.errors import FgvceError

SPLITS = ("train", "test")
TEST_FRACTION = 0.2
SEED = 0
HOW = "pass folder:DIR where DIR holds one sub-folder of images per class"


def scan(root: Path, class_names: list[str]) -> tuple[list[Path], np.ndarray]:
    """Image files under ``root/<class>/`` (recursive, sorted) and their (N,) labels."""
    files, labels = [], []
    for c, name in enumerate(class_names):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        files += found
        labels += [c] * len(found)
    return files, np.array(labels, np.int64)


def load(directory: str | Path, split: str, *, image_size: int | None = None) -> Dataset:
    """The folder split as a :class:`Dataset` (ImageNet eval transform, default 256 -> 224)."""
    name = f"folder:{directory}"
    require_split(split, SPLITS, name)
    root = require_dir(Path(directory), name, HOW)
    presplit = all((root / s).is_dir() for s in SPLITS)
    class_root = root / "train" if presplit else root
    class_names = sorted(p.name for p in class_root.iterdir() if p.is_dir())
    if not class_names:
        raise FgvceError(f"{name}: no class sub-folders in {str(class_root)!r}; {HOW}")
    if presplit:
        files, labels = scan(root / split, class_names)
    else:
        files, labels = scan(root, class_names)
        train, test = stratified_split(labels, TEST_FRACTION, SEED)
        idx = train if split == "train" else test
        files, labels = [files[i] for i in idx], labels[idx]
    keep = drop_unreadable(files, f"{name} {split}")
    files, labels = [files[k] for k in keep], labels[keep]
    if not files:
        raise FgvceError(f"{name}: no readable images in split {split!r}; {HOW}")
    return Dataset(name=name, split=split, ids=[str(p.relative_to(root)) for p in files], labels=labels,
                   class_names=class_names, splits=SPLITS, read=lambda i: read_rgb(files[i]),
                   stamp=lambda i: file_stamp(files[i]), preprocessing=Preprocessing.imagenet(image_size))
