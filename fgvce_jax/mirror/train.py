"""Training Mirror-CFE's decoder G with the classifier frozen (SPEC 8, issue 12), resumable.

Per training image x (normalised, (S, S, 3)) with features Z_s = f(x) at ``layer4`` and source skips: s is the
classifier's prediction, t a uniformly drawn other class, k drawn from the grid
:data:`~fgvce_jax.mirror.geometry.DEFAULT_KS` (with probability ``far_share`` from its points k >= 0.5, the
counterfactual half, else from all of it). The path end Z_1 is the reflection of Z_s across the s/t mirror
moved to the swapped logits by the closed form (``geometry.least_norm``, equal to the L-BFGS refinement the
explanations use), and Z_k = Z_s + k (Z_1 - Z_s). With x_k = G(Z_k), x_0 = G(Z_s), x_1 = G(Z_1), F = g o f
the full classifier and D the PatchGAN discriminator (logits per patch), the decoder minimises

    L_G = w_cls KL(softmax(g(Z_k)) || softmax(F(x_k)))         classification
        + w_rec mean|x - x_0|                                   reconstruction, k = 0
        + w_feat mean (Z_k - f(x_k))^2                          feature (mean squared; our reading)
        + w_adv mean softplus(-D(x_k))                          adversarial, non-saturating (our reading)
        + w_tri L_tri                                           triangulation

The KL runs from the path's logits to the decoded image's: its gradient in F's logits is
softmax(F(x_k)) - softmax(g(Z_k)), which does not vanish while F is confidently still s (the other direction,
sum p_F log(p_F / p_g), has a gradient proportional to p_F and stalls there).

    L_tri = sum over the sides (a, b) of (0, k), (k, 1), (0, 1) of (d(x_a, x_b) - lambda d(Z_a, Z_b))^2
            / (lambda d(Z_0, Z_1))^2

with d the root-mean-square distance (pixels or features) and lambda = mean d(x_i, x_j) / mean d(Z_i, Z_j)
over neighbouring pairs of the batch's real images (:func:`pair_scale`; no gradient reaches it). L_tri = 0
exactly when the triangle of decoded images (x_0, x_k, x_1) has the triangle of features (Z_0, Z_k, Z_1)'s
side lengths scaled by the one constant the data give (our reading of "triangulation"). The global lambda
is the point: with a per-path constant, a decoder that copies the source at every k (all image distances 0)
would have zero triangulation loss. The discriminator minimises mean softplus(-D(x)) + mean
softplus(D(sg(x_k))). Both use Adam with b1 = 0.5 (the usual GAN setting; our reading).

Step i uses the batch ``epoch_batches(n, B, seed, i // steps_per_epoch)[i % steps_per_epoch]`` and the key
``fold_in(key(seed), i)``, so a killed run restored from its orbax checkpoint (``OUT/decoder_state``) ends
with the same weights as an uninterrupted one. The final decoder goes to ``OUT/decoder`` with
``OUT/decoder.json``: its configuration and the fingerprint of the classifier weights it was trained for.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from fgvce_jax import progress
from fgvce_jax.errors import FgvceError
from fgvce_jax.mirror import decoder as dec
from fgvce_jax.mirror import geometry as geo
from fgvce_jax.store import fingerprint
from fgvce_jax.train import epoch_batches, image_reader, json_meta

STATE_DIR = "decoder_state"
DECODER_DIR = "decoder"
INFO_FILE = "decoder.json"


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights (our reading: the paper's are not primary; these are the ones that flipped the digits'
    decoder, docs/mirror.md), the triangulation ablation switch, Adam's rate (the paper's 2e-4) and the share
    of k draws from the counterfactual half k >= 0.5 of the grid."""

    w_cls: float = 10.0
    w_rec: float = 10.0
    w_feat: float = 10.0
    w_adv: float = 0.05
    w_tri: float = 5.0
    triangulation: bool = True
    lr: float = 2e-4
    far_share: float = 0.5


