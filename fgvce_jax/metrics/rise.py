"""Deletion and insertion curves (Petsiuk et al., RISE, BMVC 2018; SPEC section 6).

A saliency map ``s`` of shape (H, W) is upsampled bilinearly to the image size
(S, S) and its N = S*S pixels are ranked from most to least salient (ties keep
raster order). With ``steps`` = n, step i in 0..n acts on the top
k_i = floor(i * N / n) pixels:

- deletion: those pixels of the image are set to 0 in the model's normalised
  input space (the "normalised zero image": after ``Normalize(mean, std)`` a
  0 is the dataset-mean colour);
- insertion: start from a blurred copy of the image and put those pixels back.
  The blur is the RISE code's (``evaluation.py``: ``gkern(11, 5)``, a conv2d
  with zero padding 5): its 11 x 11 kernel is SciPy's ``gaussian_filter`` (sigma
  5, truncate 4, mode ``reflect``) applied to a centred delta, so the Gaussian's
  tails beyond the window are folded back into it (1-D weights 0.088-0.094, not
  a sampled Gaussian's 0.066-0.109); see :func:`rise_kernel1d`.

The curve is y_i = p_c(image_i), the probability of the explained class c.
Its area is the trapezoid on x_i = i / n in [0, 1]:

    AUC = (1/n) * (sum_i y_i - (y_0 + y_n) / 2)

A good saliency map gives a low deletion AUC and a high insertion AUC;
Del-Ins = insertion AUC - deletion AUC (higher is better).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fgvce_jax.errors import FgvceError

MODES = ("deletion", "insertion")
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0


class RiseCurves(NamedTuple):
    """Deletion and insertion curves for a batch of images.

    deletion, insertion: (B, steps + 1) float32, probability of the explained
    class after each step. ``deletion_auc``, ``insertion_auc``: (B,).
    """

    deletion: np.ndarray
    insertion: np.ndarray

    @property
    def deletion_auc(self) -> np.ndarray:
        return np.asarray(auc(self.deletion))

    @property
    def insertion_auc(self) -> np.ndarray:
        return np.asarray(auc(self.insertion))

    @property
    def del_ins(self) -> np.ndarray:
        """(B,) insertion AUC - deletion AUC."""
        return self.insertion_auc - self.deletion_auc


def auc(curve: jax.Array) -> jax.Array:
    """Trapezoid area of ``curve`` (..., n + 1) sampled at x = 0, 1/n, ..., 1."""
    curve = jnp.asarray(curve, jnp.float32)
    n = curve.shape[-1] - 1
    if n < 1:
        raise FgvceError("a RISE curve needs at least 2 points (steps >= 1)")
    return (curve.sum(-1) - 0.5 * (curve[..., 0] + curve[..., -1])) / n


BLUR_TRUNCATE = 4.0  # SciPy's gaussian_filter default, which RISE's gkern uses


def rise_kernel1d(size: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA, truncate: float = BLUR_TRUNCATE) -> np.ndarray:
    """(size,) float64: the 1-D factor of RISE's ``gkern(size, sigma)`` (its 2-D kernel is the outer product).

    gkern filters a centred delta of length ``size`` with a sampled Gaussian of radius
    R = int(truncate sigma + 0.5), weights w_t proportional to exp(-t^2 / (2 sigma^2)), t = -R..R, summing to 1,
    in SciPy's ``reflect`` mode (x -> x mod 2 size, then mirrored: ... c b a | a b c ... | c b a ...):

        k_i = sum_t w_t [reflect(i + t) = size // 2]

    so every tap of the Gaussian lands inside the window and the weights sum to 1.
    """
    r = int(truncate * sigma + 0.5)
    t = np.arange(-r, r + 1)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    w /= w.sum()
    pos = np.mod(np.arange(size)[:, None] + t[None, :], 2 * size)  # (size, 2R + 1) input read by output i
    source = np.where(pos < size, pos, 2 * size - 1 - pos)
    return (w[None, :] * (source == size // 2)).sum(axis=1)


def blur(images: jax.Array, size: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> jax.Array:
    """RISE's blur of (B, S, S, C) images: separable, per channel, kernel :func:`rise_kernel1d`, zero padding
    ("same" size)."""
    k = jnp.asarray(rise_kernel1d(size, sigma), jnp.float32)
    c = images.shape[-1]
    dn = ("NHWC", "HWIO", "NHWC")
    kh = jnp.tile(k.reshape(size, 1, 1, 1), (1, 1, 1, c))
    kw = jnp.tile(k.reshape(1, size, 1, 1), (1, 1, 1, c))
    pad = size // 2
    out = jax.lax.conv_general_dilated(images, kh, (1, 1), [(pad, pad), (0, 0)],
                                       dimension_numbers=dn, feature_group_count=c,
                                       precision=jax.lax.Precision.HIGHEST)
    return jax.lax.conv_general_dilated(out, kw, (1, 1), [(0, 0), (pad, pad)],
                                        dimension_numbers=dn, feature_group_count=c,
                                        precision=jax.lax.Precision.HIGHEST)


def pixel_ranks(saliency: jax.Array, image_size: tuple[int, int]) -> jax.Array:
    """Rank of every pixel by upsampled saliency: (B, H, W) -> (B, S*S) int32.

    The map is resized bilinearly (half-pixel centres, as torch's
    ``interpolate(mode="bilinear", align_corners=False)``); rank 0 is the most
    salient pixel, ties are broken by raster order.
    """
    b = saliency.shape[0]
    up = jax.image.resize(saliency.astype(jnp.float32), (b, *image_size), "bilinear")
    order = jnp.argsort(-up.reshape(b, -1), axis=-1, stable=True)
    n = order.shape[-1]
    ranks = jnp.zeros_like(order).at[jnp.arange(b)[:, None], order].set(
        jnp.broadcast_to(jnp.arange(n, dtype=order.dtype), order.shape))
    return ranks


def step_counts(n_pixels: int, steps: int) -> np.ndarray:
    """(steps + 1,) pixels acted on after each step: k_i = floor(i * N / steps)."""
    return (np.arange(steps + 1, dtype=np.int64) * n_pixels) // steps


@functools.partial(jax.jit, static_argnames=("predict_fn", "mode", "steps", "chunk_size"))
def _curves(predict_fn, params, images, saliency, classes, *, mode, steps, chunk_size):
    b, s1, s2, _ = images.shape
    ranks = pixel_ranks(saliency, (s1, s2)).reshape(b, s1, s2, 1)
    # Deletion moves the top pixels from the image to 0; insertion moves them
    # from the blurred copy to the image. Either way: where(rank < k, end, begin).
    if mode == "deletion":
        begin, end = images, jnp.zeros_like(images)
    else:
        begin, end = blur(images), images
    counts = jnp.asarray(step_counts(s1 * s2, steps), jnp.int32)

    total = b * (steps + 1)
    n_chunks = -(-total // chunk_size)
    flat = jnp.arange(n_chunks * chunk_size, dtype=jnp.int32).reshape(n_chunks, chunk_size)

    def one_chunk(idx):
        idx = jnp.minimum(idx, total - 1)  # padding in the last chunk repeats a real item
        img, step = idx // (steps + 1), idx % (steps + 1)
        moved = ranks[img] < counts[step][:, None, None, None]
        batch = jnp.where(moved, end[img], begin[img])
        probs = predict_fn(batch) if params is None else predict_fn(params, batch)
        return jnp.take_along_axis(probs, classes[img][:, None], axis=1)[:, 0]

    out = jax.lax.map(one_chunk, flat).reshape(-1)[:total]
    return out.reshape(b, steps + 1)


def curve(predict_fn: Callable[..., jax.Array], images, saliency, classes, *, params=None,
          mode: str = "deletion", steps: int = 50, chunk_size: int = 64) -> np.ndarray:
    """One RISE curve per image.

    Args:
      predict_fn: jax-traceable ``images (B, S, S, 3) -> probs (B, C)`` on
        preprocessed (normalised) images, or ``(params, images) -> probs``
        when ``params`` is given. It is a static jit argument: pass the same
        function object each time (not a new lambda) to avoid recompiling.
      params: optional pytree of arrays handed to ``predict_fn`` as traced
        arguments (model weights), so they are not baked into the program.
      images: (B, S, S, 3) float32, preprocessed.
      saliency: (B, H, W) float, any resolution; upsampled to (S, S).
      classes: (B,) int, the explained class of each image.
      mode: ``"deletion"`` or ``"insertion"``.
      steps: n; the curve has n + 1 points at x = i / n.
      chunk_size: how many of the B * (n + 1) curve images go through
        ``predict_fn`` at once. Does not change the result.

    Returns:
      (B, steps + 1) float32: y_i = probs[class] after step i.
    """
    if mode not in MODES:
        raise FgvceError(f"unknown RISE mode {mode!r}; choose one of {', '.join(MODES)}")
    images = jnp.asarray(images, jnp.float32)
    saliency = jnp.asarray(saliency, jnp.float32)
    classes = jnp.asarray(classes, jnp.int32)
    if images.ndim != 4:
        raise FgvceError(f"images must be (B, S, S, C), got shape {tuple(images.shape)}")
    if saliency.ndim != 3 or saliency.shape[0] != images.shape[0]:
        raise FgvceError(f"saliency must be (B, H, W) with B = {images.shape[0]}, got {tuple(saliency.shape)}")
    if classes.shape != (images.shape[0],):
        raise FgvceError(f"classes must be ({images.shape[0]},), got {tuple(classes.shape)}")
    if steps < 1 or chunk_size < 1:
        raise FgvceError("steps and chunk_size must be at least 1")
    return np.asarray(_curves(predict_fn, params, images, saliency, classes,
                              mode=mode, steps=int(steps), chunk_size=int(chunk_size)))


def deletion_insertion(predict_fn, images, saliency, classes, *, params=None, steps: int = 50,
                       chunk_size: int = 64) -> RiseCurves:
    """Both curves for a batch: see :func:`curve`. Returns :class:`RiseCurves`."""
    kw = dict(params=params, steps=steps, chunk_size=chunk_size)
    return RiseCurves(curve(predict_fn, images, saliency, classes, mode="deletion", **kw),
                      curve(predict_fn, images, saliency, classes, mode="insertion", **kw))
