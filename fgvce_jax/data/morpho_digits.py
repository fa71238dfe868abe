"""``morpho-digits``: font digits with known causes, generated on the fly (seeded, no download).

A test bed for the GLANCE-style method (docs/glance.md): every image's factors are known, and so is the
structural model that ties them. Everything below is our choice.

Glyphs: the digits 0-9 of DejaVu Sans (the font matplotlib ships), rendered once per process at 160 pt,
binarised and thinned to a skeleton (a point set). Each skeleton is de-slanted (sheared so that its points'
central moment mu11 is 0, i.e. Morpho-MNIST slant 0) and scaled to height 1.

One image, ``NATIVE_SIZE`` = 28 px (MNIST's size), from its factors:

- ``scale`` s ~ U(0.7, 1): the skeleton is ``GLYPH_HEIGHT`` s = 20 s px tall (MNIST digits fit 20 px);
- ``slant`` theta (radians): the skeleton is sheared, column c -> c - tan(theta) (r - r_mid), positive
  leaning right (Morpho-MNIST's sign); |theta| ~ U(0, 0.45);
- ``thickness`` t ~ U(1.5, 4): the stroke is every point within t/2 px of the skeleton (a round pen of
  diameter t), rasterised at 4x4 sub-pixels and box-averaged, so Morpho-MNIST thickness measures ~t;
- ``intensity`` v = 0.45 + 0.12 t + N(0, 0.03^2), clipped to [0.2, 1]: the stroke's grey level
  (pixel = round(255 v coverage)), caused by thickness.

Known structural model: thickness -> intensity; slant and scale are exogenous and independent of
everything else, and of the label, except in ``morpho-digits-shortcut``'s train split: there the sign of the
slant follows the label's parity (even right, odd left) with probability ``SHORTCUT_P`` = 0.9. Its test split
is the clean one. The twins share the seed streams, so they differ only in the signs of the train slants.

Splits: ``SIZES`` images each, labels balanced over 0-9; seeded by (``SEED``, split); cached per process.
:func:`factors` and :func:`morphometrics` give the true and the measured factors of any (subset of a) split.
"""
from __future__ import annotations

import functools
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import distance_transform_edt
from skimage.morphology import skeletonize

from fgvce_jax import morphometrics as morpho
from fgvce_jax.data.dataset import Dataset, Preprocessing, array_stamp, require_split
from fgvce_jax.errors import FgvceError

NAMES = {"morpho-digits": False, "morpho-digits-shortcut": True}  # name -> shortcut planted
SPLITS = ("train", "test")
SIZES = {"train": 3000, "test": 1000}
SEED = 0
NATIVE_SIZE = 28
GLYPH_HEIGHT = 20.0
SUPERSAMPLE = 4
SCALE_RANGE = (0.7, 1.0)
THICKNESS_RANGE = (1.5, 4.0)
MAX_SLANT = 0.45
INTENSITY = (0.45, 0.12, 0.03)  # v = a + b t + N(0, sd^2)
SHORTCUT_P = 0.9
FACTORS = ("thickness", "slant", "scale", "intensity")
FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


@functools.lru_cache(maxsize=None)
def glyph_skeleton(digit: int) -> np.ndarray:
    """(P, 2) float64 (row, col) skeleton points of ``digit`` in DejaVu Sans, centred on their bounding box,
    rows spanning [-1/2, 1/2], de-slanted: c -> c - (cov(r, c) / var(r)) (r - mean r), so cov(r, c) = 0."""
    font = ImageFont.truetype(str(FONT), 160)
    canvas = Image.new("L", (240, 240), 0)
    ImageDraw.Draw(canvas).text((120, 120), str(digit), fill=255, font=font, anchor="mm")
    rows, cols = np.nonzero(skeletonize(np.asarray(canvas) >= 128))
    rows, cols = rows.astype(np.float64), cols.astype(np.float64)
    rc = rows - rows.mean()
    cols = cols - (np.mean(rc * (cols - cols.mean())) / np.mean(rc**2)) * rc
    height = rows.max() - rows.min()
    rows = (rows - (rows.max() + rows.min()) / 2) / height
    cols = (cols - (cols.max() + cols.min()) / 2) / height
    return np.stack([rows, cols], axis=1)


