"""References and candidate sets (SPEC 5).

References of a query with true class y are correctly classified images of
class y, the N nearest by cosine of pooled features or N seeded-random ones.
Candidates are the top regions of each reference's Phi on its own class; a
reference's candidates depend only on that reference, so they are stored once
in a :class:`CandidateBank` and each query only selects indices into it.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fgvce_jax.counterfactual.partition import Regions

_EPS = 1e-12


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity along the last axis, broadcasting: <a, b> / max(|a| |b|, eps).

    A zero vector has similarity 0 with everything.
    """
    dot = jnp.sum(a * b, axis=-1)
    norm = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return dot / jnp.maximum(norm, _EPS)


@functools.partial(jax.jit, static_argnames=("n", "mode"))
def select_references(query_pooled: jax.Array, query_true: jax.Array, ref_pooled: jax.Array,
                      ref_labels: jax.Array, ref_preds: jax.Array, *, n: int, mode: str,
                      draws: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Pick up to N references for each query.

    Eligible references of query q: ``ref_labels == ref_preds == query_true[q]``.
    ``nearest`` ranks them by cosine(query_pooled[q], ref_pooled[r]); ``random``
    ranks them by ``draws[r]``, one uniform draw per reference (shared by all
    queries; the pipeline draws it from the reference's own key, so a query's
    references are the same in any batch that holds them). Ties go to the lower
    reference index.

    Args:
      query_pooled: (Q, D); query_true: (Q,) int.
      ref_pooled: (R, D); ref_labels, ref_preds: (R,) int.
      n: N, references per query.
      mode: ``"nearest"`` or ``"random"``.
      draws: (R,) float, the rank of each reference (``random`` only).

    Returns:
      index (Q, N) int32 rows of the reference bank, best first, -1 where fewer
      than N are eligible; valid (Q, N) bool.
    """
    n_refs = ref_pooled.shape[0]
    eligible = (ref_labels == ref_preds)[None, :] & (ref_labels[None, :] == query_true[:, None])
    if mode == "nearest":
        rank = cosine(query_pooled[:, None, :], ref_pooled[None, :, :])
    elif draws is None:
        raise ValueError("reference mode 'random' needs draws (R,)")
    else:
        rank = jnp.broadcast_to(jnp.asarray(draws, jnp.float32), eligible.shape)
    rank = jnp.where(eligible, rank, -jnp.inf)
    if n > n_refs:
        rank = jnp.pad(rank, ((0, 0), (0, n - n_refs)), constant_values=-jnp.inf)
    top, index = jax.lax.top_k(rank, n)
    valid = top > -jnp.inf
    return jnp.where(valid, index, -1).astype(jnp.int32), valid


class CandidateBank(NamedTuple):
    """Candidate regions of all references, flattened to B = R * c rows.

    patches: (B, r, r, D) features of the r x r window around each region centre.
    patch_valid: (B, r, r) bool, window cell lies inside the reference map.
    pooled: (B, D) mean of the patch over its valid cells (the region feature).
    ref: (B,) int32 reference row; center: (B, 2) int32; valid: (B,) bool.
    """

    patches: jax.Array
    patch_valid: jax.Array
    pooled: jax.Array
    ref: jax.Array
    center: jax.Array
    valid: jax.Array


def extract_patch(z: jax.Array, center: jax.Array, region_size: int) -> tuple[jax.Array, jax.Array]:
    """The r x r window of z (H, W, D) around center (2,): patch (r, r, D), valid (r, r).

    Same window convention as :func:`partition.window_mask`; cells outside the
    map are zero and marked invalid.
    """
    offsets = jnp.arange(region_size) - (region_size - 1) // 2
    rows, cols = center[0] + offsets, center[1] + offsets
    valid = ((rows >= 0) & (rows < z.shape[0]))[:, None] & ((cols >= 0) & (cols < z.shape[1]))[None, :]
    patch = z[jnp.clip(rows, 0, z.shape[0] - 1)][:, jnp.clip(cols, 0, z.shape[1] - 1)]
    return jnp.where(valid[..., None], patch, 0.0), valid


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x (..., D) over the cells where mask (...) holds; (D,). Zero if none."""
    total = jnp.sum(jnp.where(mask[..., None], x, 0.0), axis=tuple(range(mask.ndim)))
    return total / jnp.maximum(jnp.sum(mask), 1)


def top_regions(regions: Regions, count: int) -> tuple[jax.Array, jax.Array]:
    """The ``count`` highest-scoring valid regions per map: centre (R, c, 2), valid (R, c)."""
    rank = jnp.where(regions.valid, regions.score, -jnp.inf)
    if count > rank.shape[1]:
        rank = jnp.pad(rank, ((0, 0), (0, count - rank.shape[1])), constant_values=-jnp.inf)
    top, index = jax.lax.top_k(rank, count)
    valid = top > -jnp.inf
    center = jnp.take_along_axis(regions.center, jnp.clip(index, 0, regions.center.shape[1] - 1)[..., None], axis=1)
    return jnp.where(valid[..., None], center, -1), valid


@functools.partial(jax.jit, static_argnames=("region_size",))
def build_bank(z: jax.Array, center: jax.Array, valid: jax.Array, *, region_size: int) -> CandidateBank:
    """Candidate bank from reference maps z (R, H, W, D) and region centres (R, c, 2), valid (R, c)."""
    n_refs, count = valid.shape
    flat_z = jnp.repeat(z, count, axis=0)
    flat_center = center.reshape(-1, 2)
    patches, patch_valid = jax.vmap(lambda zz, cc: extract_patch(zz, cc, region_size))(flat_z, flat_center)
    pooled = jax.vmap(masked_mean)(patches, patch_valid)
    ref = jnp.repeat(jnp.arange(n_refs, dtype=jnp.int32), count)
    return CandidateBank(patches, patch_valid, pooled, ref, flat_center.astype(jnp.int32), valid.reshape(-1))


def query_candidates(ref_index: jax.Array, ref_valid: jax.Array, bank_valid: jax.Array,
                     per_reference: int) -> tuple[jax.Array, jax.Array]:
    """Rows of the bank open to each query: index (Q, N * c) int32, valid (Q, N * c) bool.

    Bank rows of reference r are ``r * c .. r * c + c - 1``.
    """
    offsets = jnp.arange(per_reference, dtype=jnp.int32)
    index = (jnp.maximum(ref_index, 0)[..., None] * per_reference + offsets).reshape(ref_index.shape[0], -1)
    valid = jnp.repeat(ref_valid, per_reference, axis=1) & bank_valid[index]
    return index, valid
