"""Mirror-CFE's metrics (SPEC 8, issue 12): validity, D.Val, L1, LPIPS and FD-classifier.

Images are in the classifier's normalised input space x = (u - mean) / std, u in [0, 1] RGB.

- validity: the share of counterfactuals the full classifier assigns to their target t.
- D.Val: validity after a Gaussian blur with sigma 1 (kernel truncated at 3 sigma, edges replicated). The
  blur is linear with weights summing to 1 and the normalisation is a per-channel affine map, so blurring in
  normalised space equals blurring in [0, 1] pixel space.
- L1: mean_{pixels, channels} |u_cf - u_src| in [0, 1] pixel units (our reading of the paper's scale).
- LPIPS: :func:`fgvce_jax.metrics.lpips.lpips_distance` on 2 u - 1, u clipped to [0, 1].
- FD-classifier: the Fréchet distance between Gaussians fitted to the classifier's pooled features
  mean_hw(f(x)) of real and of counterfactual images (not FID: no Inception network),

      FD = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}).
"""
from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from fgvce_jax.errors import FgvceError
from fgvce_jax.metrics.lpips import lpips_distance

BLUR_SIGMA = 1.0
_logits = jax.jit(lambda split_model, params, x: split_model.logits(params, x), static_argnums=0)
_pooled = jax.jit(lambda split_model, params, x: split_model.encode(params, x)[0].mean((1, 2)), static_argnums=0)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The 1-D Gaussian of ``sigma`` on -r..r, r = ceil(3 sigma), normalised to sum 1: (2r + 1,)."""
    r = int(np.ceil(3 * sigma))
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


@functools.partial(jax.jit, static_argnames="sigma")
def blur(images: jax.Array, sigma: float = BLUR_SIGMA) -> jax.Array:
    """Separable Gaussian blur, edges replicated: (N, H, W, 3) -> (N, H, W, 3)."""
    w = jnp.asarray(gaussian_kernel(sigma))
    r = len(w) // 2
    x = jnp.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    h, wd = images.shape[1:3]
    x = sum(w[i] * x[:, i:i + h] for i in range(len(w)))  # along H
    return sum(w[i] * x[:, :, i:i + wd] for i in range(len(w)))  # along W


def validity(split_model, params, images: jax.Array, t) -> float:
    """Share of images (N, S, S, 3) the full classifier assigns to their target t (N,)."""
    pred = np.asarray(_logits(split_model, params, jnp.asarray(images))).argmax(-1)
    return float(np.mean(pred == np.asarray(t)))


def d_val(split_model, params, images: jax.Array, t, sigma: float = BLUR_SIGMA) -> float:
    """Validity after a Gaussian blur of ``sigma`` (D.Val)."""
    return validity(split_model, params, blur(jnp.asarray(images), sigma), t)


def to_unit(images, mean, std) -> np.ndarray:
    """Normalised images (..., 3) -> [0, 1] RGB (clipped)."""
    return np.clip(np.asarray(images) * np.asarray(std, np.float32) + np.asarray(mean, np.float32), 0, 1)


def to_pixels(images, mean, std) -> np.ndarray:
    """Normalised images (..., 3) -> uint8 [0, 255] RGB (clipped, rounded)."""
    return np.round(to_unit(images, mean, std) * 255).astype(np.uint8)


def l1(cf, src, mean, std) -> np.ndarray:
    """Per image mean |u_cf - u_src| in [0, 1] pixel units: (N, S, S, 3) x2 -> (N,)."""
    return np.abs(to_unit(cf, mean, std) - to_unit(src, mean, std)).mean((1, 2, 3))


def lpips(cf, src, mean, std) -> np.ndarray:
    """Per image LPIPS-AlexNet between counterfactual and source: (N, S, S, 3) x2 -> (N,)."""
    return np.asarray(lpips_distance(2 * to_unit(cf, mean, std) - 1, 2 * to_unit(src, mean, std) - 1))


def sqrtm_psd_product(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """(A B)^{1/2} of two covariance matrices (D, D), float64. If scipy's result is not finite, eps is added to
    both diagonals (a nearly singular product); an imaginary part above 1e-3 of the largest entry is an error,
    a smaller one (rounding) is dropped."""
    root = scipy.linalg.sqrtm(a @ b)
    if not np.isfinite(root).all():
        offset = eps * np.eye(len(a))
        root = scipy.linalg.sqrtm((a + offset) @ (b + offset))
    if np.iscomplexobj(root):
        if np.abs(root.imag).max() > 1e-3 * max(np.abs(root.real).max(), 1e-12):
            raise FgvceError(f"the covariance square root has an imaginary part of {np.abs(root.imag).max():.3g}; "
                             "too few images for the feature dimension?")
        root = root.real
    return root


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) of two Gaussians: means (D,), covariances (D, D)."""
    mu1, mu2, cov1, cov2 = (np.asarray(a, np.float64) for a in (mu1, mu2, cov1, cov2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(sqrtm_psd_product(cov1, cov2)))


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), unbiased covariance (D, D)) of features (N, D), N >= 2, in float64."""
    f = np.asarray(features, np.float64)
    if len(f) < 2:
        raise FgvceError(f"a Fréchet distance needs at least 2 images per set, got {len(f)}")
    return f.mean(0), np.cov(f, rowvar=False)


def pooled_features(split_model, params, images) -> np.ndarray:
    """The classifier's pooled features mean_hw(f(x)) at its split: (N, S, S, 3) -> (N, D)."""
    return np.asarray(_pooled(split_model, params, jnp.asarray(images)))


def fd_classifier(split_model, params, real, counterfactual) -> float:
    """FD-classifier: the Fréchet distance of the pooled-feature Gaussians of real and counterfactual images.
    With no more images in a set than feature dimensions its covariance is singular and the distance is
    unreliable: a one-line notice on stderr says so."""
    a, b = pooled_features(split_model, params, real), pooled_features(split_model, params, counterfactual)
    if min(len(a), len(b)) <= a.shape[1]:
        print(f"notice: FD-classifier from {len(a)} real and {len(b)} counterfactual images in {a.shape[1]} feature "
              "dimensions: a covariance is singular, so the distance is unreliable (use more images than dimensions)",
              file=sys.stderr)
    return frechet_distance(*gaussian_fit(a), *gaussian_fit(b))
