"""The counterfactual search (SPEC 5): a ``lax.while_loop`` over fixed-size state,
vmapped over queries and sharded over a 1-D device mesh.

Per query, each step picks an unreplaced query region and an unused candidate,
writes the candidate's r x r features into the query map at the region's cells,
runs the head and records the class probabilities. Two selection shapes share
the loop:

* row (FG-VCE and its ablations): the region is the unreplaced one with the
  highest score; the candidate maximises ``similarity`` = cos(region feature,
  candidate feature) or ``joint`` = log p_y(after swap) + lam * similarity.
* pairs (``cve``): the (region, candidate) pair maximising the same score over
  all unreplaced regions x unused candidates. Only those open pairs go through
  the head (step t of a K x M problem costs (K - t)(M - t) calls, as in the
  greedy search of Vandenhende et al., ECCV 2022), in fixed-size chunks over a
  fixed-length list of the open pairs, so the loop stays compiled once.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fgvce_jax.counterfactual.references import CandidateBank, masked_mean
from fgvce_jax import sharding

# Reason codes (Explanations.reason).
SUCCESS, T_MAX_REACHED, NO_QUERY_REGIONS, NO_REFERENCES, CANDIDATES_EXHAUSTED = 0, 1, 2, 3, 4
REASONS = {SUCCESS: "success", T_MAX_REACHED: "t_max reached", NO_QUERY_REGIONS: "no query regions",
           NO_REFERENCES: "no references", CANDIDATES_EXHAUSTED: "candidates exhausted"}


class SearchOptions(NamedTuple):
    """Static options of the loop (hashable: a jit static argument).

    pairs: score every open (region, candidate) pair (``cve``) instead of the top region only.
    early_stop: stop as soon as the stop rule holds; False = ``single-step``
      (replace every region, judge the final map).
    The others are CounterfactualConfig's (``Method.search_options``), whose defaults are the only ones.
    """

    selection: str
    lam: float
    stop: str
    t_max: int
    region_size: int
    pairs: bool
    early_stop: bool
    chunk_size: int | None


class SearchResult(NamedTuple):
    """Per query (leading axis Q), T = t_max edit slots (unused: -1 / NaN / False).

    success (Q,) bool; n_edits (Q,) int32; reason (Q,) int32 (see REASONS);
    region (Q, T) int32 query region slot; candidate (Q, T) int32 bank row;
    similarity (Q, T) f32; probs (Q, T, C) f32 after each edit; probs_before (Q, C);
    edit_mask (Q, T, H, W) bool, the cells written by each edit.
    """

    success: Any
    n_edits: Any
    reason: Any
    region: Any
    candidate: Any
    similarity: Any
    probs: Any
    probs_before: Any
    edit_mask: Any


def place(z: jax.Array, center: jax.Array, cells: jax.Array, patch: jax.Array,
          patch_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write an r x r patch into z (H, W, D), centred on ``center``, restricted to ``cells``.

    Cell (i, j) receives patch[i - c0 + (r-1)//2, j - c1 + (r-1)//2] when that
    index lies in the patch, the patch cell is valid and ``cells[i, j]`` holds;
    patch cells that fall outside the map are dropped.

    Returns:
      the edited map (H, W, D) and the written mask (H, W) bool.
    """
    r = patch.shape[0]
    oi = jnp.arange(z.shape[0]) - center[0] + (r - 1) // 2
    oj = jnp.arange(z.shape[1]) - center[1] + (r - 1) // 2
    inside = ((oi >= 0) & (oi < r))[:, None] & ((oj >= 0) & (oj < r))[None, :]
    ci, cj = jnp.clip(oi, 0, r - 1), jnp.clip(oj, 0, r - 1)
    placed = patch[ci][:, cj]
    written = inside & patch_valid[ci][:, cj] & cells
    return jnp.where(written[..., None], placed, z), written


def cosine_matrix(a: jax.Array, b: jax.Array) -> jax.Array:
    """(K, D), (M, D) -> (K, M) cosine similarities (0 for zero vectors)."""
    def unit(x):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return unit(a) @ unit(b).T


