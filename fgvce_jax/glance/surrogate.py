"""The concept surrogate: an encoder E from the classifier's pooled latent h to concepts c = [c_ctx, c_free]
and a decoder D back to h, faithful to the classifier's head g (docs/glance.md; all choices ours).

Shapes: h (N, D) is the mean over H', W' of the classifier's latent z at a split with a GAP + linear head
(``SplitModel.linear_head``), so ``g(h) = h @ W + b``, logits (N, C). u (N, F) are the standardised context
features, c_ctx (N, F) and c_free (N, K).

Loss on a batch of B (each term a mean over the batch)::

    L = w_rec  ||D(E(h)) - h||^2 / D
      + w_kl   KL(softmax(g(D(E(h)))) || softmax(g(h)))        (the surrogate keeps the decisions)
      + w_align ||c_ctx - u||^2 / F                            (concepts aligned with the context)
      + w_decor sum_{i != j} Cov(c_free)_ij^2                  (decorrelated free concepts)

with Cov the batch covariance of c_free (B - 1 in the denominator). Adam; batches are a permutation of the
N rows drawn per epoch from ``fold_in(key, epoch)``, the last partial batch dropped, so step s always sees
the same rows; a progress bar shows the steps. Optimizer and model state go to an orbax
``CheckpointManager`` under ``OUT/surrogate_state`` every ``save_every`` steps and after the last; the same
call again resumes from the latest step and ends with the weights of an uninterrupted run. The checkpoint records the classifier's weight fingerprint
(:func:`fgvce_jax.pipeline.fingerprint`); resuming or loading it for other weights is refused.
"""
from __future__ import annotations

import dataclasses
import json
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
from fgvce_jax.store import config_diff
from fgvce_jax.train import _pure, _restore, json_meta

STATE_DIR = "surrogate_state"


@dataclasses.dataclass(frozen=True)
class SurrogateConfig:
    """Everything that determines a surrogate's training (stored with its checkpoints)."""

    n_free: int = 4
    hidden: int = 128
    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3
    w_rec: float = 1.0
    w_kl: float = 1.0
    w_align: float = 1.0
    w_decor: float = 1.0
    save_every: int = 100

    def validate(self) -> None:
        for field in ("n_free", "hidden", "epochs", "batch_size", "save_every"):
            if getattr(self, field) < 1:
                raise FgvceError(f"surrogate {field} must be >= 1, got {getattr(self, field)}")
        if not self.lr > 0:
            raise FgvceError(f"surrogate lr must be > 0, got {self.lr}")


def mlp(sizes: tuple[int, ...], rngs: nnx.Rngs) -> nnx.Sequential:
    """Linear layers of ``sizes`` (in, hidden..., out) with GELU between them."""
    layers = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nnx.Linear(a, b, rngs=rngs))
        if k < len(sizes) - 2:
            layers.append(nnx.gelu)
    return nnx.Sequential(*layers)


class Surrogate(nnx.Module):
    """E: h (N, D) -> c (N, F + K) = [c_ctx, c_free]; D: c -> h (N, D). Two-layer GELU MLPs."""

    def __init__(self, latent_dim: int, n_ctx: int, n_free: int, hidden: int, *, key: jax.Array):
        rngs = nnx.Rngs(params=key)
        self.n_ctx, self.n_free = n_ctx, n_free
        self.encoder = mlp((latent_dim, hidden, n_ctx + n_free), rngs)
        self.decoder = mlp((n_ctx + n_free, hidden, latent_dim), rngs)

    def encode(self, h: jax.Array) -> jax.Array:
        """h (..., D) -> c (..., F + K), the first F aligned with the standardised context features."""
        return self.encoder(h)

    def decode(self, c: jax.Array) -> jax.Array:
        """c (..., F + K) -> h (..., D), a pooled latent the classifier's head reads."""
        return self.decoder(c)


def standardise(u: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None):
    """((u - mean) / std, mean, std); mean and std over the rows of ``u`` unless given (std 0 -> 1)."""
    u = np.asarray(u, np.float64)
    mean = u.mean(0) if mean is None else np.asarray(mean)
    std = u.std(0) if std is None else np.asarray(std)
    std = np.where(std > 0, std, 1.0)
    return (u - mean) / std, mean, std


def head_logits(head: tuple[jax.Array, jax.Array], h: jax.Array) -> jax.Array:
    """g(h) = h @ W + b: pooled latents (N, D) -> logits (N, C) for a GAP + linear head (W (D, C), b (C,))."""
    w, b = head
    return h @ w + b


