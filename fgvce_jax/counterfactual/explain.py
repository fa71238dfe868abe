"""The one entry point of the counterfactual engine: :func:`explain`."""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fgvce_jax import keys as run_keys
from fgvce_jax import saliency, sharding
from fgvce_jax.counterfactual import methods
from fgvce_jax.counterfactual.config import CounterfactualConfig, resolved, screened
from fgvce_jax.counterfactual.references import build_bank, query_candidates, select_references
from fgvce_jax.counterfactual.search import SEARCH_GROUP, run_search
from fgvce_jax.errors import FgvceError


class FeatureBatch(NamedTuple):
    """Images already run through the split model's encoder.

    z: (N, H, W, D) feature maps; ctx: pytree of per-image arrays (leading N) the
    head needs ({} for CNNs); labels: (N,) true classes; preds: (N,) predicted
    classes; pooled: (N, D) pooled features (used to rank nearest references).
    """

    z: Any
    ctx: Any
    labels: Any
    preds: Any
    pooled: Any


@dataclasses.dataclass(frozen=True)
class Explanations:
    """One row per query; T = t_max edit slots, unused slots -1 / NaN / False.

    success (Q,) bool; n_edits (Q,) int32; reason (Q,) int32 (0 success, 1 t_max
    reached, 2 no (more) query regions, 3 no references, 4 candidates exhausted);
    true (Q,), pred (Q,) int32; query_region (Q, T, 2) int32 region centre (row, col);
    ref_row (Q, T) int32 row in ``references`` (-1: unused slot); ref_region (Q, T, 2) int32 centre of
    the reference region; similarity (Q, T) f32 cosine of the two region features;
    probs (Q, T, C) f32 softmax after each edit; probs_before (Q, C); edit_mask
    (Q, T, H, W) bool cells written by each edit; query_phi (Q, H, W) f32 (NaN for
    ``cve``); region_size int; method str.
    """

    success: np.ndarray
    n_edits: np.ndarray
    reason: np.ndarray
    true: np.ndarray
    pred: np.ndarray
    query_region: np.ndarray
    ref_row: np.ndarray
    ref_region: np.ndarray
    similarity: np.ndarray
    probs: np.ndarray
    probs_before: np.ndarray
    edit_mask: np.ndarray
    query_phi: np.ndarray
    region_size: int
    method: str
    extras: dict = dataclasses.field(default_factory=dict)

    def rows(self, n: int) -> "Explanations":
        """The first ``n`` rows (drops a padded batch's padding)."""
        return dataclasses.replace(self, extras={k: v[:n] for k, v in self.extras.items()},
                                   **{f.name: getattr(self, f.name)[:n] for f in dataclasses.fields(self)
                                      if isinstance(getattr(self, f.name), np.ndarray)})


def _check(queries: FeatureBatch, references: FeatureBatch, query_phi, reference_phi, num_classes) -> None:
    if np.ndim(queries.z) != 4:
        raise FgvceError(f"query features must be (N, H, W, D); got shape {np.shape(queries.z)}")
    n_q, *grid_dim = np.shape(queries.z)
    if n_q == 0:
        raise FgvceError("no queries to explain")
    for name, batch in (("query", queries), ("reference", references)):
        n = np.shape(batch.z)[0]
        if np.ndim(batch.z) != 4 or (n and list(np.shape(batch.z)[1:]) != grid_dim):
            raise FgvceError(f"{name} features must be (N, {', '.join(map(str, grid_dim))}); "
                             f"got shape {np.shape(batch.z)}")
        for field in ("labels", "preds"):
            if np.shape(getattr(batch, field)) != (n,):
                raise FgvceError(f"{name} {field} must have shape ({n},); got {np.shape(getattr(batch, field))}")
        if np.shape(batch.pooled) != (n, grid_dim[2]):
            raise FgvceError(f"{name} pooled features must have shape ({n}, {grid_dim[2]}); "
                             f"got {np.shape(batch.pooled)}")
    for name, values in (("query labels", queries.labels), ("query preds", queries.preds)):
        if num_classes is not None and np.any((np.asarray(values) < 0) | (np.asarray(values) >= num_classes)):
            raise FgvceError(f"{name} must lie in 0..{num_classes - 1}")
    if np.any(np.asarray(queries.labels) == np.asarray(queries.preds)):
        raise FgvceError("every query must be misclassified (label != pred)")
    for name, phi, n in (("query_phi", query_phi, n_q), ("reference_phi", reference_phi, np.shape(references.z)[0])):
        if phi is not None and np.shape(phi) != (n, *grid_dim[:2]):
            raise FgvceError(f"{name} must have shape ({n}, {grid_dim[0]}, {grid_dim[1]}); got {np.shape(phi)}")


