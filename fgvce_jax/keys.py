"""Every PRNG key of an explain run, derived from the run's seed alone (typed ``jax.random.key`` keys).

An image's key is ``fold_in(fold_in(fold_in(key(seed), tag(stream)), tag(split)), tag(id))`` with
``tag(s)`` = the first 31 bits of sha256(s), little-endian. So an image's draws depend on the seed, what they
are for (the stream), and which image it is, never on its shard, its row in a batch, the run's ``--limit``
or the other images; a resumed, re-sharded or extended run reproduces an uninterrupted one.

Streams: :data:`PHI` for saliency Phi (shared by every method: methods with equal saliency settings then
compute equal maps, and one reference-Phi cache serves them all), :data:`REFERENCES` for the rank of each
reference under ``--reference-mode random`` (:func:`uniforms`), and a method's name for what it draws itself
(``random``'s maps). The in-memory API (``counterfactual.explain``, ``saliency.compute``) takes one
key per batch instead and gives row i ``fold_in(key, i)`` (:func:`row_keys`).
"""
from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp

PHI = "phi"
REFERENCES = "references"
DERIVATION = "fold_in(fold_in(fold_in(key(seed), tag(stream)), tag(split)), tag(id)), tag = sha256[:4] LE & 0x7fffffff"


def tag(text: str) -> int:
    """The first 31 bits of sha256(text), little-endian: a fold_in value for a name."""
    return int.from_bytes(hashlib.sha256(str(text).encode()).digest()[:4], "little") & 0x7FFFFFFF


def stream_key(seed: int, stream: str) -> jax.Array:
    """The key of one stream of a run: ``fold_in(key(seed), tag(stream))``."""
    return jax.random.fold_in(jax.random.key(int(seed)), tag(stream))


def image_key(seed: int, stream: str, split: str, image_id: str) -> jax.Array:
    """The key of one image's draws in ``stream`` (module docstring)."""
    return jax.random.fold_in(jax.random.fold_in(stream_key(seed, stream), tag(split)), tag(image_id))


def image_keys(seed: int, stream: str, split: str, ids) -> jax.Array:
    """keys (N,): :func:`image_key` of each id."""
    base = jax.random.fold_in(stream_key(seed, stream), tag(split))
    return jax.vmap(lambda t: jax.random.fold_in(base, t))(jnp.asarray([tag(i) for i in ids], jnp.uint32))


def uniforms(seed: int, stream: str, split: str, ids) -> jax.Array:
    """(N,) float32: one U[0, 1) draw from each id's :func:`image_key`."""
    return jax.vmap(lambda k: jax.random.uniform(k, ()))(image_keys(seed, stream, split, ids))


def row_keys(key: jax.Array, n: int) -> jax.Array:
    """keys (n,): ``fold_in(key, i)`` for row i of a batch."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
