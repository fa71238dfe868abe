"""Adversarial training of the GLANCE-style generator: a small discriminator, the StyleGAN2 losses, one jitted step.

Written by us (issue 13; docs/glance_generator.md). Images seen by D are in [-1, 1], like G's output
(:func:`fgvce_jax.glance.generator.from_classifier_space` converts a dataset's inputs).

- Discriminator: residual, as StyleGAN2's: fromRGB (1x1), then per block
  ``(avgpool(conv3x3(conv3x3(x))) + conv1x1(avgpool(x))) / sqrt(2)`` while the side is even and > 4
  (32 -> 16 -> 8 -> 4; 28 -> 14 -> 7), then minibatch standard deviation, a 3x3 conv and two dense layers to
  one logit. Unconditional: G's agreement with the concepts comes from the caller's extra loss.
- Losses (non-saturating logistic): ``L_D = E softplus(D(G(c))) + E softplus(-D(x)) + gamma / 2 E ||grad_x D(x)||^2``
  (R1 on real images, every step), ``L_G = adv_weight * E softplus(-D(G(c))) + extra_loss(G(c), c, aux)``.
- Optimiser: optax Adam, lr 2e-3, betas (0, 0.99), eps 1e-8 for both networks (StyleGAN2's).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fgvce_jax.errors import FgvceError
from fgvce_jax.glance.generator import EqualizedLinear, Generator, GeneratorConfig, init_normal, lrelu

ExtraLoss = Callable[[jax.Array, jax.Array, object], jax.Array]


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """Sizes of D: input (N, image_size, image_size, image_channels); channels at side r
    ``min(channel_max, channel_base // r)``; minibatch-std over groups of ``mbstd_group`` (0: off)."""

    image_size: int = 32
    image_channels: int = 3
    channel_base: int = 2048
    channel_max: int = 128
    mbstd_group: int = 4

    def __post_init__(self):
        if self.image_size < 4 or self.image_channels < 1 or self.mbstd_group < 0:
            raise FgvceError(f"discriminator image_size must be >= 4, image_channels >= 1 and mbstd_group >= 0, "
                             f"got {self.image_size}, {self.image_channels}, {self.mbstd_group}")
        if self.channel_base < self.image_size:
            raise FgvceError(f"discriminator channel_base {self.channel_base} must be >= image_size {self.image_size}")

    @property
    def sides(self) -> tuple[int, ...]:
        """The side at the input of each residual block, then the side of the epilogue (32: 32, 16, 8, 4)."""
        sides = [self.image_size]
        while sides[-1] > 4 and sides[-1] % 2 == 0:
            sides.append(sides[-1] // 2)
        return tuple(sides)

    def channels(self, side: int) -> int:
        """Feature channels at side ``side``."""
        return min(self.channel_max, self.channel_base // side)


@dataclasses.dataclass(frozen=True)
class GanConfig:
    """Optimisation of G and D: Adam(lr, b1, b2, eps); R1 weight ``r1_gamma``; G's adversarial weight."""

    lr: float = 2e-3
    b1: float = 0.0
    b2: float = 0.99
    eps: float = 1e-8
    r1_gamma: float = 0.1
    adv_weight: float = 1.0


class EqualizedConv(nnx.Module):
    """k x k 'SAME' convolution with equalised learning rate: W stored N(0, 1), used as W / sqrt(Cin k k)."""

    def __init__(self, cin: int, cout: int, k: int, *, bias: bool = True, rngs: nnx.Rngs):
        self.weight = nnx.Param(init_normal(rngs, (k, k, cin, cout)))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32)) if bias else None
        self.gain = 1.0 / math.sqrt(cin * k * k)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (N, H, W, Cin) -> (N, H, W, Cout)."""
        y = jax.lax.conv_general_dilated(x, self.weight[...] * self.gain, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if self.bias is None else y + self.bias[...]


def avgpool2(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, H/2, W/2, C): means of 2x2 cells."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def minibatch_std(x: jax.Array, group: int) -> jax.Array:
    """x (N, H, W, C) -> (N, H, W, C + 1): append the mean over (H, W, C) of the standard deviation of each
    feature over a group of G = min(group, N) samples (sample n is in group n mod N/G)."""
    n = x.shape[0]
    g = min(group, n)
    if n % g:
        raise FgvceError(f"minibatch-std group {g} must divide the batch size {n}")
    y = x.reshape(g, n // g, *x.shape[1:])
    std = jnp.sqrt(jnp.var(y, axis=0) + 1e-8).mean(axis=(1, 2, 3))  # (N/G,)
    feature = jnp.broadcast_to(jnp.tile(std, g)[:, None, None, None], (*x.shape[:3], 1))
    return jnp.concatenate([x, feature.astype(x.dtype)], axis=-1)


class DiscriminatorBlock(nnx.Module):
    """``(avgpool(lrelu(conv(lrelu(conv(x))))) + conv1x1(avgpool(x))) / sqrt(2)``: side r -> r / 2."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.conv0 = EqualizedConv(cin, cin, 3, rngs=rngs)
        self.conv1 = EqualizedConv(cin, cout, 3, rngs=rngs)
        self.skip = EqualizedConv(cin, cout, 1, bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        main = avgpool2(lrelu(self.conv1(lrelu(self.conv0(x)))))
        return (main + self.skip(avgpool2(x))) / math.sqrt(2.0)


class Discriminator(nnx.Module):
    """D(x) -> logits (N,) for images x (N, S, S, C) in [-1, 1]; module docstring."""

    def __init__(self, config: DiscriminatorConfig, *, rngs: nnx.Rngs):
        self.config = config
        sides = config.sides
        self.from_rgb = EqualizedConv(config.image_channels, config.channels(sides[0]), 1, rngs=rngs)
        self.blocks = nnx.List([DiscriminatorBlock(config.channels(a), config.channels(b), rngs=rngs)
                                for a, b in zip(sides[:-1], sides[1:])])
        c, side = config.channels(sides[-1]), sides[-1]
        self.conv = EqualizedConv(c + (1 if config.mbstd_group else 0), c, 3, rngs=rngs)
        self.fc = EqualizedLinear(c * side * side, c, rngs=rngs)
        self.out = EqualizedLinear(c, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        if x.shape[1:] != (cfg.image_size, cfg.image_size, cfg.image_channels):
            raise FgvceError(f"discriminator images must have shape (N, {cfg.image_size}, {cfg.image_size}, "
                             f"{cfg.image_channels}), got {x.shape}")
        x = lrelu(self.from_rgb(x))
        for block in self.blocks:
            x = block(x)
        if cfg.mbstd_group:
            x = minibatch_std(x, cfg.mbstd_group)
        x = lrelu(self.conv(x))
        return self.out(lrelu(self.fc(x.reshape(x.shape[0], -1))))[:, 0]


def d_logistic_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """``E softplus(D(fake)) + E softplus(-D(real))`` = -E log sigmoid(D(real)) - E log(1 - sigmoid(D(fake)))."""
    return jnp.mean(jax.nn.softplus(fake_logits)) + jnp.mean(jax.nn.softplus(-real_logits))


def g_nonsaturating_loss(fake_logits: jax.Array) -> jax.Array:
    """``E softplus(-D(G(c)))`` = -E log sigmoid(D(G(c))), the non-saturating generator loss."""
    return jnp.mean(jax.nn.softplus(-fake_logits))


def r1_penalty(d_fn: Callable[[jax.Array], jax.Array], real: jax.Array, gamma: float) -> jax.Array:
    """R1: ``gamma / 2 * mean_n ||grad_{x_n} sum_m D(x)_m||^2`` over real images x (N, ...), by jax.grad.

    d_fn maps images (N, ...) to logits (N,); with minibatch-std the gradient of the sum includes the other
    samples' logits, as in StyleGAN2.
    """
    grads = jax.grad(lambda x: jnp.sum(d_fn(x)))(real)
    return 0.5 * gamma * jnp.mean(jnp.sum(jnp.square(grads).reshape(real.shape[0], -1), axis=1))


class GanState(NamedTuple):
    """The trainable state, a pytree: G's and D's nnx.Param states, their optax states and the step count."""

    g: nnx.State
    d: nnx.State
    g_opt: optax.OptState
    d_opt: optax.OptState
    step: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class GanSetup:
    """What stays fixed during training: the graph definitions of G and D, and the configurations."""

    g_graph: nnx.GraphDef
    d_graph: nnx.GraphDef
    config: GanConfig

    @property
    def optimizer(self) -> optax.GradientTransformation:
        """Adam(lr, b1, b2, eps) of :class:`GanConfig`, the same for G and D."""
        c = self.config
        return optax.adam(c.lr, b1=c.b1, b2=c.b2, eps=c.eps)


def init(g_config: GeneratorConfig, d_config: DiscriminatorConfig, config: GanConfig,
         key: jax.Array) -> tuple[GanSetup, GanState]:
    """A fresh G and D from ``key`` (typed): G's parameters from fold_in(key, 0), D's from fold_in(key, 1)."""
    if (g_config.out_size, g_config.image_channels) != (d_config.image_size, d_config.image_channels):
        raise FgvceError(f"generator images ({g_config.out_size} px, {g_config.image_channels} channels) do not "
                         f"match the discriminator's ({d_config.image_size} px, {d_config.image_channels} channels)")
    g_graph, g = nnx.split(Generator(g_config, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0))))
    d_graph, d = nnx.split(Discriminator(d_config, rngs=nnx.Rngs(params=jax.random.fold_in(key, 1))))
    setup = GanSetup(g_graph, d_graph, config)
    opt = setup.optimizer
    opt_init = jax.jit(opt.init)  # one compilation instead of one per parameter shape
    state = GanState(g, d, opt_init(g), opt_init(d), jnp.zeros((), jnp.int32))
    # committed to the default device, like gan_step's outputs: with uncommitted parameters the second step
    # compiles gan_step again (no new trace, so _cache_size() does not show it; 20-40 s at 28 px on a CPU)
    return setup, jax.device_put(state, jax.devices()[0])


def make_gan_step(setup: GanSetup, extra_loss: ExtraLoss | None = None):
    """The jitted ``gan_step(state, real_images, concepts, key, aux=None) -> (state, metrics)``.

    G renders one batch ``G(concepts, key)`` (forward once, kept for its backward pass); D takes one step
    on it and ``real_images``; then G takes one step against the updated D on the same images:
      real_images (N, S, S, C) in [-1, 1]; concepts (N, Kc); key: typed PRNG key of G's noise.
      extra_loss(images (N, S, S, C) in [-1, 1], concepts (N, Kc), aux) -> scalar, added to G's loss
      unweighted (e.g. the surrogate's latent-matching losses); None: no extra loss. ``aux`` is any pytree
      passed to ``gan_step`` (e.g. frozen weights): an argument, not a constant baked into the compilation,
      so one compiled step serves every ``aux`` of the same shapes.
    metrics: dict of scalars ``d_loss`` (logistic part), ``r1``, ``g_adv``, ``g_extra``, ``g_loss``,
    ``real_logit``, ``fake_logit`` (means).
    """
    cfg, opt = setup.config, setup.optimizer

    def generate(g_params, concepts, key):
        return nnx.merge(setup.g_graph, g_params)(concepts, key)

    def discriminate(d_params, images):
        return nnx.merge(setup.d_graph, d_params)(images)

    def d_loss_fn(d_params, fake, real):
        real_logits, fake_logits = discriminate(d_params, real), discriminate(d_params, fake)
        logistic = d_logistic_loss(real_logits, fake_logits)
        r1 = r1_penalty(lambda x: discriminate(d_params, x), real, cfg.r1_gamma)
        return logistic + r1, (logistic, r1, real_logits.mean(), fake_logits.mean())

    def g_image_loss(fake, d_params, concepts, aux):
        adv = g_nonsaturating_loss(discriminate(d_params, fake))
        extra = jnp.zeros(()) if extra_loss is None else extra_loss(fake, concepts, aux)
        return cfg.adv_weight * adv + extra, (adv, extra)

    @jax.jit
    def gan_step(state: GanState, real_images: jax.Array, concepts: jax.Array, key: jax.Array, aux=None):
        fake, g_vjp = jax.vjp(lambda g_params: generate(g_params, concepts, key), state.g)
        (_, (logistic, r1, real_logit, fake_logit)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
            state.d, fake, real_images)
        d_updates, d_opt = opt.update(d_grads, state.d_opt, state.d)
        d = optax.apply_updates(state.d, d_updates)
        (g_loss, (adv, extra)), fake_grads = jax.value_and_grad(g_image_loss, has_aux=True)(fake, d, concepts, aux)
        (g_grads,) = g_vjp(fake_grads)
        g_updates, g_opt = opt.update(g_grads, state.g_opt, state.g)
        g = optax.apply_updates(state.g, g_updates)
        metrics = dict(d_loss=logistic, r1=r1, g_adv=adv, g_extra=extra, g_loss=g_loss,
                       real_logit=real_logit, fake_logit=fake_logit)
        return GanState(g, d, g_opt, d_opt, state.step + 1), metrics

    return gan_step
