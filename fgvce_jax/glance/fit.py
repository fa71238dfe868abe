"""The global model of a classifier: its concept surrogate and the causal graph over [u, c_free, y_hat]
on the training split (docs/glance.md). Used by ``fgvce train-surrogate`` and the test bed.

Writes, under ``out``: ``surrogate_state/`` (:func:`surrogate.train_surrogate`), ``graph.json`` and
``graph.png`` (:func:`causal.write_graph`), ``global.json`` (the classifier's fingerprint, the concepts'
sigma and the prediction classes) and, when a generator is trained, ``generator_state/``
(:func:`distil.train_generator`). :func:`load` reads them all back.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fgvce_jax import morphometrics
from fgvce_jax.errors import FgvceError
from fgvce_jax.glance import causal, distil, surrogate
from fgvce_jax.glance.explain import concept_effects
from fgvce_jax.glance.context import load_context_table
from fgvce_jax.store import fingerprint
from fgvce_jax.train import image_reader

SINK = "y_hat"
GLOBAL_FILE = "global.json"


@dataclasses.dataclass(frozen=True)
class GlobalModel:
    """The surrogate, the graph, sigma (P,) the std of each concept on the training split (times the graph's
    noise deviation, the explanations' intervention unit) and the training latents h (N, D)."""

    fitted: surrogate.Fitted
    graph: causal.Graph
    sigma: np.ndarray
    h: np.ndarray


def context_features(dataset, table: str | Path | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """(N, F) context features of ``dataset``'s images and their names: the rows of a user's CSV ``table``
    keyed by ``dataset.ids``, else the measured morphometrics (``morphometrics.FEATURES``)."""
    if table is not None:
        return load_context_table(table, dataset.ids)
    return morphometrics.measure_all(dataset.read(i) for i in range(len(dataset))), morphometrics.FEATURES


def fit_global(split_model, params, train_set, u: np.ndarray, names: tuple[str, ...], out: str | Path, *,
               key: jax.Array, prediction_classes, config: surrogate.SurrogateConfig = surrogate.SurrogateConfig(),
               method: str = "pc", alpha: float = 0.01) -> GlobalModel:
    """Train (or resume) the surrogate on the pooled latents of ``train_set`` and context u (N, F), then
    discover the graph over [standardised u, c_free, y_hat] with y_hat = :func:`causal.log_odds` of
    ``prediction_classes``, fit its structural model and write it to ``out``/graph.{json,png}."""
    out = Path(out).expanduser().absolute()
    head = split_model.linear_head(params)
    h = surrogate.pooled_latents(split_model, params, image_reader(train_set), len(train_set))
    fitted = surrogate.train_surrogate(h, u, head, key, out, fingerprint=fingerprint(params), names=names,
                                       config=config)
    c = np.asarray(fitted.model.encode(jnp.asarray(h)))
    y_hat = causal.log_odds(np.asarray(surrogate.head_logits(head, jnp.asarray(h))), prediction_classes)
    nodes = tuple(names) + tuple(f"free{k}" for k in range(config.n_free)) + (SINK,)
    x = np.concatenate([surrogate.standardise(u, fitted.u_mean, fitted.u_std)[0], c[:, len(names):],
                        y_hat[:, None]], 1)
    graph = causal.causal_graph(x, nodes, SINK, method=method, alpha=alpha)
    causal.write_graph(graph, out / "graph")
    (out / GLOBAL_FILE).write_text(json.dumps({"classifier": fingerprint(params), "sigma": c.std(0).tolist(),
                                               "prediction_classes": [int(k) for k in prediction_classes]}))
    return GlobalModel(fitted, graph, c.std(0), h)


def fit_generator(split_model, params, train_set, global_model: GlobalModel, out: str | Path, *, key: jax.Array,
                  config: distil.DistilConfig = distil.DistilConfig()) -> distil.Distilled:
    """Train (or resume) the generator under ``out`` (:func:`distil.train_generator`) on ``train_set``'s images
    and their concepts c = E(h) from ``global_model``."""
    real = image_reader(train_set)(np.arange(len(train_set)))
    concepts = np.asarray(global_model.fitted.model.encode(jnp.asarray(global_model.h)))
    p = train_set.preprocessing
    return distil.train_generator(split_model, params, global_model.fitted.model, real, concepts, p.mean, p.std,
                                  key, out, fingerprint=fingerprint(params), config=config)


@dataclasses.dataclass(frozen=True)
class Loaded:
    """Everything an explanation needs, read back from a ``fgvce train-surrogate`` directory: the surrogate,
    the graph, sigma (P,), effects (P, P) = :func:`explain.concept_effects`, the classifier's head (W, b),
    the prediction classes of y_hat and the generator (None when it was not trained)."""

    fitted: surrogate.Fitted
    graph: causal.Graph
    sigma: np.ndarray
    effects: np.ndarray
    head: tuple
    prediction_classes: tuple[int, ...]
    generator: distil.Distilled | None


def load(out: str | Path, split_model, params) -> Loaded:
    """Read the artefacts of ``fgvce train-surrogate --out OUT`` for the classifier (split_model, params).

    One-line FgvceError when the split has no GAP + linear head, a file is missing, or the surrogate, the
    graph or the generator was fitted for other weights than ``params``.
    """
    out = Path(out).expanduser().absolute()
    head = split_model.linear_head(params)
    if head is None:
        raise FgvceError("the classifier has no GAP + linear head at this split, so no pooled latent for the "
                         "surrogate; split a ResNet at layer4")
    weights = fingerprint(params)
    fitted = surrogate.load_surrogate(out, weights, int(np.shape(head[0])[0]))
    if not (out / GLOBAL_FILE).is_file():
        raise FgvceError(f"{out} holds no {GLOBAL_FILE}; run fgvce train-surrogate to the end")
    meta = json.loads((out / GLOBAL_FILE).read_text())
    if meta["classifier"] != weights:
        raise FgvceError(f"the causal graph in {out} was fitted for another classifier (weights {meta['classifier']}, "
                         f"these are {weights})")
    graph = causal.read_graph(out / "graph.json")
    sigma = np.asarray(meta["sigma"])
    generator = distil.load_generator(out, weights) if (out / distil.STATE_DIR).is_dir() else None
    return Loaded(fitted, graph, sigma, concept_effects(graph, sigma), head, tuple(meta["prediction_classes"]),
                  generator)