def off_diagonal_cov2(c: jax.Array) -> jax.Array:
    """sum_{i != j} Cov(c)_ij^2 of c (B, K), batch covariance with B - 1 in the denominator."""
    centred = c - c.mean(0)
    cov = centred.T @ centred / (c.shape[0] - 1)
    return jnp.sum(cov**2) - jnp.sum(jnp.diag(cov) ** 2)


def losses(model: Surrogate, head, h: jax.Array, u: jax.Array) -> dict[str, jax.Array]:
    """The four unweighted terms of the module docstring on a batch h (B, D), u (B, F)."""
    c = model.encode(h)
    rec = model.decode(c)
    log_p = jax.nn.log_softmax(head_logits(head, rec))
    log_q = jax.nn.log_softmax(head_logits(head, h))
    return {"rec": jnp.mean((rec - h) ** 2), "kl": jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)),
            "align": jnp.mean((c[:, :model.n_ctx] - u) ** 2), "decor": off_diagonal_cov2(c[:, model.n_ctx:])}


def _total(model, head, h, u, weights):
    parts = losses(model, head, h, u)
    return sum(weights[k] * parts[k] for k in parts), parts


@nnx.jit
def train_step(model, optimizer, head, h, u, weights):
    """One Adam step on h (B, D), u (B, F) -> dict of the loss terms and ``total``."""
    (total, parts), grads = nnx.value_and_grad(_total, has_aux=True)(model, head, h, u, weights)
    optimizer.update(model, grads)
    return {**parts, "total": total}


def epoch_order(key: jax.Array, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """(n // batch_size, batch_size) row indices of epoch ``epoch``: a permutation from fold_in(key, epoch)."""
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
    steps = n // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)


def _meta(config: SurrogateConfig, key: jax.Array, fingerprint: str, mean, std, names) -> dict:
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "save_every"}
    fields["key"] = np.asarray(jax.random.key_data(key)).tolist()
    return json.loads(json.dumps({"config": fields, "classifier": fingerprint, "u_mean": list(map(float, mean)),
                                  "u_std": list(map(float, std)), "context": list(names)}))


def _check_classifier(out: Path, stored: str, fingerprint: str) -> None:
    if stored != fingerprint:
        raise FgvceError(f"the surrogate in {out} was trained for another classifier (weights {stored}, "
                         f"these are {fingerprint}); train one for this model in another directory")


@dataclasses.dataclass(frozen=True)
class Fitted:
    """A trained surrogate and what it needs at explanation time: ``u_mean``/``u_std`` (F,) standardise the
    context features; ``names`` are the F context feature names; ``history`` one dict of mean losses per epoch."""

    model: Surrogate
    u_mean: np.ndarray
    u_std: np.ndarray
    names: tuple[str, ...]
    history: list


