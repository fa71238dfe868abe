"""Distil the GLANCE-style generator from the classifier and its concept surrogate (docs/glance_generator.md;
every choice ours, a reconstruction from the abstract).

G renders concepts c (N, P) as images whose classifier latent matches the surrogate's decoding D(c). With f
the frozen classifier up to its split, h(x) = mean_{H', W'} f(x) (N, D), (E, D) the fitted surrogate and
x_g = to_classifier_space(G(c)), G's loss per step is (:func:`latent_losses`)::

    L_G = adv_weight E softplus(-Disc(G(c)))                  (non-saturating GAN loss, gan.py)
        + w_latent  ||h(x_g) - D(c)||^2 / D                   (G's image reads as the decoded latent)
        + w_concept ||E(h(x_g)) - c||^2 / P                   (and encodes back to the concepts it came from)

and the discriminator's is the logistic loss with R1 on real images (:func:`fgvce_jax.glance.gan.make_gan_step`).
The concepts rendered are c = E(h(x)) of training images, so G learns the data's concept distribution; the
real images of the same step are those images, mapped to [-1, 1].

Step s uses the rows ``choice(N, B, replace=False)`` of numpy's PCG64 seeded with (key data, s) and G's noise
key fold_in(fold_in(key, 1), s); G and D start from fold_in(key, 0). So a run is a function of (key, config,
data) and step s does the same thing whether or not the run was interrupted before it. The state (weights,
Adam moments, step) goes to an orbax ``CheckpointManager`` under ``OUT/generator_state`` every ``save_every``
steps and after the last, with the configuration, the classifier's weight fingerprint, the classifier's input
normalisation and the per-step losses; the same call again resumes and ends bit-identical to an uninterrupted
run. :func:`load_generator` refuses, in one line, a generator trained for other weights.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from fgvce_jax import progress
from fgvce_jax.errors import FgvceError
from fgvce_jax.glance import gan
from fgvce_jax.glance.generator import GeneratorConfig, from_classifier_space, render, to_classifier_space
from fgvce_jax.glance.surrogate import Surrogate
from fgvce_jax.store import config_diff
from fgvce_jax.train import json_meta

STATE_DIR = "generator_state"


@dataclasses.dataclass(frozen=True)
class DistilConfig:
    """Everything that determines the generator's training (stored with its checkpoints, but ``save_every``).

    G and D are compact (``w_dim``, ``mapping_layers``, channels ``min(channel_max, channel_base // r)`` at
    side r) so that a CPU trains them in minutes; the resolution is the smallest 4 * 2^k >= the image side
    with an even difference (28 px images: 32, centre-cropped). lr, r1_gamma and adv_weight as
    :class:`fgvce_jax.glance.gan.GanConfig`.
    """

    steps: int = 200
    batch_size: int = 16
    w_dim: int = 64
    mapping_layers: int = 2
    channel_base: int = 512
    channel_max: int = 64
    lr: float = 2e-3
    r1_gamma: float = 0.1
    adv_weight: float = 1.0
    w_latent: float = 1.0
    w_concept: float = 1.0
    save_every: int = 50

    def validate(self) -> None:
        for field in ("steps", "batch_size", "w_dim", "mapping_layers", "channel_base", "channel_max",
                      "save_every"):
            if getattr(self, field) < 1:
                raise FgvceError(f"generator {field} must be >= 1, got {getattr(self, field)}")
        if self.batch_size % min(4, self.batch_size):
            raise FgvceError(f"generator batch_size must be a multiple of 4 (the minibatch-std group), "
                             f"got {self.batch_size}")
        if not self.lr > 0 or min(self.r1_gamma, self.adv_weight, self.w_latent, self.w_concept) < 0:
            raise FgvceError("generator lr must be > 0 and r1_gamma, adv_weight, w_latent, w_concept >= 0")

    def networks(self, concept_dim: int, image_size: int, channels: int):
        """(GeneratorConfig, DiscriminatorConfig, GanConfig) for concepts of width ``concept_dim`` and images
        (image_size, image_size, channels)."""
        resolution = 4
        while resolution < image_size or (resolution - image_size) % 2:
            resolution *= 2
            if resolution > 4 * image_size + 8:
                raise FgvceError(f"no generator resolution 4 * 2^k fits {image_size} px images by a centre crop "
                                 "(the side must be even or 4 * 2^k)")
        g = GeneratorConfig(concept_dim=concept_dim, w_dim=self.w_dim, mapping_layers=self.mapping_layers,
                            resolution=resolution, image_size=image_size, channel_base=self.channel_base,
                            channel_max=self.channel_max, image_channels=channels)
        d = gan.DiscriminatorConfig(image_size=image_size, image_channels=channels, channel_base=self.channel_base,
                                    channel_max=self.channel_max, mbstd_group=min(4, self.batch_size))
        return g, d, gan.GanConfig(lr=self.lr, r1_gamma=self.r1_gamma, adv_weight=self.adv_weight)


@dataclasses.dataclass(frozen=True)
class Distilled:
    """A trained generator: render with ``generator.render(graph, params, c, key)`` (images in [-1, 1]);
    ``mean``/``std`` (C,) the classifier's input normalisation (:func:`to_classifier_space`); ``history`` the
    per-step metrics of :func:`fgvce_jax.glance.gan.make_gan_step` (``g_extra``: the weighted latent losses)."""

    graph: nnx.GraphDef
    params: nnx.State
    config: GeneratorConfig
    mean: np.ndarray
    std: np.ndarray
    history: list


def latent_losses(images: jax.Array, concepts: jax.Array, split_model, params, surrogate: Surrogate,
                  mean, std) -> tuple[jax.Array, jax.Array]:
    """(||h(x_g) - D(c)||^2 / D, ||E(h(x_g)) - c||^2 / P), batch means, for G's images (B, S, S, C) in [-1, 1]
    and their concepts c (B, P); x_g = to_classifier_space(images, mean, std), h = the classifier's pooled
    latent at its split."""
    h = split_model.encode(params, to_classifier_space(images, mean, std))[0].mean((1, 2))
    return (jnp.mean(jnp.square(h - surrogate.decode(concepts))),
            jnp.mean(jnp.square(surrogate.encode(h) - concepts)))


def _state_leaves(state: gan.GanState) -> dict:
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}


def _meta(config: DistilConfig, key: jax.Array, fingerprint: str, g_config: GeneratorConfig, mean, std) -> dict:
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "save_every"}
    fields["key"] = np.asarray(jax.random.key_data(key)).tolist()
    return json.loads(json.dumps({"config": fields, "classifier": fingerprint,
                                  "generator": dataclasses.asdict(g_config),
                                  "mean": list(map(float, mean)), "std": list(map(float, std))}))


def _check_classifier(out: Path, stored: str, fingerprint: str) -> None:
    if stored != fingerprint:
        raise FgvceError(f"the generator in {out} was trained for another classifier (weights {stored}, "
                         f"these are {fingerprint}); train one for this model in another directory")


def step_rows(key: jax.Array, step: int, n: int, batch_size: int) -> np.ndarray:
    """(batch_size,) distinct rows of step ``step``: numpy PCG64 seeded with (key data, step)."""
    seed = np.asarray(jax.random.key_data(key)).reshape(-1).tolist() + [step]
    return np.random.default_rng(seed).choice(n, batch_size, replace=False)


@functools.lru_cache(maxsize=8)
def _distil_step(g_graph, d_graph, gan_config, split_model, s_graph, w_latent: float, w_concept: float):
    """:func:`gan.make_gan_step` with the weighted :func:`latent_losses` as G's extra loss; its ``aux`` is
    (classifier params, surrogate state, mean, std). Cached on the static parts, so runs with the same
    networks, classifier split and surrogate architecture share one compilation."""
    def extra(images, c, aux):
        params, s_state, mean, std = aux
        latent, concept = latent_losses(images, c, split_model, params, nnx.merge(s_graph, s_state), mean, std)
        return w_latent * latent + w_concept * concept

    return gan.make_gan_step(gan.GanSetup(g_graph, d_graph, gan_config), extra)


def train_generator(split_model, params, surrogate: Surrogate, real: np.ndarray, concepts: np.ndarray, mean, std,
                    key: jax.Array, out: str | Path, *, fingerprint: str, config: DistilConfig = DistilConfig(),
                    on_step: Callable[[int, dict], None] | None = None) -> Distilled:
    """Train (or resume) G against the frozen classifier and surrogate (module docstring).

    Args:
      split_model, params: the classifier split where the surrogate reads h (a GAP + linear head).
      surrogate: the fitted concept surrogate (E, D).
      real: (N, S, S, C) training images in the classifier's normalised input space (``Dataset.images``).
      concepts: (N, P) c = E(h(real)), the concepts G renders.
      mean, std: (C,) the classifier's input normalisation (``Dataset.preprocessing``).
      key: a typed PRNG key (``jax.random.key``).
      out: directory; checkpoints go to ``out/generator_state``.
      fingerprint: the classifier's weight fingerprint, stored and checked on resume.
      on_step: called after every step as ``on_step(step, losses)``.
    """
    config.validate()
    real, concepts = np.asarray(real, np.float32), np.asarray(concepts, np.float32)
    if real.ndim != 4 or real.shape[1] != real.shape[2] or concepts.ndim != 2 or len(concepts) != len(real):
        raise FgvceError(f"generator training needs square images (N, S, S, C) and concepts (N, P) of the same N; "
                         f"got {real.shape} and {concepts.shape}")
    if len(real) < config.batch_size:
        raise FgvceError(f"generator batch_size {config.batch_size} exceeds the {len(real)} training images")
    if concepts.shape[1] != surrogate.n_ctx + surrogate.n_free:
        raise FgvceError(f"concepts have {concepts.shape[1]} columns, the surrogate {surrogate.n_ctx + surrogate.n_free}")
    out = Path(out).expanduser().absolute()
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    g_config, d_config, gan_config = config.networks(concepts.shape[1], real.shape[1], real.shape[3])
    setup, state = gan.init(g_config, d_config, gan_config, jax.random.fold_in(key, 0))
    s_graph, s_state = nnx.split(surrogate)
    gan_step = _distil_step(setup.g_graph, setup.d_graph, gan_config, split_model, s_graph, config.w_latent,
                            config.w_concept)
    aux = (params, s_state, jnp.asarray(mean), jnp.asarray(std))
    real_unit = np.asarray(from_classifier_space(real, mean, std))
    meta = _meta(config, key, fingerprint, g_config, mean, std)
    noise_key = jax.random.fold_in(key, 1)

    manager = ocp.CheckpointManager(out / STATE_DIR, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    step, history = 0, []
    treedef = jax.tree.structure(state)
    latest = manager.latest_step()
    if latest is not None:
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_state_leaves(state)), meta=ocp.args.JsonRestore()))
        _check_classifier(out, restored.meta["classifier"], fingerprint)
        if restored.meta["config"] != meta["config"]:
            diff = "; ".join(config_diff(restored.meta["config"], meta["config"], {}))
            raise FgvceError(f"{out} holds a generator with a different configuration ({diff}); use another directory")
        state = jax.tree.unflatten(treedef, [restored.state[k] for k in sorted(restored.state)])
        step, history = int(latest), restored.meta["history"]
        progress.write(f"resuming the generator from step {step}/{config.steps} in {out / STATE_DIR}")

    def save(at: int) -> None:
        manager.save(at, args=ocp.args.Composite(state=ocp.args.StandardSave(_state_leaves(state)),
                                                 meta=json_meta({**meta, "history": history})), force=True)

    try:
        bar = progress.bar(range(step, config.steps), desc="generator", unit="step")
        for s in bar:
            rows = step_rows(key, s, len(real), config.batch_size)
            k = jax.random.fold_in(noise_key, s)
            state, metrics = gan_step(state, jnp.asarray(real_unit[rows]), jnp.asarray(concepts[rows]), k, aux)
            losses = {name: float(v) for name, v in metrics.items()}
            history.append(losses)
            bar.set_postfix(g=f"{losses['g_loss']:.3f}", d=f"{losses['d_loss']:.3f}", refresh=False)
            if (s + 1) % config.save_every == 0 or s + 1 == config.steps:
                save(s + 1)
            if on_step is not None:
                on_step(s + 1, losses)
    finally:
        manager.wait_until_finished()
        manager.close()
    return Distilled(setup.g_graph, state.g, g_config, mean, std, history)


def render_concepts(distilled: Distilled, concepts: np.ndarray, key: jax.Array, batch_size: int = 256) -> np.ndarray:
    """(N, S, S, C) images of concepts (N, P) in the classifier's normalised input space, rendered in chunks of
    ``batch_size`` rows (chunk i with G's noise key fold_in(key, i))."""
    c = np.asarray(concepts, np.float32)
    return np.concatenate([np.asarray(to_classifier_space(
        render(distilled.graph, distilled.params, jnp.asarray(c[s:s + batch_size]), jax.random.fold_in(key, i)),
        distilled.mean, distilled.std)) for i, s in enumerate(range(0, len(c), batch_size))])


def load_generator(out: str | Path, fingerprint: str) -> Distilled:
    """The generator trained by :func:`train_generator` in ``out`` (its latest step); one-line FgvceError if
    there is none or it was trained for a classifier whose weight fingerprint is not ``fingerprint``."""
    out = Path(out).expanduser().absolute()
    if not (out / STATE_DIR).is_dir():
        raise FgvceError(f"{out} holds no generator (no {STATE_DIR}/); train one with fgvce train-surrogate "
                         "--generator-steps N")
    manager = ocp.CheckpointManager(out / STATE_DIR, options=ocp.CheckpointManagerOptions(create=False))
    try:
        latest = manager.latest_step()
        if latest is None:
            raise FgvceError(f"{out} holds no generator checkpoint in {STATE_DIR}/")
        meta = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        _check_classifier(out, meta["classifier"], fingerprint)
        cfg = meta["config"]
        config = DistilConfig(**{k: v for k, v in cfg.items() if k != "key"})
        g_config = GeneratorConfig(**meta["generator"])
        d_config, gan_config = config.networks(g_config.concept_dim, g_config.out_size, g_config.image_channels)[1:]
        setup, template = gan.init(g_config, d_config, gan_config, jax.random.key(0))  # shapes and tree structure
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_state_leaves(template)))).state
    finally:
        manager.close()
    state = jax.tree.unflatten(jax.tree.structure(template), [restored[k] for k in sorted(restored)])
    return Distilled(setup.g_graph, state.g, g_config, np.asarray(meta["mean"], np.float32),
                     np.asarray(meta["std"], np.float32), meta["history"])
