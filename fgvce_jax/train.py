"""Fine-tuning a classifier on a dataset, resumable.

Cross-entropy ``L = -mean_i log softmax(f(x_i))[y_i]`` minimised with optax:
SGD with Nesterov momentum on ``grad + wd * theta`` (L2) or AdamW (decoupled
decay), under a learning rate that rises linearly from 0 over the warm-up steps
and then stays constant or follows a cosine to 0 at the last step. BatchNorm
uses batch statistics in training (NNX ``train()`` mode) and running averages
for evaluation.

The epoch order is ``permutation(N)`` drawn from ``(seed, epoch)``, batches are
consecutive slices of it and the incomplete last one is dropped, so step ``s``
always sees the same images. Model and optimizer state go to an orbax
``CheckpointManager`` under ``OUT/train_state`` every ``save_every`` steps and
at the end of each epoch; running the same command again restores the latest
step and continues, ending with the same parameters as an uninterrupted run.
The final model goes to ``OUT`` with :func:`fgvce_jax.models.checkpoint.save`.

Example (about 40 s of CPU time; test accuracy about 0.98)::

    fgvce train --arch resnet_tiny --dataset digits --out runs/digits
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from fgvce_jax import data as data_lib
from fgvce_jax import models, progress
from fgvce_jax.models import checkpoint
from fgvce_jax.errors import FgvceError
from fgvce_jax.store import config_diff

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
STATE_DIR = "train_state"
PRELOAD_BYTES = 1 << 29  # datasets whose inputs fit in 512 MiB are decoded once, up front


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (stored with its checkpoints)."""

    arch: str = "resnet_tiny"
    dataset: str = "digits"
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"
    schedule: str = "cosine"
    warmup_epochs: float = 0.5
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0
    image_size: int | None = None
    init: str | None = None
    save_every: int = 100

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise FgvceError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise FgvceError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.arch not in models.ARCHS:
            raise FgvceError(f"unknown arch {self.arch!r}; choose one of {', '.join(models.ARCHS)}")
        for field in ("epochs", "batch_size", "save_every"):
            if getattr(self, field) < 1:
                raise FgvceError(f"--{field.replace('_', '-')} must be >= 1, got {getattr(self, field)}")
        if not self.lr > 0:
            raise FgvceError(f"--lr must be > 0, got {self.lr}")


def learning_rate(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup_epochs``, then constant or cosine down to 0."""
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps - 1)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, total_steps, end_value=0.0)
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), optax.constant_schedule(config.lr)],
                                [warmup])


@functools.lru_cache(maxsize=8)
def make_optimizer(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax transformation of ``config``; cached, so that a second run with the same
    configuration reuses the compiled train step (the transformation is part of its cache key)."""
    schedule = learning_rate(config, total_steps, steps_per_epoch)
    if config.optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(config.weight_decay),
                           optax.sgd(schedule, momentum=config.momentum, nesterov=True))
    return optax.adamw(schedule, weight_decay=config.weight_decay)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """(n // batch_size, batch_size) indices: a ``(seed, epoch)``-seeded permutation, last partial batch dropped."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)


def transfer_weights(source: nnx.Module, target: nnx.Module) -> list[str]:
    """Copy every parameter/statistic of ``source`` into ``target`` where path and shape agree.

    Returns the paths left as initialised in ``target`` (the classifier layer
    when the number of classes differs).
    """
    src = dict(nnx.to_flat_state(nnx.state(source)))
    dst_state = nnx.state(target)
    kept = []
    for path, var in nnx.to_flat_state(dst_state):
        other = src.get(path)
        if other is not None and other.shape == var.shape:
            var.set_value(other.get_value())
        else:
            kept.append("/".join(map(str, path)))
    nnx.update(target, dst_state)
    return kept


def build_model(config: TrainConfig, num_classes: int, image_size: int) -> nnx.Module:
    """A fresh model, or ``config.init``'s weights with a new classifier layer if C differs."""
    vit_size = image_size if config.arch.startswith("vit") else None
    model = models.create(config.arch, num_classes, seed=config.seed, image_size=vit_size)
    if config.init is None:
        return model
    source, info = models.load(Path(config.init).expanduser().resolve())
    if info.arch != config.arch:
        raise FgvceError(f"--init {config.init} is a {info.arch} checkpoint, but --arch is {config.arch}")
    fresh = transfer_weights(source, model)
    if fresh:
        progress.write(f"--init: re-initialised {', '.join(fresh)} ({info.num_classes} -> {num_classes} classes)")
    return model