def open_pair_scores(score: Callable, pair_open: jax.Array, chunk: int) -> jax.Array:
    """``score(k, m)`` for every open pair of ``pair_open`` (K, M) bool, -inf at closed pairs: (K, M) f32.

    The open pairs, in ravel order, head an index list of fixed length (K M rounded up to a multiple of
    ``chunk``); only its first ceil(n_open / chunk) chunks are scored, ``chunk`` pairs at a time (vmapped),
    so the cost is that of the n_open open pairs plus under one chunk, with shapes that do not change.
    """
    flat = pair_open.ravel()
    order = jnp.nonzero(flat, size=-(-flat.size // chunk) * chunk, fill_value=0)[0]
    n_open = jnp.sum(flat, dtype=jnp.int32)

    def one_chunk(i, scores):
        pairs = jax.lax.dynamic_slice(order, (i * chunk,), (chunk,))
        values = jax.vmap(score)(*jnp.divmod(pairs, pair_open.shape[1]))
        live = i * chunk + jnp.arange(chunk) < n_open
        return scores.at[jnp.where(live, pairs, flat.size)].set(values, mode="drop")

    scores = jax.lax.fori_loop(0, -(-n_open // chunk), one_chunk, jnp.full(flat.shape, -jnp.inf, jnp.float32))
    return scores.reshape(pair_open.shape)


def _one_image(tree):
    return jax.tree.map(lambda a: a[None], tree)


def _search_one(split_model, options: SearchOptions, params, bank: CandidateBank, q: dict) -> SearchResult:
    """The loop for one query; ``q`` holds that query's arrays (see :func:`run_search`)."""
    z0, ctx, true, pred = q["z"], q["ctx"], q["true"], q["pred"]
    regions_center, regions_cells = q["center"], q["cells"]
    grid = z0.shape[:2]
    n_regions, n_cand, t_max = q["valid"].shape[0], q["cand_index"].shape[0], options.t_max
    patches = bank.patches[q["cand_index"]]
    patch_valid = bank.patch_valid[q["cand_index"]]
    sim = cosine_matrix(jax.vmap(lambda c: masked_mean(z0, c))(regions_cells), bank.pooled[q["cand_index"]])

    def probs_of(z):
        return jax.nn.softmax(split_model.head(params, z[None], _one_image(ctx))[0])

    def log_p_true(z, k, m):
        edited, _ = place(z, regions_center[k], regions_cells[k], patches[m], patch_valid[m])
        return jax.nn.log_softmax(split_model.head(params, edited[None], _one_image(ctx))[0])[true]

    def log_p_true_many(z, ks, ms):
        fn = jax.vmap(lambda km: log_p_true(z, *km)) if options.chunk_size is None else (
            lambda kms: jax.lax.map(lambda km: log_p_true(z, *km), kms, batch_size=options.chunk_size))
        return fn((ks, ms))

    def select(z, region_avail, cand_avail):
        """(k, m, any_region, any_candidate) for the current state."""
        if options.pairs:
            pair_open = region_avail[:, None] & cand_avail[None, :]
            score = options.lam * sim
            if options.selection == "joint":
                c = min(options.chunk_size or n_cand, n_cand)
                score = score + open_pair_scores(lambda k, m: log_p_true(z, k, m), pair_open, c)
            score = jnp.where(pair_open, score, -jnp.inf)
            k, m = jnp.divmod(jnp.argmax(score.ravel()), n_cand)
        else:
            k = jnp.argmax(jnp.where(region_avail, q["score"], -jnp.inf))
            if options.selection == "joint":
                score = log_p_true_many(z, jnp.full((n_cand,), k), jnp.arange(n_cand)) + options.lam * sim[k]
            else:
                score = sim[k]
            m = jnp.argmax(jnp.where(cand_avail, score, -jnp.inf))
        return k, m, jnp.any(region_avail), jnp.any(cand_avail)

    def stop_rule(probs):
        top = jnp.argmax(probs)
        return top == true if options.stop == "target" else top != pred

    def body(s):
        k, m, any_region, any_cand = select(s["z"], q["valid"] & ~s["region_used"], q["cand_valid"] & ~s["cand_used"])
        go = any_region & any_cand
        edited, written = place(s["z"], regions_center[k], regions_cells[k], patches[m], patch_valid[m])
        probs = probs_of(edited)
        t = s["t"]
        hit = stop_rule(probs)

        def rec(name, value):
            return jnp.where(go, s[name].at[t].set(value), s[name])

        return dict(
            z=jnp.where(go, edited, s["z"]),
            region_used=s["region_used"] | (go & (jnp.arange(n_regions) == k)),
            cand_used=s["cand_used"] | (go & (jnp.arange(n_cand) == m)),
            t=t + go.astype(jnp.int32),
            done=~go | (go & hit & options.early_stop),
            success=go & hit,
            reason=jnp.where(~any_region, NO_QUERY_REGIONS, jnp.where(~any_cand, CANDIDATES_EXHAUSTED, SUCCESS)),
            region=rec("region", k.astype(jnp.int32)),
            candidate=rec("candidate", m.astype(jnp.int32)),
            similarity=rec("similarity", sim[k, m]),
            probs=rec("probs", probs),
            edit_mask=rec("edit_mask", written))

    probs_before = probs_of(z0)
    init = dict(
        z=z0, region_used=jnp.zeros(n_regions, bool), cand_used=jnp.zeros(n_cand, bool),
        t=jnp.int32(0), done=~q["has_refs"], success=jnp.bool_(False),
        reason=jnp.where(q["has_refs"], SUCCESS, NO_REFERENCES).astype(jnp.int32),
        region=jnp.full((t_max,), -1, jnp.int32), candidate=jnp.full((t_max,), -1, jnp.int32),
        similarity=jnp.full((t_max,), jnp.nan, jnp.float32),
        probs=jnp.full((t_max,) + probs_before.shape, jnp.nan, jnp.float32),
        edit_mask=jnp.zeros((t_max,) + grid, bool))
    s = jax.lax.while_loop(lambda s: ~s["done"] & (s["t"] < t_max), body, init)
    if options.early_stop:
        success = s["success"]
    else:
        success = (s["t"] > 0) & stop_rule(s["probs"][jnp.maximum(s["t"] - 1, 0)])
    reason = jnp.where(success, SUCCESS, jnp.where(s["done"], s["reason"], T_MAX_REACHED))
    # "candidate" holds the query's candidate slot; map it to the bank row.
    candidate = jnp.where(s["candidate"] >= 0, q["cand_index"][jnp.maximum(s["candidate"], 0)], -1)
    return SearchResult(success, s["t"], reason.astype(jnp.int32), s["region"], candidate,
                        s["similarity"], s["probs"], probs_before, s["edit_mask"])


SEARCH_GROUP = 8  # queries searched together (vmapped) on a device


@functools.partial(jax.jit, static_argnames=("split_model", "options", "mesh", "group"))
def _search_sharded(split_model, options, mesh, group, params, bank, per_query):
    """Each device walks its queries in groups of ``group``, one vmapped search per group: the head then
    always sees batches of the same shape, whatever the device count, so the results are bit-identical
    on 1 or D devices (XLA may round a row differently in a batch of another size)."""
    def local(params, bank, queries):
        groups = jax.tree.map(lambda a: a.reshape(-1, group, *a.shape[1:]), queries)
        out = jax.lax.map(jax.vmap(lambda q: _search_one(split_model, options, params, bank, q)), groups)
        return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), out)

    axis = mesh.axis_names[0]
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(axis)), out_specs=P(axis),
                         check_vma=False)(params, bank, per_query)


