"""``cub:DIR``: the raw CUB_200_2011 folder (Wah et al., 2011).

``DIR`` is the ``CUB_200_2011`` folder or its parent. Read: ``images.txt``
(``id path``), ``image_class_labels.txt`` (``id class``, 1-based),
``train_test_split.txt`` (``id is_train``), ``classes.txt`` (``class
NNN.Name``), ``bounding_boxes.txt`` (``id x y w h``) and the part files of
:mod:`fgvce_jax.data.parts`. Ids are the relative image paths; unreadable
images are skipped with one warning. The fingerprint is each image file's id, size and mtime.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fgvce_jax.data import parts as parts_lib
from fgvce_jax.data.dataset import (Dataset, Preprocessing, drop_unreadable, file_stamp, read_rgb, require_dir,
                                    require_split)
from fgvce_jax.errors import FgvceError

SPLITS = ("train", "test")
FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt",
         "bounding_boxes.txt", "parts/parts.txt", "parts/part_locs.txt")
HOW = ("download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/, "
       "extract it and pass cub:PATH/CUB_200_2011")


def _table(path: Path) -> dict[int, list[str]]:
    """``id rest...`` lines -> {id: [rest...]}."""
    rows = (line.split() for line in path.read_text().splitlines() if line.strip())
    return {int(r[0]): r[1:] for r in rows}


def find_root(directory: str | Path) -> Path:
    root = require_dir(Path(directory), f"cub:{directory}", HOW)
    if not (root / "images.txt").exists() and (root / "CUB_200_2011" / "images.txt").exists():
        root = root / "CUB_200_2011"
    missing = [f for f in FILES if not (root / f).exists()]
    if missing:
        raise FgvceError(f"cub:{directory} is not a CUB_200_2011 folder (missing {', '.join(missing)}); {HOW}")
    return root


def load(directory: str | Path, split: str, *, image_size: int | None = None) -> Dataset:
    """The CUB split: labels 0..199 (class id - 1), images via the ImageNet eval transform (default 256 -> 224)."""
    require_split(split, SPLITS, f"cub:{directory}")
    root = find_root(directory)
    paths = _table(root / "images.txt")
    label_of = _table(root / "image_class_labels.txt")
    is_train = _table(root / "train_test_split.txt")
    boxes = _table(root / "bounding_boxes.txt")
    classes = _table(root / "classes.txt")
    class_names = [classes[c][0].split(".", 1)[-1] for c in sorted(classes)]
    image_ids = np.array([i for i in sorted(paths) if (is_train[i][0] == "1") == (split == "train")], np.int64)
    files = [root / "images" / paths[i][0] for i in image_ids]
    keep = drop_unreadable(files, f"cub:{directory} {split}")
    image_ids, files = image_ids[keep], [files[k] for k in keep]

    type_names, type_of_part = parts_lib.merge_sides(parts_lib.read_part_names(root / "parts" / "parts.txt"))
    locations = parts_lib.read_part_locations(root / "parts" / "part_locs.txt")

    def part_annotation(i: int, pre: Preprocessing) -> parts_lib.PartAnnotation:
        image_id = int(image_ids[i])
        with Image.open(files[i]) as img:
            width, height = img.size
        part_index, xy = locations.get(image_id, (np.zeros(0, np.int64), np.zeros((0, 2))))
        x, y, w, h = (float(v) for v in boxes[image_id])
        corners = parts_lib.transform_points(np.array([[x, y], [x + w, y + h]]), height, width,
                                             pre.resize_size, pre.image_size)
        return parts_lib.PartAnnotation(
            names=type_names, types=type_of_part[part_index],
            xy=parts_lib.transform_points(xy, height, width, pre.resize_size, pre.image_size),
            image_size=pre.image_size, bbox=corners.reshape(4))

    return Dataset(name=f"cub:{directory}", split=split, ids=[paths[i][0] for i in image_ids],
                   labels=np.array([int(label_of[i][0]) - 1 for i in image_ids], np.int64),
                   class_names=class_names, splits=SPLITS, read=lambda i: read_rgb(files[i]),
                   stamp=lambda i: file_stamp(files[i]), preprocessing=Preprocessing.imagenet(image_size),
                   parts=part_annotation)