def _loss(model, x, y):
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)


@nnx.jit
def train_step(model, optimizer, x, y):
    """One optimizer step on a batch x (B, S, S, 3), y (B,) -> (loss, accuracy)."""
    (loss, acc), grads = nnx.value_and_grad(_loss, has_aux=True)(model, x, y)
    optimizer.update(model, grads)
    return loss, acc


@nnx.jit
def _predict(model, x):
    return jnp.argmax(model(x), -1)


def predict(model: nnx.Module, images: Callable[[np.ndarray], np.ndarray], n: int, batch_size: int) -> np.ndarray:
    """(n,) predicted classes in eval mode; the last batch is padded to ``batch_size`` (one compilation)."""
    model.eval()
    out = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        x = images(idx)
        pad = batch_size - len(idx)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        out.append(np.asarray(_predict(model, jnp.asarray(x)))[: len(idx)])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def image_reader(dataset) -> Callable[[np.ndarray], np.ndarray]:
    """``indices -> (B, S, S, 3)``; small datasets are decoded once and kept in memory."""
    s = dataset.preprocessing.image_size
    if len(dataset) * s * s * 3 * 4 > PRELOAD_BYTES:
        return dataset.images
    everything = dataset.images(np.arange(len(dataset)))
    return lambda idx: everything[np.asarray(idx)]


def _pure(obj) -> dict:
    return nnx.to_pure_dict(nnx.state(obj))


def json_meta(meta: dict) -> ocp.args.JsonSave:
    """Orbax's JSON argument for a checkpoint's ``meta``, deep-copied now: the manager writes asynchronously while
    training goes on appending to the same lists, and a live reference would store losses from later steps."""
    return ocp.args.JsonSave(copy.deepcopy(meta))


def _restore(obj, pure: dict) -> None:
    state = nnx.state(obj)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(obj, state)


