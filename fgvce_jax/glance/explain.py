"""Local explanations by interventions on concepts (docs/glance.md; every choice ours).

For a query with pooled latent h (D,) and class of interest y (the true class of a mistake):

- c = E(h), P = F + K concepts; p_y(c) = softmax(g(D(c)))_y, the surrogate's read-out through the head g.
- A shift intervention moves concept j's own noise term by a s_j, where s_j = sigma_j noise_j is the
  standard deviation of that term in concept units (sigma_j the concept's standard deviation on the training
  split, noise_j = sqrt(1 - R^2_j) the graph's, 1 for a concept without parents), and so moves every
  descendant of j in the linear structural model: with B (P, P) the weights among the concept nodes on
  standardised columns, the shifts are a noise_j T[j] * sigma, T = (I - B)^{-1} (the total effects;
  undirected edges propagate nothing). ``effects`` = noise[:, None] * T * sigma[None, :] holds one row per
  concept. Why the noise term's deviation and not sigma_j: a concept its parents nearly determine
  (intensity given thickness on morpho-digits, noise 0.2-0.3) shifted by a whole sigma_j while its parents
  stay put lands where the surrogate saw no data, and its decoder's answer there is an extrapolation. On the
  shortcut test bed that made intensity the most important concept for one classifier seed in four, while
  re-rendering the queries shows the classifier's p_y moving 8x less under intensity than under slant
  (docs/glance.md, "How big an intervention").
- Importance of concept j (its average causal effect on p_y, a central difference over +-1 s_j):
  ACE_j = (p_y(c + effects[j]) - p_y(c - effects[j])) / 2.
- The minimal intervention set, greedily: up to ``max_set`` times, among the concepts not used yet and the
  steps a in ``STEPS`` (in s_j), add the shift a effects[j] that maximises p_y; stop once
  argmax_k g(D(c'))_k = y. Success: the prediction is y at the end.

:func:`explain` is jitted and vmapped over the queries; the surrogate's graph definition and ``max_set``
are static, so a second call with arrays of the same shapes does not recompile.

:func:`strips` renders the interventions with the distilled generator G (glance/distil.py): for each
concept j and shift a_m (``DELTAS``, -2..2 s_j) the image G(c + a_m effects[j]), with p_y read both
through g(D(.)) and by the full classifier on the rendered image.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fgvce_jax.glance.causal import Graph
from fgvce_jax.glance.generator import to_classifier_space
from fgvce_jax.glance.surrogate import Surrogate, head_logits

STEPS = (-3.0, -2.0, -1.0, 1.0, 2.0, 3.0)  # candidate shifts of the greedy set, in s_j (see the docstring)


def concept_effects(graph: Graph, sigma: np.ndarray) -> np.ndarray:
    """(P, P) shifts of all P concepts when concept j's noise term moves by its standard deviation, one row
    per j: noise[:, None] * (I - B)^{-1} * sigma[None, :], with B the graph's weights and noise its noise
    deviations among its first P nodes (the concepts; the prediction node is left out)."""
    p = len(sigma)
    b = np.asarray(graph.weights)[:p, :p]
    return np.asarray(graph.noise)[:p, None] * np.linalg.inv(np.eye(p) - b) * np.asarray(sigma)[None, :]


def _query(model: Surrogate, head, effects: jax.Array, h: jax.Array, y: jax.Array, max_set: int) -> dict:
    """One query: h (D,), y () -> the explanation's arrays (see :func:`explain`)."""
    p = effects.shape[0]
    c = model.encode(h)

    def logits(shifts):  # shifts (M, P) -> (M, C)
        return head_logits(head, model.decode(c[None] + shifts))

    p_y = lambda shifts: jax.nn.softmax(logits(shifts))[:, y]  # noqa: E731
    base = p_y(jnp.zeros((1, p)))[0]
    importance = (p_y(effects) - p_y(-effects)) / 2
    steps = jnp.asarray(STEPS)
    candidates = (steps[:, None, None] * effects[None]).reshape(-1, p)  # (S * P, P): step-major
    shift, used = jnp.zeros(p), jnp.zeros(p, bool)
    done = jnp.argmax(logits(shift[None])[0]) == y
    chosen, amounts = [], []
    for _ in range(max_set):
        score = jnp.where(jnp.tile(used, len(STEPS)), -jnp.inf, p_y(shift[None] + candidates))
        best = jnp.argmax(score)
        j, a = best % p, steps[best // p]
        act = ~done
        shift = jnp.where(act, shift + candidates[best], shift)
        used = used | (act & (jnp.arange(p) == j))
        chosen.append(jnp.where(act, j, -1))
        amounts.append(jnp.where(act, a, 0.0))
        done = jnp.argmax(logits(shift[None])[0]) == y
    return {"concepts": c, "p_y": base, "importance": importance, "set": jnp.stack(chosen).astype(jnp.int32),
            "set_steps": jnp.stack(amounts), "success": done, "p_y_after": p_y(shift[None])[0]}


@functools.partial(jax.jit, static_argnames=("graphdef", "max_set"))
def _explain(graphdef, state, head, effects, h, y, max_set):
    model = nnx.merge(graphdef, state)
    return jax.vmap(lambda hi, yi: _query(model, head, effects, hi, yi, max_set))(h, y)


def explain(model: Surrogate, head, effects: np.ndarray, h: np.ndarray, y: np.ndarray, max_set: int = 3) -> dict:
    """Explanations of N queries with pooled latents h (N, D) and classes of interest y (N,).

    Returns numpy arrays: ``concepts`` (N, P) c = E(h); ``p_y`` (N,) p_y(c); ``importance`` (N, P) ACE_j;
    ``set`` (N, max_set) int32 the greedy set's concepts in order (-1 once done); ``set_steps`` (N, max_set)
    their shifts in s_j (0 once done); ``success`` (N,) bool; ``p_y_after`` (N,) p_y after the set.
    """
    graphdef, state = nnx.split(model)
    out = _explain(graphdef, state, tuple(jnp.asarray(a) for a in head), jnp.asarray(effects, jnp.float32),
                   jnp.asarray(h, jnp.float32), jnp.asarray(y, jnp.int32), max_set)
    return {k: np.asarray(v) for k, v in out.items()}


DELTAS = (-2.0, -1.0, 0.0, 1.0, 2.0)  # the strips' shifts, in standard deviations of the intervened concept


@functools.partial(jax.jit, static_argnames=("s_graph", "g_graph", "split_model", "deltas"))
def _strips(s_graph, s_state, g_graph, g_params, split_model, params, head, effects, mean, std, h, y, key, deltas):
    model, render = nnx.merge(s_graph, s_state), nnx.merge(g_graph, g_params)
    p = effects.shape[0]
    shifts = jnp.asarray(deltas)[None, :, None] * effects[:, None, :]  # (P, M, P)
    c = model.encode(h)[:, None, None, :] + shifts[None]  # (N, P, M, P)
    flat = c.reshape(-1, p)
    # one image per row, every row with the same key: the frames of a strip differ only in their concepts
    images = jax.vmap(lambda ci: render(ci[None], key)[0])(flat)
    x = to_classifier_space(jnp.clip(images, -1.0, 1.0), mean, std)  # scored as the valid pixels they are shown as
    rows = jnp.repeat(y, p * len(deltas))
    surrogate_p = jax.nn.softmax(head_logits(head, model.decode(flat)))[jnp.arange(len(rows)), rows]
    classifier_p = jax.nn.softmax(split_model.logits(params, x))[jnp.arange(len(rows)), rows]
    grid = (h.shape[0], p, len(deltas))
    return x.reshape(*grid, *x.shape[1:]), surrogate_p.reshape(grid), classifier_p.reshape(grid)


def strips(model: Surrogate, head, effects: np.ndarray, generator, split_model, params, h: np.ndarray,
           y: np.ndarray, key: jax.Array, deltas: tuple[float, ...] = DELTAS) -> dict:
    """Rendered intervention strips of N queries with pooled latents h (N, D) and classes of interest y (N,).

    For query n, concept j and shift a_m in ``deltas`` (M values, in s_j): c' = E(h_n) + a_m effects[j]
    (the intervention shift of c_j's noise term by a_m s_j propagated through the structural model, as in
    :func:`explain`), rendered as x' = to_classifier_space(clip(G(c', key), -1, 1)): the classifier scores the
    valid image that is shown. Every frame uses the same ``key`` (a
    typed PRNG key), so G's noise is the same along and across strips.

    Args:
      generator: a :class:`fgvce_jax.glance.distil.Distilled` (its graph, params, mean and std are used).
      split_model, params: the classifier (its full logits score the rendered images).
    Returns numpy arrays: ``images`` (N, P, M, S, S, C) in the classifier's normalised input space (like
    ``Dataset.images``); ``p_y_surrogate`` (N, P, M) softmax(g(D(c')))_y; ``p_y_classifier`` (N, P, M)
    softmax(f_full(x'))_y; ``deltas`` (M,). One jitted call; the graph definitions, the split and ``deltas``
    are static, so a second call with arrays of the same shapes does not recompile.
    """
    s_graph, s_state = nnx.split(model)
    images, p_sur, p_cls = _strips(
        s_graph, s_state, generator.graph, generator.params, split_model, params,
        tuple(jnp.asarray(a) for a in head), jnp.asarray(effects, jnp.float32), jnp.asarray(generator.mean),
        jnp.asarray(generator.std), jnp.asarray(h, jnp.float32), jnp.asarray(y, jnp.int32), key,
        tuple(float(d) for d in deltas))
    return {"images": np.asarray(images), "p_y_surrogate": np.asarray(p_sur), "p_y_classifier": np.asarray(p_cls),
            "deltas": np.asarray(deltas, np.float32)}