def _take(tree, index):
    return jax.tree.map(lambda a: jnp.asarray(a)[index], tree)


ROLES = ("query", "reference")


def regions_read(config: CounterfactualConfig, role: str) -> int:
    """How many regions of a ``role`` map the search reads: K = ``max_regions`` of a query, the top
    ``candidates_per_reference`` of a reference."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return config.max_regions if role == "query" else config.candidates_per_reference


def saliency_settings(config: CounterfactualConfig, role: str = "reference") -> dict | None:
    """The keyword settings of ``saliency.compute`` for ``config.method`` and a ``role`` map (None: the method
    has no saliency).

    With the images, their classes, the weights and the key they decide a Phi, so they are part of the
    reference-Phi cache key (``pipeline.reference_phi``); ``outside``, ``paired`` and ``budget`` are given
    explicitly for that reason. Under ``screen_samples`` a map keeps the full estimate at
    ``screen_margin x K x r^2`` windows, K = :func:`regions_read` (``fgvce_jax.shapley.local_screening``).
    """
    method = methods.get(config.method).saliency
    if method is None:
        return None
    settings = dict(method=method, kernel=config.kernel, samples=config.samples, baseline=config.baseline,
                    output=config.output, outside=config.outside if method == "local" else "absent", paired=True,
                    budget=None)
    if method == "local" and config.phi_tolerance is not None:
        settings["tolerance"] = float(config.phi_tolerance)
    if method == "local" and config.stratified:  # left out when off, so that older caches keep their keys
        settings["stratified"] = True
    if config.head_dtype != "float32":  # left out otherwise, so that float32 caches keep their keys
        settings["dtype"] = config.head_dtype
    if screened(config):  # likewise left out when off
        settings["screen_samples"] = config.screen_samples
        settings["screen_keep"] = config.screen_margin * regions_read(config, role) * config.region_size ** 2
    return settings


TOLERANCE_ROUND = 8  # samples per window and round of tolerance sampling (capped at ``samples``)


def phi_stream(config: CounterfactualConfig) -> str:
    """The key stream (``fgvce_jax.keys``) of ``config``'s Phi: ``keys.PHI`` for a saliency, shared by every
    method with the same settings, or the method's own name for maps it draws itself."""
    return run_keys.PHI if methods.get(config.method).saliency else config.method


def compute_phi(split_model, params, batch: FeatureBatch, classes, config, *, keys, mesh, role="reference"):
    """Phi (N, H, W) of ``batch`` on ``classes`` for ``config.method`` (None if it has none), image i drawing
    from ``keys[i]``, for maps of ``role`` (``"query"`` or ``"reference"``: what screening keeps,
    :func:`saliency_settings`)."""
    return phi_and_samples(split_model, params, batch, classes, config, keys=keys, mesh=mesh, role=role)[0]


def phi_and_samples(split_model, params, batch: FeatureBatch, classes, config, *, keys, mesh, role="reference"):
    """(:func:`compute_phi`'s Phi, the samples each window used (N, H, W) int under ``phi_tolerance``, else None).

    The one function that computes Phi for a batch: the method's own maps (``Method.own_phi``) or its saliency
    with :func:`saliency_settings`."""
    own = methods.of(config).own_phi(keys, tuple(np.shape(batch.z)[1:3]))
    settings = saliency_settings(config, role)
    if own is not None or settings is None:
        return own, None
    z, ctx, classes = jnp.asarray(batch.z), _take(batch.ctx, slice(None)), jnp.asarray(classes)
    if "tolerance" in settings:
        out = saliency.compute_to_tolerance(
            split_model, params, z, ctx, classes, kernel=settings["kernel"], tolerance=settings["tolerance"],
            keys=keys, max_samples=settings["samples"], round_samples=min(TOLERANCE_ROUND, settings["samples"]),
            baseline=settings["baseline"], output=settings["output"], dtype=settings.get("dtype", "float32"),
            mesh=mesh)
        return out.phi, out.samples
    return saliency.compute(split_model, params, z, ctx, classes, keys=keys, mesh=mesh, **settings), None