def _config_json(config: TrainConfig) -> dict:
    """The fields that change the result (all but ``save_every``), as JSON would return them."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "save_every"}
    return json.loads(json.dumps(fields))


def train(config: TrainConfig, out: str | Path, *, train_set=None, test_set=None,
          on_step: Callable[[int, dict], None] | None = None) -> tuple[nnx.Module, object, list[dict]]:
    """Train (or resume) and write the final model to ``out``.

    Args:
      config: the run; ``config.dataset`` is loaded unless ``train_set`` /
        ``test_set`` (:class:`fgvce_jax.data.Dataset`) are given.
      out: output directory; ``out/train_state`` holds the orbax checkpoints.
      on_step: called after every step as ``on_step(step, {"loss", "accuracy"})``.

    Returns:
      (model in eval mode, ModelInfo, history: one dict per epoch with
      ``epoch, loss, train_accuracy, test_accuracy``).
    """
    config.validate()
    out = Path(out).expanduser().resolve()
    if train_set is None:
        train_set = data_lib.load(config.dataset, "train", image_size=config.image_size)
    if test_set is None:
        test_set = data_lib.load(config.dataset, "test", image_size=config.image_size)
    pre = train_set.preprocessing
    n, c = len(train_set), len(train_set.class_names)
    if n == 0:
        raise FgvceError(f"the train split of {train_set.name} is empty")
    batch_size = min(config.batch_size, n)
    steps_per_epoch = n // batch_size
    total_steps = config.epochs * steps_per_epoch

    model = build_model(config, c, pre.image_size)
    optimizer = nnx.Optimizer(model, make_optimizer(config, total_steps, steps_per_epoch), wrt=nnx.Param)

    manager = ocp.CheckpointManager(out / STATE_DIR, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    step, history, losses, accs = 0, [], [], []  # losses/accs: per step of the current epoch
    latest = manager.latest_step()
    if latest is not None:
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"model": _pure(model), "optimizer": _pure(optimizer)}),
            meta=ocp.args.JsonRestore()))
        if restored.meta["config"] != _config_json(config):
            flags = {k: "--" + k.replace("_", "-") for k in _config_json(config) if k != "momentum"}  # `fgvce train`'s
            diff = "; ".join(config_diff(restored.meta["config"], _config_json(config), flags))
            raise FgvceError(f"{out} holds a training run with a different configuration ({diff}); use another --out")
        _restore(model, restored.state["model"])
        _restore(optimizer, restored.state["optimizer"])
        step, history = int(latest), list(restored.meta["history"])
        losses, accs = list(restored.meta["epoch_losses"]), list(restored.meta["epoch_accuracies"])
        progress.write(f"resuming from step {step}/{total_steps} in {out / STATE_DIR}")

    def save(at: int) -> None:
        manager.save(at, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"model": _pure(model), "optimizer": _pure(optimizer)}),
            meta=json_meta({"config": _config_json(config), "history": history,
                               "epoch_losses": losses, "epoch_accuracies": accs})), force=True)

    train_images = image_reader(train_set)
    test_images = image_reader(test_set)
    try:
        for epoch in range(step // steps_per_epoch, config.epochs):
            batches = epoch_batches(n, batch_size, config.seed, epoch)
            model.train()
            bar = progress.bar(range(step - epoch * steps_per_epoch, steps_per_epoch),
                               desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, unit="step")
            for b in bar:
                loss, acc = train_step(model, optimizer, jnp.asarray(train_images(batches[b])),
                                       jnp.asarray(train_set.labels[batches[b]]))
                step += 1
                losses.append(float(loss))
                accs.append(float(acc))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if on_step is not None:
                    on_step(step, {"loss": losses[-1], "accuracy": accs[-1]})
                if step % config.save_every == 0 and b + 1 < steps_per_epoch:
                    save(step)
            test_acc = float(np.mean(predict(model, test_images, len(test_set), batch_size) == test_set.labels))
            history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)),
                            "train_accuracy": float(np.mean(accs)), "test_accuracy": test_acc})
            progress.write(f"epoch {epoch + 1}/{config.epochs}: loss {history[-1]['loss']:.4f}  "
                       f"train acc {history[-1]['train_accuracy']:.3f}  test acc {test_acc:.3f}")
            losses, accs = [], []
            save(step)
    finally:
        manager.wait_until_finished()
        manager.close()

    model.eval()
    info = checkpoint.ModelInfo(arch=config.arch, num_classes=c, class_names=list(train_set.class_names),
                                image_size=pre.image_size, resize_size=pre.resize_size, mean=tuple(pre.mean),
                                std=tuple(pre.std), default_split=model.default_split)
    write_model(out, model, info)
    return model, info, history


def write_model(out: Path, model: nnx.Module, info) -> None:
    """Put the final checkpoint in ``out`` next to ``train_state/`` (``models.load(out)`` reads it).

    :func:`checkpoint.save` writes a complete checkpoint to a hidden sibling;
    its ``state/`` then ``info.json`` are renamed into ``out``, so ``info.json``
    appears last and only over complete weights. A finished run is left as is.
    """
    if (out / checkpoint.INFO_FILE).exists():
        return
    tmp = checkpoint.save(out / f".model-{os.getpid()}.tmp", model, info, overwrite=True)
    try:
        shutil.rmtree(out / checkpoint.STATE_DIR, ignore_errors=True)  # left by an interrupted earlier rename
        os.rename(tmp / checkpoint.STATE_DIR, out / checkpoint.STATE_DIR)
        os.rename(tmp / checkpoint.INFO_FILE, out / checkpoint.INFO_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
