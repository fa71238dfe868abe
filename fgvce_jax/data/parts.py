"""CUB-200-2011 part annotations (SPEC 6), in the coordinates of the model input.

``parts/parts.txt`` names 15 parts; "left X" and "right X" merge into one type
X, giving 12 types. ``parts/part_locs.txt`` holds ``image_id part_id x y
visible`` in original-image pixels; only visible parts are kept. Points are
carried through torchvision's ``Resize(resize_size)`` and
``CenterCrop(image_size)`` geometry and rasterised onto the H x W feature grid:
cell ``(floor(y * H / S), floor(x * W / S))`` of an S x S input.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from fgvce_jax.models.preprocess import resize_crop_layout

SIDES = ("left ", "right ")


@dataclasses.dataclass(frozen=True)
class PartAnnotation:
    """Visible parts of one image after resize and crop.

    Attributes:
      names: (K,) part type names (K = 12 for CUB).
      types: (P,) int, the type of each visible part.
      xy: (P, 2) float, (x, y) in pixels of the S x S model input.
      image_size: S.
      bbox: (4,) float (x0, y0, x1, y1) bird box in the same pixels, possibly reaching outside the crop.
    """

    names: tuple[str, ...]
    types: np.ndarray
    xy: np.ndarray
    image_size: int
    bbox: np.ndarray

    def grid(self, shape: tuple[int, int]) -> np.ndarray:
        """(K, H, W) bool: ``[k, r, c]`` is True when a part of type k falls in cell (r, c)."""
        return rasterize(self.types, self.xy, len(self.names), self.image_size, shape)


def merge_sides(part_names: list[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """Part names -> (type names in first-seen order, (n_parts,) type index of each part)."""
    base = [next((n[len(s):] for s in SIDES if n.startswith(s)), n) for n in part_names]
    names = tuple(dict.fromkeys(base))
    return names, np.array([names.index(b) for b in base], dtype=np.int64)


def read_part_names(path: Path) -> list[str]:
    """``parts.txt`` (``part_id name``, ids 1..P in order) -> names."""
    rows = [line.split(" ", 1) for line in Path(path).read_text().splitlines() if line.strip()]
    return [name.strip() for _, name in sorted(rows, key=lambda r: int(r[0]))]


def read_part_locations(path: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``part_locs.txt`` -> {image_id: (part index (P,) 0-based, xy (P, 2) float)}, visible parts only."""
    table = np.loadtxt(path, ndmin=2)
    table = table[table[:, 4] > 0]
    out = {}
    for image_id in np.unique(table[:, 0]).astype(int):
        rows = table[table[:, 0] == image_id]
        out[int(image_id)] = (rows[:, 1].astype(np.int64) - 1, rows[:, 2:4].astype(np.float64))
    return out


def resize_crop_geometry(height: int, width: int, resize_size: int, crop: int) -> tuple[float, float, int, int]:
    """torchvision ``Resize(resize_size)`` + ``CenterCrop(crop)`` as ``x' = x * sx - left, y' = y * sy - top``.

    Returns (sx, sy, left, top): the shorter side becomes ``resize_size``, the
    longer ``int(resize_size * long / short)``; the crop starts at
    ``round((new - crop) / 2)`` on each axis.
    """
    new_h, new_w, top, left = resize_crop_layout(height, width, resize_size, crop)
    return new_w / width, new_h / height, left, top


def transform_points(xy: np.ndarray, height: int, width: int, resize_size: int, crop: int) -> np.ndarray:
    """(P, 2) original (x, y) pixels -> (P, 2) pixels of the cropped input (may fall outside [0, crop))."""
    sx, sy, left, top = resize_crop_geometry(height, width, resize_size, crop)
    return np.asarray(xy, np.float64) * np.array([sx, sy]) - np.array([left, top])


def rasterize(types: np.ndarray, xy: np.ndarray, n_types: int, image_size: int,
              shape: tuple[int, int]) -> np.ndarray:
    """Points of given types on an S x S image -> (n_types, H, W) bool occupancy grid; points outside are dropped."""
    h, w = shape
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    inside = np.all((xy >= 0) & (xy < image_size), axis=1)
    rows = np.floor(xy[inside, 1] * h / image_size).astype(np.int64)
    cols = np.floor(xy[inside, 0] * w / image_size).astype(np.int64)
    out = np.zeros((n_types, h, w), bool)
    out[np.asarray(types, np.int64)[inside], rows, cols] = True
    return out