def _phis(split_model, params, queries, references, config, key, query_phi, reference_phi, mesh):
    """Query Phi (Q, H, W) on the predicted class and reference Phi (R, H, W) on each reference's own class,
    NaN for a method without Phi. Row i of each batch draws from ``fold_in(k, i)``, k one half of ``key`` (of
    ``keys.stream_key(seed, method)`` for a method that draws its own maps, so they follow ``config.seed``);
    computed for the whole reference bank, so a reference's Phi depends only on its row."""
    grid = tuple(np.shape(queries.z)[1:3])
    own = methods.get(config.method).saliency is None
    base = run_keys.stream_key(config.seed, config.method) if own else key
    if base is None and (query_phi is None or reference_phi is None):
        raise FgvceError(f"{config.method} needs a PRNG key (key) to compute the Phi that was not given")
    k_query, k_ref = jax.random.split(base) if base is not None else (None, None)
    out = []
    for phi, batch, classes, k, role in ((query_phi, queries, queries.preds, k_query, "query"),
                                          (reference_phi, references, references.labels, k_ref, "reference")):
        n = np.shape(batch.z)[0]
        if phi is None:
            phi = compute_phi(split_model, params, batch, classes, config, keys=run_keys.row_keys(k, n), mesh=mesh,
                              role=role)
        out.append(jnp.full((n, *grid), jnp.nan, jnp.float32) if phi is None else jnp.asarray(phi, jnp.float32))
    return tuple(out)


def _draws(given, n_refs: int, has_bank: bool, config) -> jax.Array | None:
    """The (R,) random-mode rank of each reference row (None for ``nearest``), see :func:`explain`."""
    if config.reference_mode != "random":
        return None
    if given is None or not has_bank:
        return jax.random.uniform(jax.random.key(config.seed), (n_refs,))
    if np.shape(given) != (n_refs,):
        raise FgvceError(f"reference_draws must be one value per reference, shape ({n_refs},); got {np.shape(given)}")
    return jnp.asarray(given, jnp.float32)


def _with_placeholder(references: FeatureBatch, queries: FeatureBatch) -> FeatureBatch:
    """An empty reference bank becomes one never-eligible reference (label -1), so
    every array keeps a non-zero size."""
    if np.shape(references.z)[0]:
        return references
    return FeatureBatch(jnp.zeros_like(jnp.asarray(queries.z)[:1]), _take(queries.ctx, slice(0, 1)),
                        jnp.array([-1]), jnp.array([-2]), jnp.zeros_like(jnp.asarray(queries.pooled)[:1]))


HEAD_ACTIVATION_FACTOR = 8  # live activations of one head call, in feature maps (deep heads keep several)


