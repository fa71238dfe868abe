"""Morphometrics: human-readable context features measured from a greyscale stroke image.

Our implementation of the definitions of Morpho-MNIST (Castro et al., 2019, "Morpho-MNIST: Quantitative
Assessment and Diagnostics for Representation Learning"), in numpy and scikit-image. Pipeline for an
(H, W) image x with values in [0, 1] (uint8 is read as x / 255):

1. Upsample by ``SCALE`` = 4 (bilinear), for sub-pixel precision as in Morpho-MNIST; X is (4H, 4W).
2. Binarise: B = X >= min X + ``THRESHOLD`` (max X - min X), ``THRESHOLD`` = 0.5 (half-way between the
   darkest and brightest value, Morpho-MNIST's relative threshold).
3. Skeletonise B by thinning (scikit-image's ``skeletonize``; Morpho-MNIST uses the medial axis, which is
   25x slower here and grows spurs into corners: our choice) and take the Euclidean distance transform d of
   B (the distance of every stroke pixel to the nearest background pixel centre).

Features (lengths in pixels of the input image; c = column, r = row, rows pointing down):

- ``thickness`` = 2 mean_{p in skeleton} d(p) / 4, Morpho-MNIST's "mean thickness along the skeleton". A
  stroke of width w measures w, a disc of radius r measures 2r (its skeleton is its centre), both to within
  the resolution 1/4 px of the upsampled grid.
- ``slant`` = atan(-mu11 / mu02), in radians, from the central moments of the mass m = x - min x
  (mu11 = sum m (c - c̄)(r - r̄), mu02 = sum m (r - r̄)^2 over columns c and rows r, normalised by sum m;
  Morpho-MNIST weights by x itself: subtracting the background level is our choice, so that a uniform
  background does not pull the moments); Morpho-MNIST's convention: positive when the top of the stroke
  leans to the right. Shearing an upright shape (mu11 = 0) by c' = c - tan(theta) (r - r̄) gives exactly
  theta. A stroke one row tall (mu02 = 0) has slant 0.
- ``width`` and ``height``: the extent of the stroke's mass in the de-slanted frame
  u = c - (mu11 / mu02)(r - r̄), v = r: the distance between the 1% and 99% quantiles of u (width) and of
  v (height), weighted by m, which drops 2% of the mass per axis as Morpho-MNIST's bounding parallelogram
  does; measured on the input image (not upsampled), with each pixel's mass spread uniformly
  over its width (our choice), so a solid bar of length L measures 0.98 L.
- ``area`` = |B| / 16, the pixel count of the binarised stroke, in input pixels.
- ``intensity`` = mean of X over B, the mean grey level of the stroke (our addition to Morpho-MNIST's set).
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt
from skimage.morphology import skeletonize
from skimage.transform import resize

from fgvce_jax.errors import FgvceError

FEATURES = ("thickness", "slant", "width", "height", "area", "intensity")
SCALE = 4
THRESHOLD = 0.5
MASS_TAIL = 0.01  # mass dropped at each end of an axis for width and height


def as_grey(image) -> np.ndarray:
    """(H, W) float64 from an (H, W) or (H, W, C) image: channels averaged, uint8 divided by 255."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise FgvceError(f"morphometrics need an (H, W) or (H, W, C) image, got shape {image.shape}")
    grey = image.astype(np.float64) / (255.0 if image.dtype == np.uint8 else 1.0)
    grey = grey.mean(axis=-1) if grey.ndim == 3 else grey
    if grey.max() <= grey.min():
        raise FgvceError("morphometrics need an image with a stroke; this one is constant")
    return grey


