"""Metrics of a GLANCE-style global model for ``fgvce evaluate`` (issue 13; docs/glance.md; all choices ours).

- Surrogate agreement: the share of images with argmax g(D(E(h))) = argmax g(h), h the pooled latent (N, D).
- Concept R^2 per context feature f: 1 - sum_n (c_nf - u_nf)^2 / sum_n (u_nf - mean u_f)^2, with u the
  standardised context features (N, F) and c_ctx (N, F) the aligned concepts; no refit (c_ctx is meant to
  *be* u), so R^2 can be negative.
- Generator agreement: the share of concepts c = E(h(x)) whose rendering the full classifier assigns to
  argmax g(D(c)); FD-classifier: the Fréchet distance of the classifier's pooled features of real images
  and of G(E(h(real))) (:func:`fgvce_jax.mirror.metrics.fd_classifier`).
- Structural Hamming distance (SHD) between two graphs over the same named nodes: the number of node pairs
  whose edge differs (absent, a -> b, b -> a or undirected; a reversed or unoriented edge counts once).
  :func:`morpho_truth` is the known graph of ``morpho-digits`` restricted to the nodes whose relations it
  fixes: thickness -> intensity, slant independent of both, and slant -> y_hat on the shortcut twin only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fgvce_jax.errors import FgvceError
from fgvce_jax.glance import causal
from fgvce_jax.glance.distil import render_concepts
from fgvce_jax.glance.surrogate import Surrogate, head_logits, standardise
from fgvce_jax.mirror.metrics import fd_classifier, pooled_features, validity

MORPHO_NODES = ("thickness", "slant", "intensity", "y_hat")


def surrogate_agreement(model: Surrogate, head, h: np.ndarray) -> float:
    """Share of the latents h (N, D) for which argmax g(D(E(h))) = argmax g(h)."""
    h = jnp.asarray(h, jnp.float32)
    rebuilt = head_logits(head, model.decode(model.encode(h)))
    return float(np.mean(np.argmax(np.asarray(rebuilt), -1) == np.argmax(np.asarray(head_logits(head, h)), -1)))


def concept_r2(c_ctx: np.ndarray, u_standardised: np.ndarray) -> np.ndarray:
    """(F,) 1 - SSE_f / SST_f of c_ctx (N, F) as a prediction of the standardised context u (N, F)."""
    c, u = np.asarray(c_ctx, np.float64), np.asarray(u_standardised, np.float64)
    if c.shape != u.shape or c.ndim != 2:
        raise FgvceError(f"concept R^2 needs c_ctx and u of the same shape (N, F), got {c.shape} and {u.shape}")
    sst = np.sum((u - u.mean(0)) ** 2, 0)
    if np.any(sst == 0):
        raise FgvceError(f"concept R^2 needs varying context features; column {int(np.argmin(sst))} is constant")
    return 1 - np.sum((c - u) ** 2, 0) / sst


def generator_metrics(loaded, split_model, params, images: np.ndarray, key: jax.Array,
                      u: np.ndarray | None = None) -> dict:
    """The global model's metrics on real images (N, S, S, C) in the classifier's input space.

    Args:
      loaded: a :class:`fgvce_jax.glance.fit.Loaded` (its generator may be None: no generator metrics).
      key: a typed PRNG key of G's noise.
      u: (N, F) raw context features of the images (None: no concept R^2).
    Returns a dict: ``surrogate_agreement``; with u, ``concept_r2`` {name: R^2}; with a generator,
    ``generator_agreement`` and ``fd_classifier``.
    """
    h = pooled_features(split_model, params, images)
    model = loaded.fitted.model
    out = {"surrogate_agreement": surrogate_agreement(model, loaded.head, h)}
    c = model.encode(jnp.asarray(h))
    if u is not None:
        us = standardise(u, loaded.fitted.u_mean, loaded.fitted.u_std)[0]
        out["concept_r2"] = dict(zip(loaded.fitted.names, concept_r2(np.asarray(c[:, :model.n_ctx]), us).tolist()))
    g = loaded.generator
    if g is not None:
        fake = render_concepts(g, np.asarray(c), key)
        out["generator_agreement"] = validity(split_model, params, fake,
                                              np.argmax(np.asarray(head_logits(loaded.head, model.decode(c))), -1))
        out["fd_classifier"] = fd_classifier(split_model, params, images, fake)
    return out


def _marks(graph: causal.Graph, names: tuple[str, ...]) -> dict:
    """{(a, b) names with a < b in ``names`` order: 1 a -> b, 2 b -> a, 3 undirected} over ``names``."""
    missing = [n for n in names if n not in graph.nodes]
    if missing:
        raise FgvceError(f"the graph has no node {', '.join(missing)} (its nodes: {', '.join(graph.nodes)})")
    rank = {n: k for k, n in enumerate(names)}
    marks = {}
    for edges, undirected in ((graph.directed, False), (graph.undirected, True)):
        for p, c in edges:
            a, b = graph.nodes[p], graph.nodes[c]
            if a in rank and b in rank:
                key = (a, b) if rank[a] < rank[b] else (b, a)
                marks[key] = 3 if undirected else (1 if key[0] == a else 2)
    return marks


def structural_hamming_distance(found: causal.Graph, truth: causal.Graph) -> int:
    """SHD of ``found`` against ``truth`` on the nodes of ``truth`` (``found`` may have more; the edges among
    the others are ignored): node pairs whose edge (absent, either direction, undirected) differs."""
    a, b = _marks(found, truth.nodes), _marks(truth, truth.nodes)
    return sum(a.get(k, 0) != b.get(k, 0) for k in set(a) | set(b))


def morpho_truth(shortcut: bool) -> causal.Graph:
    """The known graph of ``morpho-digits`` over ``MORPHO_NODES``: thickness -> intensity, plus slant -> y_hat
    when the shortcut is planted (``morpho-digits-shortcut``). Weights are 0 and noise 1 (structure only)."""
    edges = [(0, 2)] + ([(1, 3)] if shortcut else [])
    return causal.Graph(MORPHO_NODES, tuple(edges), (), np.zeros((4, 4)), np.ones(4))
