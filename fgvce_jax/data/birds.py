"""``birds``: an embedded, procedurally drawn fine-grained dataset with part masks and known causes.

In the spirit of FunnyBirds (Hesse, Schaub-Meyer, Roth, ICCV 2023); our own
generator, numpy/PIL only, seeded, nothing downloaded (docs/birds.md).

A bird is seven parts, :data:`PARTS`, each drawn in one of two types
(:data:`TYPES`: a colour, a shape or a pattern). A class is a tuple of part
types, one per part (:data:`CLASS_TYPES`): 4 genera (body, head, tail, leg)
times 4 species (beak, eye, wing) = 16 classes; neighbouring classes differ in
one or two parts. The cause of a confusion y -> y_hat is the set of parts in
which the two classes differ (:func:`causes`).

An image is ``render(CLASS_TYPES[y], nuisance, size)``: the class and the
nuisance (:class:`Nuisance`: facing, rotation, scale, position, background
clutter, an optional occluder, a colour gain) are separate inputs. Each part's
pixels depend only on its own type and the nuisance, and parts are painted in
:data:`DRAW_ORDER` without anti-aliasing, so two classes that differ only in
part P give the same pixels outside P's masks. The mask of a part is the set of
pixels where it is the top layer (not hidden by a later part, the occluder or
the image border); its keypoint is the mask pixel nearest the mask's centroid
(so it lies inside the mask) and it is visible iff its mask is not empty.

Sample k (0 <= k < 16 * samples_per_class) has class ``k % 16`` and the
nuisance drawn by ``numpy.random.default_rng([seed, k])``; it is in the test
split when ``(k // 16) % 4 == 3`` (a quarter of each class). Images are drawn
on first read and cached in memory. The fingerprint of an image is the generator's version
(:data:`GENERATOR`, a hash of this file), the seed and the side drawn at: drawing every image to hash it
would cost more than the run it guards.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fgvce_jax.data.dataset import Dataset, Preprocessing, require_split
from fgvce_jax.data.parts import PartAnnotation, transform_points
from fgvce_jax.errors import FgvceError

SPLITS = ("train", "test")
SEED = 0
GENERATOR = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]  # changes with any edit of the generator
DEFAULT_SIZE = 64
SAMPLES_PER_CLASS = 100
TEST_EVERY = 4  # sample k is a test sample when (k // n_classes) % TEST_EVERY == TEST_EVERY - 1

PARTS = ("body", "head", "beak", "eye", "wing", "tail", "leg")
TYPES = {
    "body": ("slate", "ochre"),  # colour
    "head": ("grey", "crimson"),  # colour
    "beak": ("cone", "needle"),  # shape
    "eye": ("dot", "ring"),  # pattern
    "wing": ("plain", "barred"),  # pattern
    "tail": ("fan", "fork"),  # shape
    "leg": ("orange", "black"),  # colour
}
DRAW_ORDER = ("tail", "leg", "body", "wing", "head", "beak", "eye")  # bottom to top
GENERA = ((0, 0, 0, 0), (1, 0, 0, 0), (1, 1, 0, 0), (1, 1, 1, 1))  # (body, head, tail, leg)
SPECIES = ((0, 0, 0), (1, 0, 0), (1, 0, 1), (0, 1, 0))  # (beak, eye, wing)
CLASS_TYPES = np.array([[g[0], g[1], s[0], s[1], s[2], g[2], g[3]] for g in GENERA for s in SPECIES],
                       np.int64)  # (C, P): type index of each part, in PARTS order
CLASS_NAMES = ["-".join(TYPES[p][t] for p, t in zip(PARTS, row)) for row in CLASS_TYPES]
SIDED = ("eye", "wing", "leg")  # CUB annotates these as "left X" / "right X"

# Canonical bird, facing left, y down, in "units" (scaled to pixels by Nuisance.scale * size).
_BODY = ((0.0, 0.0), (1.0, 0.6))
_HEAD = ((-0.95, -0.6), (0.42, 0.42))
_EYE_CENTRE = (-1.05, -0.68)
_WING = ((0.15, -0.12), (0.72, 0.34), -0.25)  # centre, radii, tilt (rad)
_BEAKS = {"cone": ((-1.25, -0.74), (-1.25, -0.46), (-1.8, -0.6)),
          "needle": ((-1.25, -0.68), (-1.25, -0.54), (-2.15, -0.6))}
_TAILS = {"fan": ((0.85, -0.15), (1.75, -0.55), (1.85, 0.05), (0.85, 0.15)),
          "fork": ((0.85, -0.15), (1.9, -0.5), (1.35, -0.05), (1.9, 0.35), (0.85, 0.15))}
_LEG_X = (-0.25, 0.2)
_COLOURS = {
    "slate": (90, 105, 140), "ochre": (205, 155, 65), "grey": (125, 125, 130), "crimson": (185, 35, 45),
    "beak": (240, 195, 50), "pupil": (20, 20, 20), "ring": (245, 245, 245), "wing": (70, 60, 50),
    "bar": (225, 215, 190), "tail": (60, 55, 50), "orange": (230, 130, 40), "black": (30, 30, 30),
}


@dataclasses.dataclass(frozen=True)
class Nuisance:
    """Everything about an image except its class; lengths are fractions of the image side S.

    Attributes:
      facing_right: mirror the bird (its beak points to +x).
      angle: rotation in radians (positive: clockwise on screen).
      scale: pixels per canonical unit / S (the bird is about 4 units long).
      centre: (x, y) of the body centre / S.
      background: (3,) RGB of the background.
      clutter_seed: seed of the background shapes (:func:`clutter`).
      occluder: None, or ((x, y), ...) 4 corners / S of a quadrilateral painted over the bird.
      occluder_colour: (3,) RGB of the occluder.
      gain: (3,) per-channel colour gain applied to the whole image: ``round(clip(gain * rgb, 0, 255))``.
    """

    facing_right: bool = False
    angle: float = 0.0
    scale: float = 0.2
    centre: tuple[float, float] = (0.5, 0.5)
    background: tuple[int, int, int] = (170, 190, 170)
    clutter_seed: int = 0
    occluder: tuple[tuple[float, float], ...] | None = None
    occluder_colour: tuple[int, int, int] = (90, 120, 60)
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)


def sample_nuisance(rng: np.random.Generator) -> Nuisance:
    """One random :class:`Nuisance`: facing 50/50, angle in [-0.3, 0.3], scale in [0.15, 0.21], centre in
    [0.38, 0.62]^2, an occluder with probability 0.25 (a random quadrilateral of side 0.1-0.3 near the bird),
    gain in [0.85, 1.15]^3."""
    facing = bool(rng.random() < 0.5)
    angle = float(rng.uniform(-0.3, 0.3))
    scale = float(rng.uniform(0.15, 0.21))
    centre = tuple(float(v) for v in rng.uniform(0.38, 0.62, 2))
    background = tuple(int(v) for v in rng.integers(110, 230, 3))
    clutter_seed = int(rng.integers(0, 2**31))
    occluder = None
    if rng.random() < 0.25:
        middle = np.asarray(centre) + rng.uniform(-0.25, 0.25, 2)
        half = rng.uniform(0.05, 0.15, 2)
        corners = _rotate(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half, float(rng.uniform(0, np.pi)))
        occluder = tuple((float(x), float(y)) for x, y in corners + middle)
    occluder_colour = tuple(int(v) for v in rng.integers(40, 200, 3))
    gain = tuple(float(v) for v in rng.uniform(0.85, 1.15, 3))
    return Nuisance(facing, angle, scale, centre, background, clutter_seed, occluder, occluder_colour, gain)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    """(n, 2) points rotated by ``angle`` about the origin (clockwise on screen, y down)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.asarray(points, np.float64) @ np.array([[c, s], [-s, c]])