def upsample(grey: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """(H, W) -> (scale H, scale W), bilinear with pixel centres aligned (no smoothing)."""
    h, w = grey.shape
    return resize(grey, (scale * h, scale * w), order=1, mode="edge", anti_aliasing=False)


def binarise(hires: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Bool mask of the stroke: ``hires >= min + threshold (max - min)``."""
    low, high = float(hires.min()), float(hires.max())
    return hires >= low + threshold * (high - low)


def mean_thickness(mask: np.ndarray, scale: int = SCALE) -> float:
    """2 mean_{p in skeleton(mask)} d(p) / scale, d the Euclidean distance to the nearest background pixel."""
    skeleton = skeletonize(mask)
    distance = distance_transform_edt(mask)
    return float(2.0 * distance[skeleton].mean() / scale)


def row_moments(weights: np.ndarray) -> tuple[float, float, float]:
    """(r̄, mu11, mu02) of a non-negative (H, W) weight image over columns c and rows r, normalised by its
    total mass: r̄ = sum w r / sum w, mu11 = sum w (c - c̄)(r - r̄) / sum w, mu02 = sum w (r - r̄)^2 / sum w."""
    r, c = np.indices(weights.shape, dtype=np.float64)
    mass = weights.sum()
    rc, cc = (weights * r).sum() / mass, (weights * c).sum() / mass
    mu11 = (weights * (c - cc) * (r - rc)).sum() / mass
    mu02 = (weights * (r - rc) ** 2).sum() / mass
    return float(rc), float(mu11), float(mu02)


def horizontal_shear(mu11: float, mu02: float) -> float:
    """mu11 / mu02, the shear that de-slants the stroke; 0 for a stroke one row tall (mu02 = 0)."""
    return mu11 / mu02 if mu02 > 0 else 0.0


def mass_extent(coords: np.ndarray, weights: np.ndarray, tail: float = MASS_TAIL) -> float:
    """Distance between the ``tail`` and ``1 - tail`` weighted quantiles of ``coords`` (both flat arrays).

    Each pixel's mass w_k is spread uniformly over [c_k - 1/2, c_k + 1/2], so the cumulative mass is
    F(t) = (R(t) - R(t - 1)) / sum w with R(t) = sum_k w_k max(t - c_k + 1/2, 0), piecewise linear with
    breakpoints at c_k +- 1/2; the quantiles are read off F at those breakpoints by linear interpolation.
    """
    keep = weights > 0
    starts, w = coords[keep] - 0.5, weights[keep]
    order = np.argsort(starts, kind="stable")
    starts, w = starts[order], w[order]
    cum_w = np.concatenate([[0.0], np.cumsum(w)])
    cum_ws = np.concatenate([[0.0], np.cumsum(w * starts)])

    def ramp_sum(t):
        k = np.searchsorted(starts, t, side="right")
        return t * cum_w[k] - cum_ws[k]

    breaks = np.unique(np.concatenate([starts, starts + 1.0]))
    cdf = (ramp_sum(breaks) - ramp_sum(breaks - 1.0)) / cum_w[-1]
    low, high = np.interp([tail, 1.0 - tail], cdf, breaks)
    return float(high - low)


def measure(image) -> dict[str, float]:
    """The morphometrics of one (H, W) or (H, W, C) stroke image, a dict keyed by ``FEATURES``."""
    grey = as_grey(image)
    hires = upsample(grey)
    mask = binarise(hires)
    mass = grey - grey.min()
    r_mid, mu11, mu02 = row_moments(mass)
    shear = horizontal_shear(mu11, mu02)
    r, c = np.indices(grey.shape, dtype=np.float64)
    u = c - shear * (r - r_mid)
    return {
        "thickness": mean_thickness(mask),
        "slant": float(np.arctan(-shear)),
        "width": mass_extent(u.ravel(), mass.ravel()),
        "height": mass_extent(r.ravel(), mass.ravel()),
        "area": float(mask.sum()) / SCALE**2,
        "intensity": float(hires[mask].mean()),
    }


def measure_all(images) -> np.ndarray:
    """(N, F) float64 morphometrics of N images (N, H, W) or (N, H, W, C); columns in ``FEATURES`` order."""
    rows = [measure(image) for image in images]
    return np.asarray([[row[f] for f in FEATURES] for row in rows], np.float64).reshape(len(rows), len(FEATURES))