def train_surrogate(h: np.ndarray, u: np.ndarray, head, key: jax.Array, out: str | Path, *,
                    fingerprint: str, names: tuple[str, ...], config: SurrogateConfig = SurrogateConfig(),
                    on_step: Callable[[int, dict], None] | None = None) -> Fitted:
    """Train (or resume) the surrogate on pooled latents h (N, D) and raw context features u (N, F).

    Args:
      head: (W (D, C), b (C,)) of the classifier, ``split_model.linear_head(params)`` (None, for a split
        without a GAP + linear head, is refused).
      key: a typed PRNG key (``jax.random.key``); split into the initialisation and the batch order.
      out: directory of the orbax checkpoints (made absolute).
      fingerprint: the classifier's weight fingerprint, stored and checked on resume.
      names: the F context feature names.
      on_step: called after every step as ``on_step(step, losses)``.
    """
    config.validate()
    if head is None:
        raise FgvceError("the classifier has no GAP + linear head at this split, so no pooled latent for the "
                         "surrogate; split a ResNet at layer4")
    out = Path(out).expanduser().absolute()
    h = np.asarray(h, np.float32)
    if h.ndim != 2 or len(u) != len(h) or np.ndim(u) != 2 or np.shape(u)[1] != len(names):
        raise FgvceError(f"surrogate training needs h (N, D), u (N, F) and F names; got {h.shape}, "
                         f"{np.shape(u)} and {len(names)} names")
    us, mean, std = standardise(u)
    us = us.astype(np.float32)
    n = len(h)
    batch_size = min(config.batch_size, n)
    steps_per_epoch = n // batch_size
    total_steps = config.epochs * steps_per_epoch
    init_key, order_key = jax.random.split(key)
    model = Surrogate(h.shape[1], us.shape[1], config.n_free, config.hidden, key=init_key)
    optimizer = nnx.Optimizer(model, optax.adam(config.lr), wrt=nnx.Param)
    meta = _meta(config, key, fingerprint, mean, std, names)
    weights = {k: getattr(config, f"w_{k}") for k in ("rec", "kl", "align", "decor")}
    head = tuple(jnp.asarray(a) for a in head)

    manager = ocp.CheckpointManager(out / STATE_DIR, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    step, history, epoch_losses = 0, [], []
    latest = manager.latest_step()
    if latest is not None:
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"model": _pure(model), "optimizer": _pure(optimizer)}),
            meta=ocp.args.JsonRestore()))
        _check_classifier(out, restored.meta["classifier"], fingerprint)
        if restored.meta["config"] != meta["config"]:
            diff = "; ".join(config_diff(restored.meta["config"], meta["config"], {}))
            raise FgvceError(f"{out} holds a surrogate with a different configuration ({diff}); use another directory")
        _restore(model, restored.state["model"])
        _restore(optimizer, restored.state["optimizer"])
        step, history, epoch_losses = int(latest), restored.meta["history"], restored.meta["epoch_losses"]
        progress.write(f"resuming the surrogate from step {step}/{total_steps} in {out / STATE_DIR}")

    def save(at: int) -> None:
        manager.save(at, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"model": _pure(model), "optimizer": _pure(optimizer)}),
            meta=json_meta({**meta, "history": history, "epoch_losses": epoch_losses})), force=True)

    try:
        for epoch in range(step // steps_per_epoch, config.epochs):
            batches = epoch_order(order_key, epoch, n, batch_size)
            bar = progress.bar(range(step - epoch * steps_per_epoch, steps_per_epoch),
                               desc=f"surrogate epoch {epoch + 1}/{config.epochs}", leave=False, unit="step")
            for b in bar:
                parts = train_step(model, optimizer, head, jnp.asarray(h[batches[b]]), jnp.asarray(us[batches[b]]),
                                   weights)
                step += 1
                parts = {k: float(v) for k, v in parts.items()}
                epoch_losses.append(parts)
                bar.set_postfix(loss=f"{parts['total']:.3f}")
                if b + 1 == steps_per_epoch:
                    history.append({k: float(np.mean([p[k] for p in epoch_losses])) for k in epoch_losses[0]})
                    epoch_losses = []
                if step % config.save_every == 0 or step == total_steps:
                    save(step)
                if on_step is not None:
                    on_step(step, parts)
    finally:
        manager.wait_until_finished()
        manager.close()
    return Fitted(model, mean, std, tuple(names), history)


def load_surrogate(out: str | Path, fingerprint: str, latent_dim: int) -> Fitted:
    """The surrogate trained by :func:`train_surrogate` in ``out`` (its latest step), refused in one line if
    it was trained for a classifier whose weight fingerprint is not ``fingerprint``."""
    out = Path(out).expanduser().absolute()
    manager = ocp.CheckpointManager(out / STATE_DIR, options=ocp.CheckpointManagerOptions(create=False)) \
        if (out / STATE_DIR).is_dir() else None
    if manager is None or manager.latest_step() is None:
        raise FgvceError(f"{out} holds no surrogate (no {STATE_DIR}/)")
    try:
        meta = manager.restore(manager.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        _check_classifier(out, meta["classifier"], fingerprint)
        cfg = meta["config"]
        model = Surrogate(latent_dim, len(meta["context"]), cfg["n_free"], cfg["hidden"], key=jax.random.key(0))
        optimizer = nnx.Optimizer(model, optax.adam(cfg["lr"]), wrt=nnx.Param)
        state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"model": _pure(model), "optimizer": _pure(optimizer)}))).state
    finally:
        manager.close()
    _restore(model, state["model"])
    return Fitted(model, np.asarray(meta["u_mean"]), np.asarray(meta["u_std"]), tuple(meta["context"]),
                  meta["history"])


def pooled_latents(split_model, params, images: Callable[[np.ndarray], np.ndarray], n: int,
                   batch_size: int = 256) -> np.ndarray:
    """(n, D) float32 pooled latents h = mean over H', W' of z = f(x), in batches of ``images(indices)``."""
    batches = (np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size))
    return np.concatenate([np.asarray(_pooled_jit(split_model, params, jnp.asarray(images(b)))) for b in batches])


def _pooled(split_model, params, images):
    return split_model.encode(params, images)[0].mean((1, 2))


_pooled_jit = jax.jit(_pooled, static_argnums=0)