def _ellipse(centre, radii, tilt: float = 0.0, n: int = 32) -> np.ndarray:
    """(n, 2) polygon approximating an ellipse."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return _rotate(np.stack([radii[0] * np.cos(t), radii[1] * np.sin(t)], 1), tilt) + np.asarray(centre)


def to_pixels(points, nuisance: Nuisance, size: int) -> np.ndarray:
    """(n, 2) canonical points -> (n, 2) pixel (x, y): ``S * (centre + scale * R(angle) (±u, v))``."""
    p = np.asarray(points, np.float64) * np.array([-1.0 if nuisance.facing_right else 1.0, 1.0])
    return size * (np.asarray(nuisance.centre) + nuisance.scale * _rotate(p, nuisance.angle))


def fill(polygons, size: int) -> np.ndarray:
    """Pixel polygons [(n, 2) (x, y), ...] -> (S, S) bool, their union drawn by PIL without anti-aliasing."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        draw.polygon([(float(x), float(y)) for x, y in poly], fill=255)
    return np.asarray(canvas) > 0


def part_strokes(part: str, type_name: str, nuisance: Nuisance, size: int) -> list[tuple[np.ndarray, tuple]]:
    """How part ``part`` of type ``type_name`` is painted: [((S, S) bool, RGB), ...], later strokes on top.

    The union of the stroke masks is the part's shape; it depends on the nuisance and the part's own type only.
    """
    px = functools.partial(to_pixels, nuisance=nuisance, size=size)
    if part == "body":
        return [(fill([px(_ellipse(*_BODY))], size), _COLOURS[type_name])]
    if part == "head":
        return [(fill([px(_ellipse(*_HEAD))], size), _COLOURS[type_name])]
    if part == "beak":
        return [(fill([px(_BEAKS[type_name])], size), _COLOURS["beak"])]
    if part == "eye":
        pupil = fill([px(_ellipse(_EYE_CENTRE, (0.11, 0.11), n=16))], size)
        if type_name == "dot":
            return [(pupil, _COLOURS["pupil"])]
        ring = fill([px(_ellipse(_EYE_CENTRE, (0.2, 0.2), n=16))], size)
        return [(ring, _COLOURS["ring"]), (pupil, _COLOURS["pupil"])]
    if part == "wing":
        wing = fill([px(_ellipse(*_WING))], size)
        if type_name == "plain":
            return [(wing, _COLOURS["wing"])]
        (cx, cy), _, tilt = _WING
        bars = [_rotate(np.array([[u - 0.08, -0.6], [u + 0.08, -0.6], [u + 0.08, 0.6], [u - 0.08, 0.6]]), tilt)
                + np.array([cx, cy]) for u in (-0.4, 0.0, 0.4)]
        return [(wing, _COLOURS["wing"]), (wing & fill([px(b) for b in bars], size), _COLOURS["bar"])]
    if part == "tail":
        return [(fill([px(_TAILS[type_name])], size), _COLOURS["tail"])]
    if part == "leg":
        legs = [np.array([[u - 0.06, 0.45], [u + 0.06, 0.45], [u + 0.06, 1.05], [u - 0.06, 1.05]]) for u in _LEG_X]
        feet = [np.array([[u - 0.25, 0.98], [u + 0.08, 0.98], [u + 0.08, 1.1], [u - 0.25, 1.1]]) for u in _LEG_X]
        return [(fill([px(p) for p in legs + feet], size), _COLOURS[type_name])]
    raise FgvceError(f"unknown bird part {part!r}; use one of: {', '.join(PARTS)}")


