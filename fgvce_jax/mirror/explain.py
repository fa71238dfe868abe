"""The per-query decode of Mirror-CFE (SPEC 8, issue 12): decode the path, classify every decoded image with
the full classifier, find the first counterfactual.

For N queries x (N, S, S, 3) with source s (the prediction) and target t (the true class), the path
Z_k = Z_s + k (Z_1 - Z_s) (:func:`fgvce_jax.mirror.geometry.path_batch`, refined end) is decoded at every k of
the grid into x_k = G(Z_k) and classified by F = g o f: p(k) = softmax(F(x_k)) (N, K, C). The first
counterfactual is at

    k_first = min {k in grid : k >= 0.5 and argmax p(k) = t},

and a query that has no such k is a reported failure with a reason code, not an error: ``never_t`` (no
decoded image is assigned to t) or ``t_only_below_half`` (only images before the boundary are).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from fgvce_jax.errors import FgvceError
from fgvce_jax.mirror import decoder as dec
from fgvce_jax.mirror import geometry as geo
from fgvce_jax.mirror.train import DECODER_DIR, INFO_FILE
from fgvce_jax.store import fingerprint

K_MIN = 0.5  # the boundary: counterfactuals are looked for at k >= K_MIN
FLIPPED, NEVER_T, T_ONLY_BELOW_HALF = "flipped", "never_t", "t_only_below_half"


class LoadedDecoder(NamedTuple):
    """A decoder restored for one classifier: ``nnx.split`` halves and its :class:`DecoderConfig`."""

    graphdef: nnx.GraphDef
    weights: dict
    config: dec.DecoderConfig


class MirrorExplanation(NamedTuple):
    """N queries on a grid of K values of k: images (N, K, S, S, 3) x_k (normalised input space); p_t (N, K);
    pred (N, K) argmax F(x_k); k_first (N,) (NaN on failure); success (N,) bool; reason (N,) str."""

    images: np.ndarray
    p_t: np.ndarray
    pred: np.ndarray
    k_first: np.ndarray
    success: np.ndarray
    reason: np.ndarray


def load_decoder(path: str | Path, split_model, params) -> LoadedDecoder:
    """The decoder in ``path`` (written by :func:`fgvce_jax.mirror.train.train_decoder`), after checking that it
    was trained for these classifier weights (their fingerprint); one-line FgvceErrors otherwise."""
    path = Path(path).expanduser().absolute()
    if not (path / INFO_FILE).is_file() or not (path / DECODER_DIR).is_dir():
        raise FgvceError(f"{path} holds no trained decoder (no {INFO_FILE} and {DECODER_DIR}/); train one with "
                         "`fgvce train-decoder`")
    info = json.loads((path / INFO_FILE).read_text())
    mine = fingerprint(params)
    if info["classifier"] != mine:
        raise FgvceError(f"the decoder in {path} was trained for other classifier weights (fingerprint "
                         f"{info['classifier']}, this model's is {mine}); train one for this model")
    config = dec.DecoderConfig(**info["config"]["decoder"])
    graphdef, fresh = nnx.split(dec.build(split_model, params, info["image_size"], config))
    with ocp.StandardCheckpointer() as ckptr:
        weights = ckptr.restore(path / DECODER_DIR, nnx.to_pure_dict(fresh))
    return LoadedDecoder(graphdef, weights, config)


@functools.partial(jax.jit, static_argnames=("split_model", "graphdef", "config"))
def decode_paths(split_model, params, graphdef, weights, config: dec.DecoderConfig, x: jax.Array, s: jax.Array,
                 t: jax.Array, ks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One compiled call per batch: x (N, S, S, 3), s, t (N,) int, ks (K,) -> (images (N, K, S, S, 3),
    probabilities of the full classifier (N, K, C)); vmapped over the queries."""
    W, b = geo.linear_head(split_model, params)
    z_s, skips = dec.source_stages(split_model, params, x)
    zk = geo.path_batch(W, b, z_s, s, t, ks).z  # (N, K, H, W, D)

    def one(z, skip, si, ti):
        many = lambda a: jnp.broadcast_to(a, (ks.shape[0], *jnp.shape(a)))  # noqa: E731
        images = dec.decode(graphdef, weights, config, W, z, tuple(map(many, skip)), many(si), many(ti), ks)
        return images, jax.nn.softmax(split_model.logits(params, images), -1)

    return jax.vmap(one)(zk, skips, s, t)


def first_flip(pred: np.ndarray, t: np.ndarray, ks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pred (N, K) classes along the path, t (N,), ks (K,) increasing -> (k_first (N,) float, NaN where none;
    success (N,) bool; reason (N,) str: ``flipped``, ``never_t`` or ``t_only_below_half``)."""
    ks = np.asarray(ks, np.float64)
    assigned = np.asarray(pred) == np.asarray(t)[:, None]
    eligible = assigned & (ks >= K_MIN - 1e-9)
    success = eligible.any(1)
    k_first = np.where(success, ks[eligible.argmax(1)], np.nan)
    reason = np.where(success, FLIPPED, np.where(assigned.any(1), T_ONLY_BELOW_HALF, NEVER_T))
    return k_first, success, reason


def counterfactual_index(k_first, ks=geo.DEFAULT_KS) -> np.ndarray:
    """(N,) int: the position in ``ks`` of each query's first counterfactual ``k_first`` (N,), or of k = 1 (the
    last) where there is none (NaN): the image a failure is judged by."""
    ks = np.asarray(ks, np.float64)
    k = np.nan_to_num(np.asarray(k_first, np.float64), nan=ks[-1])
    return np.argmax(np.isclose(ks[None], k[:, None]), 1)


def explain(split_model, params, decoder: LoadedDecoder, x, s, t, ks=geo.DEFAULT_KS) -> MirrorExplanation:
    """Mirror-CFE for N queries: x (N, S, S, 3) normalised, s (predicted), t (target) (N,) -> the decoded path,
    p_t(k) and the first counterfactual (see the module docstring)."""
    geo.linear_head(split_model, params)
    s, t = geo.check_classes(s, t, split_model.num_classes)
    images, probs = decode_paths(split_model, params, decoder.graphdef, decoder.weights, decoder.config,
                                 jnp.asarray(x, jnp.float32), s, t, jnp.asarray(ks, jnp.float32))
    probs = np.asarray(probs)
    pred = probs.argmax(-1)
    k_first, success, reason = first_flip(pred, t, ks)
    return MirrorExplanation(np.asarray(images), probs[np.arange(len(t)), :, t], pred, k_first, success, reason)
