"""The global model of a classifier: its concept surrogate and the causal graph over [u, c_free, y_hat]
on the training split (docs/glance.md). Used by ``fgvce train-surrogate`` and the test bed.

Writes, under ``out``: ``surrogate_state/`` (:func:`surrogate.train_surrogate`), ``graph.json`` and
``graph.png`` (:func:`causal.write_graph`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fgvce_jax import morphometrics
from fgvce_jax.glance import causal, surrogate
from fgvce_jax.glance.context import load_context_table
from fgvce_jax.store import fingerprint
from fgvce_jax.train import image_reader

SINK = "y_hat"


@dataclasses.dataclass(frozen=True)
class GlobalModel:
    """The surrogate, the graph, sigma (P,) the std of each concept on the training split (the explanations'
    intervention unit) and the training latents h (N, D)."""

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
    return GlobalModel(fitted, graph, c.std(0), h)