def default_chunk_size(map_shape: tuple[int, int, int], n_queries: int) -> int:
    """Head calls scored at once per query when the config gives no ``chunk_size``.

    The candidates of a group of queries searched together (``min(SEARCH_GROUP, Q)``, see
    ``search._search_sharded``) are scored together, so the memory budget of
    :func:`fgvce_jax.sharding.memory_budget` is split over them:
    budget / (group * 4 bytes * H * W * D * HEAD_ACTIVATION_FACTOR). It does not depend on the device
    count, so neither do the results.
    """
    per_call = 4 * int(np.prod(map_shape)) * HEAD_ACTIVATION_FACTOR
    group = min(SEARCH_GROUP, max(1, n_queries))
    return max(1, sharding.memory_budget() // (per_call * group))


def explain(split_model, params, queries: FeatureBatch, references: FeatureBatch,
            config: CounterfactualConfig, *, key: jax.Array, query_phi=None, reference_phi=None,
            reference_draws: jax.Array | None = None, mesh: jax.sharding.Mesh | None = None) -> Explanations:
    """Counterfactual explanations of misclassified queries (SPEC 5).

    For each query (true y, predicted y_hat != y): Phi on y_hat is partitioned into
    regions; its N references (correct images of class y) contribute their top
    regions on class y as candidates; the search replaces query regions with
    candidates until the stop rule holds or t_max edits are made.

    Args:
      split_model, params: from ``fgvce_jax.models.split``.
      queries, references: :class:`FeatureBatch`; ``references`` may be empty.
      config: :class:`CounterfactualConfig` (``method`` picks FG-VCE, a baseline or any registered method).
      key: PRNG key for the Phi not given (row i of a batch uses ``fold_in(k, i)``, k derived from it);
        ``config.seed`` seeds the random choices.
      query_phi: optional (Q, H, W) precomputed Phi of the queries on their predicted class.
      reference_phi: optional (R, H, W) Phi of every reference on its own class
        (computed for every row of ``references`` when not given).
      reference_draws: optional (R,) float rank of each reference for ``reference_mode="random"``
        (default: ``uniform(key(config.seed), (R,))``, one draw per row; the pipeline passes each
        reference's draw from its own key, ``keys.uniforms``).
      mesh: 1-D device mesh for the search (None = all devices).

    Returns:
      :class:`Explanations` (numpy arrays; see docs/counterfactual.md).
    """
    _check(queries, references, query_phi, reference_phi, getattr(split_model, "num_classes", None))
    method, config = methods.of(config), resolved(config)
    has_bank = np.shape(references.z)[0] > 0
    bank_src = _with_placeholder(references, queries)
    n_q = np.shape(queries.z)[0]
    ref_index, ref_valid = select_references(
        jnp.asarray(queries.pooled), jnp.asarray(queries.labels), jnp.asarray(bank_src.pooled),
        jnp.asarray(bank_src.labels), jnp.asarray(bank_src.preds), n=config.n_references,
        mode=config.reference_mode, draws=_draws(reference_draws, np.shape(bank_src.z)[0], has_bank, config))
    options = method.search_options(config)
    if options.chunk_size is None:
        options = options._replace(chunk_size=default_chunk_size(np.shape(queries.z)[1:], n_q))

    r_given = reference_phi if has_bank else np.zeros(np.shape(bank_src.z)[:3], np.float32)
    q_phi, r_phi = _phis(split_model, params, queries, bank_src, config, key, query_phi, r_given, mesh)
    regions = method.query_regions(config, q_phi)
    center, valid = method.reference_candidates(config, r_phi)
    bank = build_bank(jnp.asarray(bank_src.z), center, valid, region_size=options.region_size)
    cand_index, cand_valid = query_candidates(ref_index, ref_valid, bank.valid, center.shape[1])

    per_query = dict(z=jnp.asarray(queries.z), ctx=_take(queries.ctx, slice(None)),
                     true=jnp.asarray(queries.labels, jnp.int32), pred=jnp.asarray(queries.preds, jnp.int32),
                     center=regions.center, score=regions.score, valid=regions.valid, cells=regions.cells,
                     cand_index=cand_index, cand_valid=cand_valid, has_refs=jnp.any(ref_valid, axis=1))
    out = run_search(split_model, params, bank, per_query, options, mesh)

    used = out.region >= 0
    slot = np.maximum(out.region, 0)
    row = np.maximum(out.candidate, 0)
    q_center = np.take_along_axis(np.asarray(regions.center), slot[..., None], axis=1)
    return Explanations(
        success=out.success, n_edits=out.n_edits.astype(np.int32), reason=out.reason,
        true=np.asarray(queries.labels, np.int32), pred=np.asarray(queries.preds, np.int32),
        query_region=np.where(used[..., None], q_center, -1).astype(np.int32),
        ref_row=np.where(used, np.asarray(bank.ref)[row], -1).astype(np.int32),
        ref_region=np.where(used[..., None], np.asarray(bank.center)[row], -1).astype(np.int32),
        similarity=out.similarity, probs=out.probs, probs_before=out.probs_before, edit_mask=out.edit_mask,
        query_phi=np.asarray(q_phi), region_size=options.region_size, method=config.method,
        extras={k: np.asarray(v) for k, v in method.per_query(config, np.asarray(q_phi), regions).items()})