def render(digit: int, thickness: float, slant: float, scale: float, intensity: float,
           size: int = NATIVE_SIZE) -> np.ndarray:
    """uint8 (size, size) image of ``digit``: the skeleton ``GLYPH_HEIGHT`` * scale px tall, sheared by
    c -> c - tan(slant) r (r from its middle row), centred, stroked with a round pen of diameter ``thickness``
    px, grey level ``intensity`` in [0, 1] (anti-aliased by ``SUPERSAMPLE``^2 sub-pixels)."""
    points = glyph_skeleton(digit) * (GLYPH_HEIGHT * scale)
    rows = points[:, 0]
    cols = points[:, 1] - np.tan(slant) * rows
    rows = rows - (rows.max() + rows.min()) / 2 + size / 2
    cols = cols - (cols.max() + cols.min()) / 2 + size / 2
    if min(rows.min(), cols.min()) < 0 or max(rows.max(), cols.max()) >= size:
        raise FgvceError(f"digit {digit} at scale {scale:g} and slant {slant:g} does not fit a {size} px image")
    fine = size * SUPERSAMPLE
    seeds = np.ones((fine, fine), bool)
    seeds[np.floor(rows * SUPERSAMPLE).astype(int), np.floor(cols * SUPERSAMPLE).astype(int)] = False
    stroke = distance_transform_edt(seeds) <= thickness / 2 * SUPERSAMPLE
    coverage = stroke.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    return np.rint(255.0 * intensity * coverage).astype(np.uint8)


def draw_factors(n: int, seed_key: tuple[int, ...], shortcut: bool) -> dict[str, np.ndarray]:
    """(n,) arrays ``label`` (int64, balanced) and ``FACTORS`` (float64) from Generator(seed_key).

    The draws are the same with and without the shortcut; the shortcut only sets sign(slant) to +1 for even
    and -1 for odd labels with probability ``SHORTCUT_P`` (else the opposite), keeping |slant|."""
    rng = np.random.default_rng(seed_key)
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    thickness = rng.uniform(*THICKNESS_RANGE, n)
    scale = rng.uniform(*SCALE_RANGE, n)
    slant = rng.uniform(-MAX_SLANT, MAX_SLANT, n)
    follows = rng.uniform(size=n) < SHORTCUT_P
    a, b, sd = INTENSITY
    intensity = np.clip(a + b * thickness + rng.normal(0.0, sd, n), 0.2, 1.0)
    if shortcut:
        parity_sign = np.where(labels % 2 == 0, 1.0, -1.0)
        slant = np.abs(slant) * np.where(follows, parity_sign, -parity_sign)
    return {"label": labels, "thickness": thickness, "slant": slant, "scale": scale, "intensity": intensity}


@functools.lru_cache(maxsize=None)
def generate(split: str, shortcut: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Split ``split``: uint8 images (N, 28, 28) and their factors (see :func:`draw_factors`), read-only.

    The shortcut is planted in the train split only."""
    f = draw_factors(SIZES[split], (SEED, SPLITS.index(split)), shortcut and split == "train")
    images = np.stack([render(int(d), t, s, k, v) for d, t, s, k, v
                       in zip(f["label"], f["thickness"], f["slant"], f["scale"], f["intensity"])])
    for array in (images, *f.values()):
        array.setflags(write=False)
    return images, f


@functools.lru_cache(maxsize=None)
def train_pixel_stats(shortcut: bool) -> tuple[float, float]:
    """(mean, std) of the train split's pixels in [0, 1], the normalisation of both splits."""
    train = generate("train", shortcut)[0] / 255.0
    return float(train.mean()), float(train.std())


def load(name: str, split: str, *, image_size: int | None = None) -> Dataset:
    """Split ``split`` of ``name`` (a key of ``NAMES``): (N,) labels 0..9, images (N, S, S, 3),
    S = ``image_size`` or 28; normalised by the train split's pixel mean and std (one for all channels);
    fingerprinted by a hash of each generated image."""
    require_split(split, SPLITS, name)
    shortcut = NAMES[name]
    images, f = generate(split, shortcut)
    mean, std = train_pixel_stats(shortcut)
    size = NATIVE_SIZE if image_size is None else int(image_size)
    return Dataset(
        name=name, split=split, ids=[f"{name}/{split}/{i}" for i in range(len(images))], labels=f["label"],
        class_names=[str(c) for c in range(10)], splits=SPLITS,
        read=lambda i: np.repeat(images[i][..., None], 3, axis=-1), stamp=lambda i: array_stamp(images[i]),
        preprocessing=Preprocessing(size, size, (mean,) * 3, (std,) * 3),
    )


def positions(ds: Dataset) -> np.ndarray:
    """(N,) int64 positions in the generated split of the images of ``ds`` (a morpho-digits split or subset)."""
    if ds.name not in NAMES:
        raise FgvceError(f"dataset {ds.name!r} is not morpho-digits; ground-truth factors exist only for "
                         f"{', '.join(NAMES)}")
    return np.asarray([int(i.rsplit("/", 1)[1]) for i in ds.ids], np.int64)


def factors(ds: Dataset) -> dict[str, np.ndarray]:
    """The true ``FACTORS`` of the images of ``ds``: dict of (N,) float64 arrays, in ``ds`` order."""
    idx = positions(ds)
    f = generate(ds.split, NAMES[ds.name])[1]
    return {k: f[k][idx] for k in FACTORS}


def morphometrics(ds: Dataset) -> np.ndarray:
    """(N, F) float64 measured morphometrics of the images of ``ds``, columns ``morphometrics.FEATURES``."""
    return morpho.measure_all(ds.read(i) for i in range(len(ds)))