def clutter(seed: int, size: int) -> list[tuple[np.ndarray, tuple]]:
    """Background shapes: 4-9 random ellipses ((S, S) bool, RGB), radii 0.03-0.12 S, from ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    shapes = []
    for _ in range(int(rng.integers(4, 10))):
        centre, radii = rng.uniform(0, 1, 2) * size, rng.uniform(0.03, 0.12, 2) * size
        colour = tuple(int(v) for v in rng.integers(30, 230, 3))
        shapes.append((fill([_ellipse(centre, radii, float(rng.uniform(0, np.pi)))], size), colour))
    return shapes


def image_side(image_size: int | None) -> int:
    """The side S to draw at: ``image_size`` or :data:`DEFAULT_SIZE`; FgvceError below 8 pixels."""
    size = DEFAULT_SIZE if image_size is None else int(image_size)
    if size < 8:
        raise FgvceError(f"birds image_size must be at least 8, got {size}")
    return size


def render(class_types, nuisance: Nuisance, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Draw one bird.

    Args:
      class_types: (P,) int, the type index of each part in :data:`PARTS` order (a row of :data:`CLASS_TYPES`).
      nuisance: the pose, background, occluder and colour gain.
      size: S.

    Returns:
      ``(image, masks)``: uint8 (S, S, 3) and (P, S, S) bool, ``masks[p]`` the pixels where part p is the top
      layer (painter's order :data:`DRAW_ORDER`, then the occluder on top).
    """
    class_types = np.asarray(class_types, np.int64).reshape(-1)
    if class_types.shape != (len(PARTS),) or np.any(class_types < 0) or np.any(
            class_types >= np.array([len(TYPES[p]) for p in PARTS])):
        raise FgvceError(f"class_types must be {len(PARTS)} part type indices (see birds.TYPES), got {class_types}")
    size = image_side(size)
    image = np.empty((size, size, 3), np.float64)
    image[:] = nuisance.background
    owner = np.full((size, size), -1, np.int64)
    for mask, colour in clutter(nuisance.clutter_seed, size):
        image[mask] = colour
    for part in DRAW_ORDER:
        p = PARTS.index(part)
        for mask, colour in part_strokes(part, TYPES[part][class_types[p]], nuisance, size):
            image[mask], owner[mask] = colour, p
    if nuisance.occluder is not None:
        hidden = fill([np.asarray(nuisance.occluder) * size], size)
        image[hidden], owner[hidden] = nuisance.occluder_colour, -1
    image = np.rint(np.clip(image * np.asarray(nuisance.gain), 0, 255)).astype(np.uint8)
    return image, owner[None] == np.arange(len(PARTS))[:, None, None]