def run_search(split_model, params, bank: CandidateBank, per_query: dict, options: SearchOptions,
               mesh: jax.sharding.Mesh | None = None) -> SearchResult:
    """Run the loop for Q queries, sharded over a 1-D mesh; returns numpy arrays.

    Args:
      split_model: a SplitModel (static); params its parameters.
      bank: the candidate bank shared by all queries (replicated).
      per_query: dict of arrays with leading axis Q:
        z (Q, H, W, D), ctx (pytree, leading Q), true (Q,), pred (Q,),
        center (Q, K, 2), score (Q, K), valid (Q, K), cells (Q, K, H, W) (query regions),
        cand_index (Q, M) bank rows, cand_valid (Q, M), has_refs (Q,) bool.
      options: :class:`SearchOptions`.
      mesh: 1-D mesh (None = all devices). Q is padded to a multiple of its size times the group
        (``min(SEARCH_GROUP, Q)`` queries, see ``_search_sharded``) with copies of the last query; the padding
        is dropped from the result.
    """
    mesh = sharding.device_mesh(mesh)
    n_queries = per_query["z"].shape[0]
    group = min(SEARCH_GROUP, n_queries)
    padded = sharding.pad_to(per_query, sharding.padded_length(n_queries, mesh.size * group))
    out = _search_sharded(split_model, options, mesh, group, params, bank, padded)
    return SearchResult(*(np.asarray(a)[:n_queries] for a in out))