@dataclasses.dataclass(frozen=True)
class DecoderTrainConfig:
    """Everything that determines a decoder training run (stored with its checkpoints)."""

    steps: int = 300
    batch_size: int = 32
    seed: int = 0
    decoder: dec.DecoderConfig = dec.DecoderConfig()
    loss: LossConfig = LossConfig()
    save_every: int = 50

    def validate(self) -> None:
        for field in ("steps", "batch_size", "save_every"):
            if getattr(self, field) < 1:
                raise FgvceError(f"--{field.replace('_', '-')} must be >= 1, got {getattr(self, field)}")
        if not self.loss.lr > 0:
            raise FgvceError(f"--lr must be > 0, got {self.loss.lr}")
        self.decoder.validate()


class Discriminator(nnx.Module):
    """PatchGAN: images (N, S, S, 3) -> logits (N, S/4, S/4) of "real", one per overlapping patch."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(3, width, (4, 4), strides=2, rngs=rngs)
        self.c2 = nnx.Conv(width, 2 * width, (4, 4), strides=2, rngs=rngs)
        self.c3 = nnx.Conv(2 * width, 1, (3, 3), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.leaky_relu(self.c1(x), 0.2)
        return self.c3(nnx.leaky_relu(self.c2(h), 0.2))[..., 0]


@functools.cache
def adam(lr: float) -> optax.GradientTransformation:
    """Adam(lr, b1 = 0.5, b2 = 0.999), cached so that runs of one configuration share the compiled step."""
    return optax.adam(lr, b1=0.5, b2=0.999)


def rms(a: jax.Array, b: jax.Array) -> jax.Array:
    """Root-mean-square distance per image: a, b (N, ...) -> (N,)."""
    return jnp.sqrt(jnp.mean(jnp.square(a - b).reshape(a.shape[0], -1), -1) + 1e-12)


def pair_scale(x: jax.Array, z: jax.Array) -> jax.Array:
    """lambda = mean_i d(x_i, x_{i+1}) / mean_i d(Z_i, Z_{i+1}) over the batch's neighbouring pairs (cyclic):
    how far real images lie apart in pixels per unit of feature distance. x (N, S, S, 3), z (N, H, W, D) -> ()."""
    return jnp.mean(rms(x, jnp.roll(x, 1, 0))) / jnp.mean(rms(z, jnp.roll(z, 1, 0)))


def triangulation(x0: jax.Array, xk: jax.Array, x1: jax.Array, z0: jax.Array, zk: jax.Array, z1: jax.Array,
                  lam: jax.Array) -> jax.Array:
    """L_tri of the module docstring, averaged over the batch: images x0, xk, x1 (N, S, S, 3), features
    z0, zk, z1 (N, H, W, D), the scale lam () -> ()."""
    sides = ((x0, xk, z0, zk), (xk, x1, zk, z1), (x0, x1, z0, z1))
    want = lam * rms(z0, z1)
    err = sum(jnp.square(rms(a, b) - lam * rms(za, zb)) for a, b, za, zb in sides)
    return jnp.mean(err / (want ** 2 + 1e-6))


def kl(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """mean_n KL(softmax(p) || softmax(q)): (N, C), (N, C) -> (). Its gradient in q's logits is
    softmax(q) - softmax(p) per example: it does not vanish when softmax(q) is confidently wrong."""
    lp, lq = jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)
    return jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1))


def path_ends(W: jax.Array, b: jax.Array, z: jax.Array, s: jax.Array, t: jax.Array) -> jax.Array:
    """Z_1 of every query: the reflection across the s/t mirror, moved to the swapped logits (closed form).
    z (N, H, W, D), s, t (N,) -> (N, H, W, D)."""
    def one(zi, si, ti):
        w_m, b_m = geo.mirror(W, b, si, ti)
        return geo.least_norm(W, b, geo.reflect(zi, w_m, b_m), geo.swapped(geo.head_logits(W, b, zi), si, ti))
    return jax.vmap(one)(z, s, t)


def draw(key: jax.Array, s: jax.Array, num_classes: int, far_share: float) -> tuple[jax.Array, jax.Array]:
    """Per example: t uniform over the classes other than s; k uniform over the grid's points k >= 0.5 with
    probability ``far_share``, else uniform over the whole grid. s (N,) -> (t, k) (N,)."""
    kt, kk, kf = jax.random.split(key, 3)
    t = (s + jax.random.randint(kt, s.shape, 1, num_classes)) % num_classes
    grid = np.asarray(geo.DEFAULT_KS, np.float32)
    anywhere = jax.random.choice(kk, jnp.asarray(grid), s.shape)
    far = jax.random.choice(kk, jnp.asarray(grid[grid >= 0.5]), s.shape)
    return t, jnp.where(jax.random.bernoulli(kf, far_share, s.shape), far, anywhere)


def generator_loss(g_weights, g_def, d_def, d_weights, split_model, params, cfg: dec.DecoderConfig,
                   lc: LossConfig, x, key):
    """(L_G, ({term: value}, sg(x_k))) of one batch x (N, S, S, 3) and key; see the module docstring."""
    W, b = geo.linear_head(split_model, params)
    z_s, skips = dec.source_stages(split_model, params, x)
    s = jnp.argmax(geo.head_logits(W, b, z_s), -1)
    t, k = draw(key, s, split_model.num_classes, lc.far_share)
    z_1 = path_ends(W, b, z_s, s, t)
    z_k = z_s + k[:, None, None, None] * (z_1 - z_s)
    decode = lambda z, kk: dec.decode(g_def, g_weights, cfg, W, z, skips, s, t, kk)  # noqa: E731
    x_0, x_k = decode(z_s, jnp.zeros_like(k)), decode(z_k, k)
    f_k, _ = split_model.encode(params, x_k)
    terms = {"cls": kl(geo.head_logits(W, b, z_k), split_model.head(params, f_k)),
             "rec": jnp.mean(jnp.abs(x - x_0)),
             "feat": jnp.mean(jnp.square(z_k - f_k)),
             "adv": jnp.mean(jax.nn.softplus(-nnx.merge(d_def, d_weights)(x_k)))}
    if lc.triangulation:
        terms["tri"] = triangulation(x_0, x_k, decode(z_1, jnp.ones_like(k)), z_s, z_k, z_1, pair_scale(x, z_s))
    total = sum(getattr(lc, f"w_{name}") * value for name, value in terms.items())
    return total, (terms, jax.lax.stop_gradient(x_k))


def discriminator_loss(d_weights, d_def, real: jax.Array, fake: jax.Array) -> jax.Array:
    """mean softplus(-D(real)) + mean softplus(D(fake))."""
    disc = nnx.merge(d_def, d_weights)
    return jnp.mean(jax.nn.softplus(-disc(real))) + jnp.mean(jax.nn.softplus(disc(fake)))


@functools.partial(jax.jit, static_argnames=("g_def", "d_def", "split_model", "cfg", "lc"))
def train_step(state: dict, g_def, d_def, split_model, params, cfg: dec.DecoderConfig, lc: LossConfig, x, key):
    """One step of G then D: state {"g", "d", "opt_g", "opt_d"} -> (new state, {term: value}). Only the
    architecture and loss settings are static: runs that differ in steps, seed or data share the compilation."""
    opt = adam(lc.lr)
    (_, (terms, fake)), grads = jax.value_and_grad(generator_loss, has_aux=True)(
        state["g"], g_def, d_def, state["d"], split_model, params, cfg, lc, x, key)
    updates, opt_g = opt.update(grads, state["opt_g"], state["g"])
    d_value, d_grads = jax.value_and_grad(discriminator_loss)(state["d"], d_def, x, fake)
    d_updates, opt_d = opt.update(d_grads, state["opt_d"], state["d"])
    new = {"g": optax.apply_updates(state["g"], updates), "d": optax.apply_updates(state["d"], d_updates),
           "opt_g": opt_g, "opt_d": opt_d}
    return new, {**terms, "disc": d_value}


def _config_json(config: DecoderTrainConfig) -> dict:
    """The fields that change the result (all but ``save_every``), as JSON returns them."""
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k != "save_every"}))


def initial_state(split_model, params, image_size: int, config: DecoderTrainConfig):
    """(g_def, d_def, state): fresh decoder and discriminator weights (seeded by ``config.seed``) and Adam."""
    g_def, g = nnx.split(dec.build(split_model, params, image_size, config.decoder, config.seed))
    d_def, d = nnx.split(Discriminator(config.decoder.width, rngs=nnx.Rngs(config.seed + 1)))
    g, d = nnx.to_pure_dict(g), nnx.to_pure_dict(d)
    opt = adam(config.loss.lr)
    return g_def, d_def, {"g": g, "d": d, "opt_g": opt.init(g), "opt_d": opt.init(d)}


def train_decoder(split_model, params, train_set, config: DecoderTrainConfig, out: str | Path, *,
                  on_step: Callable[[int, dict], None] | None = None) -> tuple[dict, dict]:
    """Train (or resume) G for the frozen classifier (``split_model``, ``params``) on ``train_set`` and write
    it to ``out/decoder`` (+ ``out/decoder.json``).

    Returns (the decoder's weights as a pure dict, summary {"steps", "steps_per_s", "last": {term: value}});
    steps_per_s counts this run's steps after its first (which includes the compilation), NaN below 2 steps.
    ``on_step(step, terms)`` is called after every step (a test stops a run there).
    """
    config.validate()
    geo.linear_head(split_model, params)  # a one-line error for a non-GAP head, before any work
    out = Path(out).expanduser().absolute()
    n = len(train_set)
    if n == 0:
        raise FgvceError(f"the train split of {train_set.name} is empty")
    batch_size = min(config.batch_size, n)
    per_epoch = n // batch_size
    image_size = train_set.preprocessing.image_size
    g_def, d_def, state = initial_state(split_model, params, image_size, config)
    weights_print = fingerprint(params)
    meta = {"config": _config_json(config), "classifier": weights_print}

    manager = ocp.CheckpointManager(out / STATE_DIR, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    step, last = 0, {}
    latest = manager.latest_step()
    if latest is not None:
        restored = manager.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(state),
                                                                   meta=ocp.args.JsonRestore()))
        if {k: restored.meta[k] for k in meta} != meta:
            raise FgvceError(f"{out} holds a decoder training run for another configuration or classifier; "
                             "use another --out")
        state, step, last = restored.state, int(latest), restored.meta["last"]
        progress.write(f"resuming from step {step}/{config.steps} in {out / STATE_DIR}")

    def save(at: int) -> None:
        manager.save(at, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=json_meta({**meta, "last": last})), force=True)

    images, key, start, t_first = image_reader(train_set), jax.random.key(config.seed), step, None
    try:
        bar = progress.bar(range(step, config.steps), desc="train-decoder", unit="step")
        for i in bar:
            idx = epoch_batches(n, batch_size, config.seed, i // per_epoch)[i % per_epoch]
            state, terms = train_step(state, g_def, d_def, split_model, params, config.decoder, config.loss,
                                      jnp.asarray(images(idx)), jax.random.fold_in(key, i))
            step, last = i + 1, {name: float(v) for name, v in terms.items()}
            t_first = t_first or time.perf_counter()  # after the first step of this run: its compilation
            bar.set_postfix(rec=f"{last['rec']:.3f}", cls=f"{last['cls']:.3f}")
            if on_step is not None:
                on_step(step, last)
            if step % config.save_every == 0 or step == config.steps:
                save(step)
    finally:
        manager.wait_until_finished()
        manager.close()
    rate = (step - start - 1) / (time.perf_counter() - t_first) if step - start > 1 else float("nan")
    write_decoder(out, state["g"], {**meta, "image_size": image_size, "arch": split_model.arch, "steps": step})
    return state["g"], {"steps": step, "steps_per_s": rate, "last": last}


def write_decoder(out: Path, weights: dict, info: dict) -> None:
    """``out/decoder`` (orbax tree) and then ``out/decoder.json``, written to a hidden sibling and renamed, so
    the JSON appears last and only over complete weights; a decoder already there is kept."""
    if (out / INFO_FILE).exists():
        return
    tmp = out / f".decoder-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / DECODER_DIR, weights)
        shutil.rmtree(out / DECODER_DIR, ignore_errors=True)  # left by an interrupted earlier rename
        os.rename(tmp / DECODER_DIR, out / DECODER_DIR)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        os.rename(tmp / INFO_FILE, out / INFO_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