def keypoints(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, S, S) bool masks -> ``(xy, visible)``: (P, 2) float pixel (x, y) and (P,) bool.

    A part is visible iff its mask is not empty; its keypoint is the centre ``(c + 0.5, r + 0.5)`` of the mask
    pixel (r, c) nearest the mask's centroid (first in raster order on ties), so it lies inside the mask.
    Invisible parts get (0, 0).
    """
    masks = np.asarray(masks, bool)
    xy = np.zeros((masks.shape[0], 2))
    visible = masks.any((1, 2))
    for p in np.flatnonzero(visible):
        rows, cols = np.nonzero(masks[p])
        k = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
        xy[p] = cols[k] + 0.5, rows[k] + 0.5
    return xy, visible


def bird_box(masks: np.ndarray) -> np.ndarray:
    """(P, S, S) bool masks -> (4,) float (x0, y0, x1, y1): the pixel box of all visible part pixels (zeros if none)."""
    rows, cols = np.nonzero(np.asarray(masks, bool).any(0))
    if not rows.size:
        return np.zeros(4)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float64)


def n_classes() -> int:
    return len(CLASS_TYPES)


def label_of(k: int) -> int:
    """The class of sample k: ``k % C``."""
    return int(k) % n_classes()


def split_of(k: int) -> str:
    return "test" if (int(k) // n_classes()) % TEST_EVERY == TEST_EVERY - 1 else "train"


def nuisance_of(k: int, seed: int = SEED) -> Nuisance:
    """The nuisance of sample k: ``sample_nuisance(default_rng([seed, k]))``."""
    return sample_nuisance(np.random.default_rng([int(seed), int(k)]))


@functools.lru_cache(maxsize=4096)
def sample(k: int, size: int = DEFAULT_SIZE, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Sample k: ``render(CLASS_TYPES[k % C], nuisance_of(k, seed), size)``, read-only arrays (the last 4096
    samples drawn are kept: about 160 MB at 64 px)."""
    image, masks = render(CLASS_TYPES[label_of(k)], nuisance_of(k, seed), size)
    image.setflags(write=False)
    masks.setflags(write=False)
    return image, masks


def sample_ids(split: str, samples_per_class: int = SAMPLES_PER_CLASS) -> np.ndarray:
    """(N,) int64 sample indices k of ``split``, ascending."""
    k = np.arange(n_classes() * int(samples_per_class))
    return np.array([i for i in k if split_of(i) == split], np.int64)


def sample_index(sample_id: str) -> int:
    """``"birds/00017"`` -> 17."""
    match = re.fullmatch(r"birds/(\d+)", str(sample_id))
    if match is None:
        raise FgvceError(f"{sample_id!r} is not a birds image id (birds/NNNNN)")
    return int(match.group(1))


def load(split: str, *, image_size: int | None = None, samples_per_class: int = SAMPLES_PER_CLASS,
         seed: int = SEED) -> Dataset:
    """The ``birds`` split: labels 0..15, images (N, S, S, 3) drawn at S = ``image_size`` or 64 (no resize),
    ImageNet normalisation, parts as :class:`PartAnnotation` (7 types, keypoints of visible parts), part masks
    (:meth:`Dataset.part_masks`, (7, S, S)) and known causes (:meth:`Dataset.cause_parts` = :func:`cause_parts`)."""
    require_split(split, SPLITS, "birds")
    if samples_per_class < TEST_EVERY:
        raise FgvceError(f"birds samples_per_class must be at least {TEST_EVERY}, got {samples_per_class}")
    size = image_side(image_size)
    ks = sample_ids(split, samples_per_class)

    def part_annotation(i: int, pre: Preprocessing) -> PartAnnotation:
        """Keypoints and box of the S-pixel drawing, mapped through ``pre``'s resize and crop (the identity
        for the default ``Preprocessing(S, S)``)."""
        _, masks = sample(int(ks[i]), size, seed)
        xy, visible = keypoints(masks)
        box = transform_points(bird_box(masks).reshape(2, 2), size, size, pre.resize_size, pre.image_size)
        return PartAnnotation(names=PARTS, types=np.flatnonzero(visible), image_size=pre.image_size,
                              xy=transform_points(xy[visible], size, size, pre.resize_size, pre.image_size),
                              bbox=box.reshape(4))

    return Dataset(name="birds", split=split, ids=[f"birds/{k:05d}" for k in ks],
                   labels=np.array([label_of(k) for k in ks], np.int64), class_names=CLASS_NAMES, splits=SPLITS,
                   read=lambda i: sample(int(ks[i]), size, seed)[0], stamp=lambda i: f"{GENERATOR}:{seed}:{size}",
                   preprocessing=Preprocessing(size, size), parts=part_annotation,
                   part_masks=lambda i: sample(int(ks[i]), size, seed)[1], cause_parts=cause_parts, part_names=PARTS)


