"""A compact StyleGAN2 generator in Flax NNX that renders a concept vector as an image (GLANCE-style, issue 13).

Written by us after Karras et al., "Analyzing and Improving the Image Quality of StyleGAN" (2020); not the
paper's model and not its code. Shapes are NHWC throughout.

- Mapping network: c (N, Kc) -> w (N, Dw). c is embedded by one linear layer, *not* normalised (c and 2c must
  render differently: an intervention c_j + delta moves the image); an optional noise z (N, Dz) ~ N(0, I),
  drawn from the key, is normalised to unit second moment, ``z / sqrt(mean(z^2) + eps)``, and concatenated.
  Then ``mapping_layers`` fully connected layers with leaky ReLU.
- Synthesis network: a learned constant (4, 4, C_4), then per resolution r = 8, 16, ..., R: bilinear 2x
  upsampling and two modulated 3x3 convolutions. Every layer gets the same w (no style mixing).
- Modulated convolution: styles s = A(w) (N, Cin) from an affine layer (bias 1), weights W (k, k, Cin, Cout),
  ``W'_n = W * s_n`` (over Cin) and, with demodulation,
  ``W''_n[..., o] = W'_n[..., o] / sqrt(sum_{k,k,Cin} W'_n[..., o]^2 + eps)``: unit norm per output channel.
- Noise: after each 3x3 convolution, ``y += strength * n``, n (N, H, W, 1) ~ N(0, 1) drawn from an explicit key,
  one learned scalar strength per layer (initialised at 0). Then bias and ``sqrt(2) * leaky_relu(., 0.2)``.
- Skip toRGB: at every resolution a modulated 1x1 convolution without demodulation gives an RGB image, added to
  the bilinearly upsampled sum of the lower ones.
- Equalised learning rate: weights are stored N(0, 1) / lr_mul and scaled at run time by lr_mul / sqrt(fan_in).

The output is in [-1, 1] (not clipped): :func:`to_classifier_space` maps it to a classifier's normalised input,
:func:`from_classifier_space` maps real inputs back. At image_size < resolution the centre is cropped
(32 -> 28 for digits).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fgvce_jax.errors import FgvceError

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)
EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Sizes of the generator.

    Attributes:
      concept_dim: Kc, the length of a concept vector c.
      z_dim: Dz, length of the noise z concatenated to c's embedding (0: none, G is a function of c and the
        per-layer noise alone).
      w_dim: Dw, the width of the mapping network and of w.
      mapping_layers: fully connected layers after the embedding.
      mapping_lr_mul: learning-rate multiplier of those layers (StyleGAN2: 0.01).
      resolution: R = 4 * 2^k, the synthesis resolution.
      image_size: S <= R with R - S even, the output side (centre crop); None: R.
      channel_base, channel_max: channels at resolution r are ``min(channel_max, channel_base // r)``.
      image_channels: channels of the output image.
    """

    concept_dim: int
    z_dim: int = 0
    w_dim: int = 128
    mapping_layers: int = 4
    mapping_lr_mul: float = 0.01
    resolution: int = 32
    image_size: int | None = None
    channel_base: int = 2048
    channel_max: int = 128
    image_channels: int = 3

    def __post_init__(self):
        check_resolution(self.resolution)
        size = self.out_size
        if not (0 < size <= self.resolution and (self.resolution - size) % 2 == 0):
            raise FgvceError(f"generator image_size {size} must be at most resolution {self.resolution} and "
                             f"differ from it by an even number of pixels (centre crop)")
        for name in ("concept_dim", "w_dim", "mapping_layers", "image_channels"):
            if getattr(self, name) < 1:
                raise FgvceError(f"generator {name} must be at least 1, got {getattr(self, name)}")
        if self.z_dim < 0 or min(self.channels(r) for r in self.resolutions) < 1:
            raise FgvceError(f"generator z_dim must be >= 0 and channel_base >= resolution, got z_dim "
                             f"{self.z_dim}, channel_base {self.channel_base}, resolution {self.resolution}")

    @property
    def out_size(self) -> int:
        """S, the side of the output images."""
        return self.resolution if self.image_size is None else int(self.image_size)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """(4, 8, ..., R)."""
        return tuple(4 * 2 ** k for k in range(int(math.log2(self.resolution // 4)) + 1))

    def channels(self, res: int) -> int:
        """Feature channels at resolution ``res``."""
        return min(self.channel_max, self.channel_base // res)


def check_resolution(resolution: int) -> None:
    """FgvceError unless ``resolution`` is 4 * 2^k for some k >= 0."""
    r = int(resolution)
    if r < 4 or r % 4 or (r // 4) & (r // 4 - 1):
        raise FgvceError(f"generator resolution must be 4 * 2^k (4, 8, 16, 32, ...), got {resolution}")


def lrelu(x: jax.Array) -> jax.Array:
    """``sqrt(2) * leaky_relu(x, 0.2)``: the leaky ReLU with the gain that keeps unit variance."""
    return LRELU_GAIN * jax.nn.leaky_relu(x, LRELU_SLOPE)


def normalize_2nd_moment(x: jax.Array) -> jax.Array:
    """x (N, D) -> ``x / sqrt(mean_d x^2 + eps)``: each row with unit second moment."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + EPS)


def demodulate(weight: jax.Array, styles: jax.Array) -> jax.Array:
    """Per-sample modulated and demodulated weights.

    Args:
      weight: W (k, k, Cin, Cout).
      styles: s (N, Cin).
    Returns:
      W'' (N, k, k, Cin, Cout): ``W' = W * s_n`` over Cin, then ``W'' = W' / sqrt(sum_{k,k,Cin} W'^2 + eps)``.
    """
    modulated = weight[None] * styles[:, None, None, :, None]
    return modulated * jax.lax.rsqrt(jnp.sum(jnp.square(modulated), axis=(1, 2, 3), keepdims=True) + EPS)


def modulated_conv(x: jax.Array, weight: jax.Array, styles: jax.Array, *, demod: bool) -> jax.Array:
    """The convolution of sample n of x with its own modulated (and demodulated) weights, 'SAME' padding.

    Computed without per-sample kernels: ``conv(x * s_n, W) * d_n`` with
    ``d_n[o] = 1 / sqrt(sum_i s_n[i]^2 sum_{k,k} W[..., i, o]^2 + eps)`` equals ``conv(x_n, W''_n)`` of
    :func:`demodulate` (d_n = 1 without demodulation).

    Args:
      x: (N, H, W, Cin); weight: (k, k, Cin, Cout); styles: (N, Cin).
    Returns:
      (N, H, W, Cout).
    """
    y = jax.lax.conv_general_dilated(x * styles[:, None, None, :], weight, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if not demod:
        return y
    d = jax.lax.rsqrt(jnp.square(styles) @ jnp.sum(jnp.square(weight), axis=(0, 1)) + EPS)  # (N, Cout)
    return y * d[:, None, None, :]


def _upsample_axis(x: jax.Array, axis: int) -> jax.Array:
    """Double ``axis``: out[2i] = (3 x[i] + x[i-1]) / 4, out[2i+1] = (3 x[i] + x[i+1]) / 4, edges repeated."""
    n = x.shape[axis]
    edge = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis), x,
                            jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
    prev, nxt = (jax.lax.slice_in_dim(edge, a, a + n, axis=axis) for a in (0, 2))
    pair = jnp.stack([0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt], axis=axis + 1)
    return pair.reshape(*x.shape[:axis], 2 * n, *x.shape[axis + 1:])


def upsample2x(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, 2H, 2W, C), bilinear with half-pixel centres: StyleGAN2's [1, 3, 3, 1] / 4 filter,
    edges repeated; equal to ``jax.image.resize(x, (N, 2H, 2W, C), "linear")`` in a few cheap ops."""
    return _upsample_axis(_upsample_axis(x, 1), 2)


def centre_crop(x: jax.Array, size: int) -> jax.Array:
    """(N, H, W, C) -> (N, size, size, C), the centre."""
    top, left = (x.shape[1] - size) // 2, (x.shape[2] - size) // 2
    return x[:, top:top + size, left:left + size]


def to_classifier_space(images: jax.Array, mean, std) -> jax.Array:
    """G's images in [-1, 1] -> the classifier's input ``((y + 1) / 2 - mean) / std`` (per channel)."""
    return ((images + 1.0) / 2.0 - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)


def from_classifier_space(x: jax.Array, mean, std) -> jax.Array:
    """The inverse of :func:`to_classifier_space`: normalised inputs (``Dataset.images``) -> [-1, 1]."""
    return (x * jnp.asarray(std, x.dtype) + jnp.asarray(mean, x.dtype)) * 2.0 - 1.0


def noise_shapes(n: int, config: GeneratorConfig) -> list[tuple[int, int, int, int]]:
    """(N, r, r, 1) for each 3x3 layer of the synthesis network, in order (r = 4 once, then r = 8, ... twice)."""
    return [(n, r, r, 1) for r in config.resolutions for _ in range(1 if r == 4 else 2)]


def noise_inputs(key: jax.Array, n: int, config: GeneratorConfig) -> list[jax.Array]:
    """The per-layer noise images of :func:`noise_shapes`, N(0, 1), cut in order from one (N, sum r^2) draw
    from ``key`` (one draw: one threefry to compile instead of one per layer)."""
    shapes = noise_shapes(n, config)
    ends = list(itertools.accumulate((s[1] * s[2] for s in shapes), initial=0))
    flat = jax.random.normal(key, (n, ends[-1]))
    return [flat[:, a:b].reshape(s) for s, a, b in zip(shapes, ends[:-1], ends[1:])]


def init_normal(rngs: nnx.Rngs, shape: tuple[int, ...]) -> jax.Array:
    """An initial weight: N(0, 1) float32 of ``shape``, drawn by numpy's PCG64 seeded with the data of the
    typed key ``rngs.params()``. Deterministic in the key like ``jax.random.normal``, but it compiles nothing:
    on CPU XLA spends about 0.3 s compiling a threefry draw for each new shape, 7 s for a small generator."""
    seed = np.asarray(jax.random.key_data(rngs.params())).reshape(-1).tolist()
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


class EqualizedLinear(nnx.Module):
    """``y = x @ (W * lr_mul / sqrt(Din)) + b * lr_mul``; W stored N(0, 1) / lr_mul, b stored bias_init / lr_mul."""

    def __init__(self, din: int, dout: int, *, bias_init: float = 0.0, lr_mul: float = 1.0, rngs: nnx.Rngs):
        self.weight = nnx.Param(init_normal(rngs, (din, dout)) / lr_mul)
        self.bias = nnx.Param(jnp.full((dout,), bias_init / lr_mul, jnp.float32))
        self.lr_mul, self.gain = lr_mul, lr_mul / math.sqrt(din)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (N, Din) -> (N, Dout)."""
        return x @ (self.weight[...] * self.gain) + self.bias[...] * self.lr_mul


class MappingNetwork(nnx.Module):
    """c (N, Kc) [, z (N, Dz)] -> w (N, Dw): embed c, concatenate the normalised z, then MLP with leaky ReLU."""

    def __init__(self, config: GeneratorConfig, *, rngs: nnx.Rngs):
        self.embed = EqualizedLinear(config.concept_dim, config.w_dim, rngs=rngs)
        dims = [config.w_dim + config.z_dim] + [config.w_dim] * config.mapping_layers
        self.layers = nnx.List([EqualizedLinear(a, b, lr_mul=config.mapping_lr_mul, rngs=rngs)
                                for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, concepts: jax.Array, z: jax.Array | None) -> jax.Array:
        x = self.embed(concepts)
        if z is not None:
            x = jnp.concatenate([x, normalize_2nd_moment(z)], axis=-1)
        for layer in self.layers:
            x = lrelu(layer(x))
        return x


class ModulatedConv(nnx.Module):
    """One modulated k x k convolution: styles from w, optional demodulation, noise, bias and activation.

    Synthesis layers (3x3): demodulated, noise, ``lrelu``. toRGB (1x1): not demodulated, no noise, linear.
    """

    def __init__(self, w_dim: int, cin: int, cout: int, k: int, *, synthesis: bool, rngs: nnx.Rngs):
        self.affine = EqualizedLinear(w_dim, cin, bias_init=1.0, rngs=rngs)
        self.weight = nnx.Param(init_normal(rngs, (k, k, cin, cout)))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.noise_strength = nnx.Param(jnp.zeros(())) if synthesis else None
        self.synthesis, self.gain = synthesis, 1.0 / math.sqrt(cin * k * k)

    def __call__(self, x: jax.Array, w: jax.Array, noise: jax.Array | None = None) -> jax.Array:
        """x (N, H, W, Cin), w (N, Dw), noise (N, H, W, 1) (synthesis layers) -> (N, H, W, Cout)."""
        y = modulated_conv(x, self.weight[...] * self.gain, self.affine(w), demod=self.synthesis)
        if not self.synthesis:
            return y + self.bias[...]
        return lrelu(y + self.noise_strength[...] * noise + self.bias[...])


class SynthesisBlock(nnx.Module):
    """Resolution r: [upsample, 3x3 conv] (r > 4), 3x3 conv, toRGB. Two noise layers (one at r = 4)."""

    def __init__(self, w_dim: int, cin: int, cout: int, image_channels: int, *, first: bool, rngs: nnx.Rngs):
        self.first = first
        self.convs = nnx.List([ModulatedConv(w_dim, c, cout, 3, synthesis=True, rngs=rngs)
                               for c in ([cin] if first else [cin, cout])])
        self.to_rgb = ModulatedConv(w_dim, cout, image_channels, 1, synthesis=False, rngs=rngs)

    def __call__(self, x, img, w, noises):
        """x (N, r', r', Cin), img (N, r', r', 3) or None, w (N, Dw), noises: one (N, r, r, 1) per conv
        -> x (N, r, r, Cout), img (N, r, r, 3)."""
        if not self.first:
            x, img = upsample2x(x), upsample2x(img)
        for conv, noise in zip(self.convs, noises):
            x = conv(x, w, noise)
        rgb = self.to_rgb(x, w)
        return x, rgb if img is None else img + rgb


class Generator(nnx.Module):
    """G(c, key) -> images (N, S, S, image_channels) in [-1, 1] (not clipped); module docstring."""

    def __init__(self, config: GeneratorConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.mapping = MappingNetwork(config, rngs=rngs)
        res = config.resolutions
        self.const = nnx.Param(init_normal(rngs, (4, 4, config.channels(4))))
        self.blocks = nnx.List([
            SynthesisBlock(config.w_dim, config.channels(r // 2 if i else r), config.channels(r),
                           config.image_channels, first=i == 0, rngs=rngs)
            for i, r in enumerate(res)])

    def __call__(self, concepts: jax.Array, key: jax.Array) -> jax.Array:
        """concepts (N, Kc), key: a typed PRNG key for z and every noise input -> (N, S, S, image_channels).

        z = normal(fold_in(key, 0)); the noise inputs are :func:`noise_inputs` (fold_in(key, 1)).
        """
        cfg = self.config
        if concepts.ndim != 2 or concepts.shape[1] != cfg.concept_dim:
            raise FgvceError(f"generator concepts must have shape (N, {cfg.concept_dim}), got {concepts.shape}")
        n = concepts.shape[0]
        z = jax.random.normal(jax.random.fold_in(key, 0), (n, cfg.z_dim)) if cfg.z_dim else None
        w = self.mapping(concepts, z)
        const = self.const[...]
        x = jnp.broadcast_to(const, (n, *const.shape))
        noises = iter(noise_inputs(jax.random.fold_in(key, 1), n, cfg))
        img = None
        for block in self.blocks:
            x, img = block(x, img, w, [next(noises) for _ in block.convs])
        return centre_crop(img, cfg.out_size) if cfg.out_size < cfg.resolution else img


@partial(jax.jit, static_argnums=0)
def render(graphdef: nnx.GraphDef, params: nnx.State, concepts: jax.Array, key: jax.Array) -> jax.Array:
    """Jitted ``G(concepts, key)`` of the generator ``nnx.merge(graphdef, params)``: (N, S, S, C) in [-1, 1].

    Compiled once per (graphdef, shapes): new concepts or weights of the same shapes reuse the compilation.
    """
    return nnx.merge(graphdef, params)(concepts, key)


def count_params(module_or_state) -> int:
    """Number of scalars in the nnx.Param variables of a module (or in a state)."""
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, nnx.Param)
    return int(sum(x.size for x in jax.tree.leaves(state)))