def cause_parts(y, y_hat) -> np.ndarray:
    """Class indices (...,), (...,) -> (..., P) bool: part p is a cause, ``CLASS_TYPES[y, p] != CLASS_TYPES[y_hat, p]``."""
    y, y_hat = np.asarray(y, np.int64), np.asarray(y_hat, np.int64)
    if np.any((y < 0) | (y >= n_classes()) | (y_hat < 0) | (y_hat >= n_classes())):
        raise FgvceError(f"birds classes are 0..{n_classes() - 1}")
    return CLASS_TYPES[y] != CLASS_TYPES[y_hat]


def causes(y: int, y_hat: int) -> set[str]:
    """The names of the parts in which classes ``y`` and ``y_hat`` differ (empty when y == y_hat)."""
    return {p for p, differs in zip(PARTS, cause_parts(y, y_hat)) if differs}


CUB_PART_NAMES = tuple(n for p in PARTS for n in ((f"left {p}", f"right {p}") if p in SIDED else (p,)))


def export_cub(directory: str | Path, *, image_size: int | None = None, samples_per_class: int = SAMPLES_PER_CLASS,
               seed: int = SEED) -> Path:
    """Write both splits in CUB_200_2011's raw layout into ``directory`` (created; must be empty or absent).

    Files: ``images/NNN.Class/birds_KKKKK.png`` (lossless), ``images.txt``, ``image_class_labels.txt``,
    ``train_test_split.txt``, ``classes.txt``, ``bounding_boxes.txt`` (the box of all part masks),
    ``parts/parts.txt`` (:data:`CUB_PART_NAMES`: eye, wing and leg as "left X" / "right X", which
    :func:`fgvce_jax.data.parts.merge_sides` merges back into :data:`PARTS`) and ``parts/part_locs.txt``
    (keypoints at pixel centres; a bird facing left shows its left side, so the other side is written
    invisible). The text files are written last, so an interrupted export is not a CUB folder.
    ``cub:DIR`` then reads it. Returns the directory.
    """
    root = Path(directory).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FgvceError(f"export directory {str(root)!r} exists and is not empty")
    size = image_side(image_size)
    ks = np.sort(np.concatenate([sample_ids(s, samples_per_class) for s in SPLITS]))
    (root / "parts").mkdir(parents=True, exist_ok=True)
    folders = [f"{c + 1:03d}.{name}" for c, name in enumerate(CLASS_NAMES)]
    rows = {f: [] for f in ("images", "labels", "split", "boxes", "locs")}
    for image_id, k in enumerate(ks.tolist(), start=1):
        image, masks = sample(k, size, seed)
        path = f"{folders[label_of(k)]}/birds_{k:05d}.png"
        (root / "images" / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / path)
        rows["images"].append(f"{image_id} {path}")
        rows["labels"].append(f"{image_id} {label_of(k) + 1}")
        rows["split"].append(f"{image_id} {int(split_of(k) == 'train')}")
        x0, y0, x1, y1 = bird_box(masks)
        rows["boxes"].append(f"{image_id} {x0:.1f} {y0:.1f} {x1 - x0:.1f} {y1 - y0:.1f}")
        xy, visible = keypoints(masks)
        shown = "right" if nuisance_of(k, seed).facing_right else "left"
        for part_id, name in enumerate(CUB_PART_NAMES, start=1):
            side, _, base = name.rpartition(" ")
            p = PARTS.index(base)
            on = bool(visible[p]) and side in ("", shown)
            x, y = xy[p] if on else (0.0, 0.0)
            rows["locs"].append(f"{image_id} {part_id} {x:.1f} {y:.1f} {int(on)}")
    text = {"images.txt": rows["images"], "image_class_labels.txt": rows["labels"],
            "train_test_split.txt": rows["split"], "bounding_boxes.txt": rows["boxes"],
            "classes.txt": [f"{c + 1} {f}" for c, f in enumerate(folders)],
            "parts/parts.txt": [f"{i} {n}" for i, n in enumerate(CUB_PART_NAMES, start=1)],
            "parts/part_locs.txt": rows["locs"]}
    for name, lines in text.items():
        (root / name).write_text("".join(line + "\n" for line in lines))
    return root
