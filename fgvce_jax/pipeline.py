"""Explain a whole split (SPEC 7): predictions, queries and references, Phi, search, shards.

Passes, each with its own progress bar:

1. ``f`` and ``g`` over the split and over the reference split, batched and
   sharded over a 1-D mesh of all devices: probabilities (N, C), predictions
   (N,) and pooled features (N, D). Cached in ``OUT/predictions-<split>.npz``, keyed by the weights, the
   split point, the preprocessing and the split's content fingerprint (``Dataset.fingerprint``).
2. Queries = the misclassified images of the split (or the given ids), in
   dataset order, at most ``limit``; references = the correctly classified
   images of the reference split whose class is the true class of some query
   (with ``reference_mode="nearest"``: only the union of each query's N nearest).
3. Phi of every reference on its own class, one reference at a time, cached in
   ``OUT/cache-reference-phi-<hash>.npz`` (:func:`reference_phi`): computed once
   for all methods and runs that share the weights, split and saliency settings (each row is keyed by the
   reference's id and a fingerprint of its features, so an image replaced under its id is recomputed);
   Phi of the queries on ŷ, per shard.
4. The batched counterfactual search, one shard of queries at a time.
5. Each shard written atomically (:mod:`fgvce_jax.store`); a re-run with the
   same arguments skips the shards the manifest lists, and one with a larger
   ``limit`` those whose queries are unchanged (:func:`shard_inputs`). The stored config holds the model's
   preprocessing and the content fingerprints of both splits: a directory written for other images is
   refused (``--overwrite`` replaces it).

Every random draw of an image comes from its own key, derived from the run's seed, the draw's stream, the
split and the image's id (:mod:`fgvce_jax.keys`), so a resumed, re-sharded or extended run reproduces an
uninterrupted one exactly. The file layout is in ``docs/output_format.md``.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fgvce_jax import counterfactual, data, models, multihost, progress, store
from fgvce_jax import keys as run_keys
from fgvce_jax.counterfactual import CounterfactualConfig, references
from fgvce_jax.counterfactual.config import flag, setting_flag, settings
from fgvce_jax.counterfactual.explain import ROLES, FeatureBatch, phi_and_samples, phi_stream, saliency_settings
from fgvce_jax.errors import FgvceError
from fgvce_jax.metrics import edits_in_regions, validity
from fgvce_jax.results import SCHEMA, check_writable, rendered_table, results_table
from fgvce_jax.shapley.local_screening import saves
from fgvce_jax.sharding import device_mesh, pad_to
from fgvce_jax.store import fingerprint

# How a reference's Phi is computed (its key: fgvce_jax.keys); part of the reference-Phi cache key.
REFERENCE_KEY = run_keys.DERIVATION + ", alone in its call"
SAVE_EVERY_S = 60.0  # the reference-Phi cache is rewritten at least this often during its pass


# --------------------------------------------------------------------------- pass 1
def _forward(split_model, params, images):
    """images (B,S,S,3) -> (probs (B,C), pooled (B,D) = mean over H', W' of z)."""
    z, ctx = split_model.encode(params, images)
    return jax.nn.softmax(split_model.head(params, z, ctx), -1), z.mean((1, 2))


_forward_jit = jax.jit(_forward, static_argnums=0)


def _encode(split_model, params, images):
    return split_model.encode(params, images)


_encode_jit = jax.jit(_encode, static_argnums=0)


def _batched(fn, split_model, params, dataset, indices, batch_size, mesh, desc, *, across_processes=False,
             show=True):
    """Apply ``fn(split_model, params, images)`` over ``dataset.images(indices)`` in sharded batches.

    Each device gets ``batch_size`` images per batch (a batch holds batch_size x devices), whatever the
    device count or the number of images: XLA may round a row differently in a batch of another shape, and
    this keeps the features of 1, D devices or P processes, and of any shard size, bit-identical. The last
    batch is padded and the padding dropped. With ``across_processes`` (every process calls it with the same
    arguments) batch j is computed by process j % P and the outputs gathered, so every process returns
    what one process would. ``show=False`` hides the progress bar (inside another pass's bar). Returns the
    outputs' pytree, concatenated (numpy).
    """
    batch = batch_size * mesh.devices.size  # every device gets batch_size rows, whatever the device count
    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    starts = np.arange(0, len(indices), batch)
    if not len(starts):
        raise FgvceError(f"{desc}: nothing to run over")
    owner = multihost.owners(len(starts)) if across_processes else np.full(len(starts), multihost.index())
    mine = starts[owner == multihost.index()]
    outs = []
    with progress.bar(total=sum(len(indices[i:i + batch]) for i in mine), desc=desc, unit="img", leave=False,
                      disable=multihost.index() > 0 or not show) as bar:
        for start in mine:
            idx = indices[start:start + batch]
            x = jax.device_put(pad_to(dataset.images(idx), batch), sharding)
            out = fn(split_model, params, x)
            outs.append(jax.tree.map(lambda a: np.asarray(a)[:len(idx)], out))
            bar.update(len(idx))
    if not outs:  # another process has every batch: only the shapes are needed here
        one = dataset.images(indices[:1])
        shapes = jax.eval_shape(lambda p, x: fn(split_model, p, x), params,
                                jax.ShapeDtypeStruct((batch, *one.shape[1:]), one.dtype))
        outs = [jax.tree.map(lambda a: np.zeros((0, *a.shape[1:]), a.dtype), shapes)]
    local = jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
    if not across_processes:
        return local
    leaves, tree = jax.tree.flatten(local)
    rows = np.repeat(owner, batch)[:len(indices)]
    full = multihost.gather_rows({f"{i:03d}": a for i, a in enumerate(leaves)}, rows)
    return jax.tree.unflatten(tree, [full[f"{i:03d}"] for i in range(len(leaves))])


def predict_split(split_model, params, dataset, *, batch_size, mesh, cache: Path, key: str,
                  overwrite: bool = False) -> dict[str, np.ndarray]:
    """Pass 1 for one split: ``{"label", "pred", "probs" (N,C), "pooled" (N,D)}``.

    Reuses ``cache`` when it was written for the same ``key`` (model, dataset,
    split, preprocessing, the split's content fingerprint); otherwise, with a notice if it was written for
    another key, computes and writes it atomically. Under several processes the
    batches are shared out (:mod:`fgvce_jax.multihost`) and process 0 writes the cache.
    """
    cached = None if overwrite else store.load_cache(cache, key)
    if multihost.all_true(cached is not None):
        return cached
    probs, pooled = _batched(_forward_jit, split_model, params, dataset, np.arange(len(dataset)),
                             batch_size, mesh, f"pass 1: predict {dataset.split}", across_processes=True)
    out = {"key": np.asarray(key), "label": dataset.labels.astype(np.int64),
           "pred": probs.argmax(-1).astype(np.int64), "probs": probs.astype(np.float32),
           "pooled": pooled.astype(np.float32)}
    if multihost.index() == 0:
        store.save_arrays(cache, out)
    return out


# --------------------------------------------------------------------------- pass 2
def select_queries(dataset, pred: np.ndarray, ids: Sequence[str] | None, limit: int | None) -> np.ndarray:
    """Dataset indices of the queries: misclassified images (or ``ids``), first ``limit``.

    A given id that is unknown, or correctly classified, is an FgvceError; one given twice is explained once
    (at its first place), with a notice.
    """
    if ids is None:
        q = np.flatnonzero(pred != dataset.labels)
    else:
        repeated = [s for s, n in collections.Counter(ids).items() if n > 1]
        if repeated and multihost.index() == 0:
            print(f"notice: query id(s) given more than once are explained once: {', '.join(repeated[:5])}",
                  file=sys.stderr)
        ids = list(dict.fromkeys(ids))
        where = {s: i for i, s in enumerate(dataset.ids)}
        missing = [s for s in ids if s not in where]
        if missing:
            raise FgvceError(f"unknown query id(s) in {dataset.name}/{dataset.split}: {', '.join(missing[:5])}")
        q = np.asarray([where[s] for s in ids], np.int64)
        right = [dataset.ids[i] for i in q if pred[i] == dataset.labels[i]]
        if right:
            raise FgvceError(f"query id(s) the model classifies correctly, nothing to explain: {', '.join(right[:5])}")
    return q[:limit] if limit is not None else q


def select_references(query_true: np.ndarray, query_pooled: np.ndarray, ref_pred: dict, draws: np.ndarray | None,
                      n_references: int, mode: str) -> np.ndarray:
    """Reference-split indices that any query can draw on (sorted).

    Eligible: correctly classified images whose class is some query's true class. Only the union of each
    query's ``n_references`` chosen by the engine's own rule
    (:func:`fgvce_jax.counterfactual.references.select_references`) is kept: the nearest, or with
    ``mode="random"`` those of highest ``draws`` (R,), each reference's own draw (:func:`reference_draws`).
    The engine, choosing N from this subset, then chooses what it would choose from all of them, and the
    references' Phi is computed only for these.
    """
    label, pred = ref_pred["label"], ref_pred["pred"]
    index, valid = references.select_references(
        jnp.asarray(query_pooled), jnp.asarray(query_true), jnp.asarray(ref_pred["pooled"]), jnp.asarray(label),
        jnp.asarray(pred), n=n_references, mode=mode, draws=None if draws is None else jnp.asarray(draws))
    return np.unique(np.asarray(index)[np.asarray(valid)])


def draws_note(config) -> dict:
    """Stored with a ``reference_mode="random"`` config: how each reference's draw is made. A directory written
    when the draws came from one key for the whole batch lacks it, and is refused instead of mixing the two."""
    return {"reference_draws": f"uniform(image key of (seed, {run_keys.REFERENCES}, split, id))"} \
        if config.reference_mode == "random" else {}


def artefact_note(config) -> dict:
    """``{"artefact": ...}``: the content fingerprint of the trained model a rendering method's parameters name
    (``RenderingMethod.artefact``), stored with its results; empty for the others."""
    method = counterfactual.methods.of(config)
    stamp = method.artefact() if method.flow == "render" else {}
    return {"artefact": stamp} if stamp else {}


def reference_draws(config, split: str, ids) -> np.ndarray | None:
    """(R,) float32 rank of each reference under ``reference_mode="random"``: a uniform draw from its own key
    (``keys.uniforms`` in stream ``keys.REFERENCES``), so the references a query gets do not depend on the
    shard, the ``--limit`` or the other queries; None for ``nearest``."""
    if config.reference_mode != "random":
        return None
    return np.asarray(run_keys.uniforms(config.seed, run_keys.REFERENCES, split, ids)) if len(ids) else \
        np.zeros(0, np.float32)


# --------------------------------------------------------------------------- passes 3-4
def _features(split_model, params, dataset, indices, labels, preds, batch_size, mesh, desc, show=True):
    """FeatureBatch for ``indices``: z, ctx from f; pooled = mean of z over H', W' (``show``: its bar)."""
    z, ctx = _batched(_encode_jit, split_model, params, dataset, indices, batch_size, mesh, desc, show=show)
    return FeatureBatch(z=jnp.asarray(z), ctx=jax.tree.map(jnp.asarray, ctx),
                        labels=jnp.asarray(labels), preds=jnp.asarray(preds),
                        pooled=jnp.asarray(z.mean((1, 2))))


def reference_phi(split_model, params, refs, ids, config, *, split: str, cache_dir: Path, weights: str, mesh,
                  query_maps: int = 0):
    """Phi (R, H', W') of each reference on its own class (None for methods without saliency), cached.

    Reference r's Phi is ``saliency.compute`` on r alone with its key (``keys.image_key(seed, keys.PHI, split,
    ids[r])``), so it is a
    function of (weights, split point, :func:`~fgvce_jax.counterfactual.explain.saliency_settings`, seed, key
    derivation) and of (id, features, class). The first group names the file
    ``cache_dir/cache-reference-phi-<hash>.npz`` and is stored in it as ``key``; its rows hold id, features
    fingerprint (:func:`fingerprint` of z and ctx), class and Phi. Matching rows are reused, the others
    computed and the file rewritten atomically (also every ``SAVE_EVERY_S`` seconds), keeping rows of other
    references. A damaged or foreign file is recomputed with a one-line notice.

    Under several processes the references to compute go round-robin; each process saves its rows to
    ``<cache>.process-<p>.npz`` as it goes, and the rows are gathered; process 0 folds every such file
    into the cache and removes them (a killed run's files are read back the next time).

    Args:
      refs: FeatureBatch of the R references; ids: (R,) their dataset ids (distinct).
      weights: :func:`fingerprint` of ``params``.
      query_maps: the query Phi maps this process computes after this pass (only for the ETA line, printed
        once two reference maps have been timed).
    """
    settings = saliency_settings(config)
    if settings is None:  # cve: none; random: its own cheap draws, from each reference's key
        return phi_and_samples(split_model, params, refs, refs.labels, config, mesh=mesh,
                               keys=run_keys.image_keys(config.seed, phi_stream(config), split, ids))[0]
    key = json.dumps({"weights": weights, "at": split_model.at, "saliency": settings, "seed": config.seed,
                      "split": split, "key": REFERENCE_KEY, "jax": jax.__version__, "backend": jax.default_backend()},
                     sort_keys=True)
    path = cache_dir / f"cache-reference-phi-{store.config_hash(json.loads(key))}.npz"
    z, ctx, labels = np.asarray(refs.z), jax.tree.map(np.asarray, refs.ctx), np.asarray(refs.labels)
    ids = [str(i) for i in ids]
    parts = sorted(cache_dir.glob(f"{path.stem}.process-*.npz"))
    rows = {}
    for p in [path, *parts]:
        rows.update(_read_reference_rows(store.load_cache(p, key), p))
    multihost.barrier(f"read {path.name}")  # every process has read the files before any is rewritten
    prints = [fingerprint((z[r], jax.tree.map(lambda a: a[r], ctx))) for r in range(len(ids))]
    todo = [r for r in range(len(ids)) if rows.get(ids[r], (None, None))[:2] != (prints[r], int(labels[r]))]
    stale = sum(ids[r] in rows for r in todo)
    if stale and multihost.index() == 0:
        print(f"pass 3: {stale} cached reference Phi maps in {path.name} no longer match their features or class; "
              "recomputing them", file=sys.stderr)
    several = multihost.count() > 1
    own = cache_dir / f"{path.stem}.process-{multihost.index()}.npz" if several else path
    mine, computed, used = multihost.mine(todo), {}, SamplesUsed()
    if multihost.index() == 0:
        print(f"plan: pass 3: {len(todo)} reference Phi maps to compute ({len(ids) - len(todo)} of {len(ids)} in "
              f"{path.name})" + (f", {len(mine)} of them here" if several else ""), file=sys.stderr)
    t0 = saved = time.perf_counter()
    for j, r in enumerate(progress.bar(mine, desc=f"pass 3: {config.method} reference Phi", unit="ref", leave=False,
                                       disable=multihost.index() > 0)):
        one = FeatureBatch(z[r:r + 1], jax.tree.map(lambda a: a[r:r + 1], ctx), labels[r:r + 1],
                           labels[r:r + 1], None)
        t_map = time.perf_counter()
        phi, samples = phi_and_samples(split_model, params, one, labels[r:r + 1], config,
                                       keys=run_keys.image_keys(config.seed, run_keys.PHI, split, ids[r:r + 1]),
                                       mesh=mesh)
        used.add(samples)
        computed[ids[r]] = rows[ids[r]] = (prints[r], int(labels[r]), np.asarray(phi, np.float32)[0])
        if j == 1 and multihost.index() == 0:  # the first map includes compilation
            per = time.perf_counter() - t_map
            left = len(mine) - 2 + query_maps
            progress.write(f"ETA: {per:.2f} s per Phi map after compilation; about {_minutes(per * left)} for the "
                           f"{len(mine) - 2} reference and {query_maps} query maps left here")
        if time.perf_counter() - saved > SAVE_EVERY_S or r == mine[-1]:
            _write_reference_rows(own, key, computed if several else rows)
            saved = time.perf_counter()
    if several:
        phi = multihost.gather_rows({"phi": np.stack([computed[ids[r]][2] for r in mine]) if mine else None},
                                    multihost.owners(len(todo)), {"phi": (z.shape[1:3], np.float32)})["phi"]
        rows.update({ids[r]: (prints[r], int(labels[r]), phi[j]) for j, r in enumerate(todo)})
    if multihost.index() == 0 and (parts or (several and todo)):  # fold the process files into the cache
        _write_reference_rows(path, key, rows)
        for p in cache_dir.glob(f"{path.stem}.process-*.npz"):
            p.unlink()
    if multihost.index() == 0:
        print(f"pass 3: Phi of {len(ids)} references ({len(ids) - len(todo)} from {path.name}) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    used.report("pass 3: reference Phi", config)
    return np.stack([rows[i][2] for i in ids])


class SamplesUsed:
    """Samples per window that ``--phi-tolerance`` sampling used, summed over this process's maps."""

    def __init__(self):
        self.samples = self.windows = 0

    def add(self, samples) -> None:
        """Count the (N, H, W) samples of one Phi call (None: fixed --samples, nothing to count)."""
        if samples is not None:
            self.samples += int(np.asarray(samples).sum())
            self.windows += int(np.asarray(samples).size)

    def report(self, what: str, config) -> None:
        """One line from process 0 with the mean over all processes (nothing without a tolerance)."""
        if config.phi_tolerance is None:
            return
        samples, windows = multihost.total(self.samples), multihost.total(self.windows)
        if windows and multihost.index() == 0:
            print(f"{what}: --phi-tolerance {config.phi_tolerance:g} used {samples / windows:.1f} samples per "
                  f"window on average, at most {config.samples} ({windows} windows)", file=sys.stderr)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _read_reference_rows(cached: dict | None, path: Path) -> dict:
    """{id: (fingerprint, class, Phi (H', W'))} of a loaded reference-Phi cache ({} if None or inconsistent)."""
    if cached is None:
        return {}
    try:
        ids, prints, labels, phi = (cached[k] for k in ("ids", "fingerprints", "labels", "phi"))
        if not len(ids) == len(prints) == len(labels) == len(phi) or phi.ndim != 3:
            raise ValueError("its arrays disagree in length")
    except (KeyError, ValueError) as e:
        print(f"cache {path} is damaged ({type(e).__name__}: {e}); recomputing it", file=sys.stderr)
        return {}
    return {str(i): (str(f), int(c), p) for i, f, c, p in zip(ids, prints, labels, phi)}


def _write_reference_rows(path: Path, key: str, rows: dict) -> None:
    ids = sorted(rows)
    store.save_arrays(path, {"key": np.asarray(key), "ids": np.asarray(ids),
                             "fingerprints": np.asarray([rows[i][0] for i in ids]),
                             "labels": np.asarray([rows[i][1] for i in ids], np.int64),
                             "phi": np.stack([rows[i][2] for i in ids])})


# --------------------------------------------------------------------------- driver
@dataclasses.dataclass(frozen=True)
class Summary:
    """What one method's run produced (also written to ``OUT/<method>/summary.json``)."""

    method: str
    queries: int
    success_rate: float
    mean_edits: float
    seconds_per_query: float

    def line(self) -> str:
        edits = "-" if np.isnan(self.mean_edits) else f"{self.mean_edits:.2f}"  # mean over successful queries
        return (f"{self.method}: {self.queries} queries, success {100 * self.success_rate:.1f}%, "
                f"mean edits {edits}, {self.seconds_per_query:.3f} s/explanation")


def summarise(directory: Path, method: str, seconds: float, computed: int) -> Summary:
    """Summary of the results in ``directory``; time per explanation counts this run's work only."""
    _, arrays = store.read_results(directory)
    n = len(arrays.get("success", ()))
    return Summary(method, n, validity(arrays["success"]) if n else 0.0,
                   edits_in_regions(arrays["n_edits"], arrays["success"]) if n else float("nan"),
                   seconds / computed if computed else 0.0)


def explain_split(model_dir, dataset: str, split: str, out_dir, configs, *,
                  reference_split: str = "train", queries: Sequence[str] | None = None,
                  limit: int | None = None, at: str | None = None, batch_size: int = 64,
                  shard_size: int = 64, overwrite: bool = False) -> list[Summary]:
    """Explain the misclassified images of ``dataset``/``split`` with each config, resumably.

    Args:
      model_dir: checkpoint written by ``fgvce train`` / ``models.save``.
      dataset, split, reference_split: names for :func:`fgvce_jax.data.load`.
      out_dir: output directory; each config's results go to ``out_dir/<method>/``.
      configs: a :class:`CounterfactualConfig` or a sequence of them (distinct methods).
      queries: dataset ids to explain instead of all misclassified images (each once).
      limit: explain at most this many queries (the first ones, in dataset order); not part of the stored config:
        a larger limit reuses the shards whose queries are unchanged, a smaller one than ``out_dir`` holds is
        refused.
      at: split point (default: the checkpoint's).
      batch_size: images per device in each forward batch (the last batch is padded to it). Results are
        bit-identical across device and process counts at one batch size; another batch size is another batch
        shape, which can change the features' last bits on some CPUs.
      shard_size: queries per result shard (part of the stored config).
      overwrite: replace results of a different config instead of refusing.

    Each method directory is locked (:class:`~fgvce_jax.store.ShardWriter`) until the run ends, on every path.

    Returns: one :class:`Summary` per config.
    """
    configs = [configs] if isinstance(configs, CounterfactualConfig) else list(configs)
    methods = [c.method for c in configs]
    if len(set(methods)) != len(methods):
        raise FgvceError(f"each method may be given once; got {', '.join(methods)}")
    for name, v in (("batch_size", batch_size), ("shard_size", shard_size), ("limit", limit)):
        if (v is not None or name != "limit") and (not isinstance(v, int) or v < 1):
            raise FgvceError(f"{flag(name)} must be a positive integer; got {v!r}")
    model_dir, out_dir = Path(model_dir).absolute(), Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise FgvceError(f"the output directory {out_dir} is an existing file; give a directory (--out)")
    if not model_dir.exists():
        raise FgvceError(f"model checkpoint {model_dir} does not exist (train one with `fgvce train`)")
    model, info = models.load(model_dir)
    split_model, params = models.split(model, at)
    at = split_model.at
    pre = data.Preprocessing.of_model(info)  # the checkpoint's preprocessing wins over the source's default
    ds = data.load(dataset, split, preprocessing=pre)
    ref_ds = ds if reference_split == split else data.load(dataset, reference_split, preprocessing=pre)
    check_classes(ds, info)
    mesh = device_mesh()  # 1-D over all devices, shared with the Shapley engine
    params = jax.device_put(params, NamedSharding(mesh, P()))
    out_dir.mkdir(parents=True, exist_ok=True)
    # Neither the checkpoint's path (moving it changes nothing; kept as a note) nor the limit (a larger one reuses
    # the shards whose queries are unchanged: _explain_method) is part of the config.
    run = {"weights": fingerprint(params), "at": at, "dataset": dataset, "split": split,
           "image_size": ds.preprocessing.image_size, "preprocessing": dataclasses.asdict(ds.preprocessing),
           "data": {split: ds.fingerprint, reference_split: ref_ds.fingerprint}, "reference_split": reference_split,
           "queries": list(dict.fromkeys(queries)) if queries else None,  # each once, as select_queries has them
           "shard_size": shard_size,
           # every image's key comes from (seed, stream, split, id) since schema 2; a directory of schema 1 is
           # refused in one line (results.check_writable) instead of mixing two kinds of shards
           "schema": SCHEMA, "keys": run_keys.DERIVATION}
    with contextlib.ExitStack() as locks:  # the writers' directory locks, released however the run ends
        # Opened before any work, so that a different config in out_dir is refused at once; by process 0 first.
        writers = []
        for turn in (0, 1):
            if (multihost.index() > 0) == turn:
                if not overwrite:
                    for c in configs:
                        check_writable(out_dir / c.method)
                writers = [locks.enter_context(store.ShardWriter(
                               out_dir / c.method, {**run, **settings(c), **draws_note(c), **artefact_note(c)},
                               overwrite=overwrite,
                               process=multihost.index(), processes=multihost.count(), notes={"model": str(model_dir)},
                               names={**{k: setting_flag(c, k) for k in settings(c) if k != "method"},
                                      **{k: flag(k) for k in RUN_FLAGS}, "reference_draws": "reference draws",
                                      "artefact": "the content of the method's trained model",
                                      "data": f"the images of {dataset} (content fingerprint by split)"}))
                           for c in configs]
                if overwrite and turn == 0:
                    for p in out_dir.glob("cache-reference-phi-*.npz"):
                        p.unlink()
            multihost.barrier(f"open {out_dir} {turn}")
        for w in writers:  # the same config lists the same queries: a directory holds a prefix of them
            held = max((s["stop"] for s in w.shards.values()), default=0)
            if limit is not None and held > limit:
                raise FgvceError(f"{w.dir} holds results of the first {held} queries, more than --limit {limit}; "
                                 f"give a --limit of at least {held}, pass --overwrite to replace them, "
                                 "or choose another output directory")

        t0 = time.perf_counter()
        preds = {}
        for s, d in {split: ds, reference_split: ref_ds}.items():
            key = json.dumps({"weights": run["weights"], "at": at, "dataset": dataset, "split": s,
                              "data": d.fingerprint, "preprocessing": run["preprocessing"]}, sort_keys=True)
            preds[s] = predict_split(split_model, params, d, batch_size=batch_size, mesh=mesh,
                                     cache=out_dir / f"predictions-{s}.npz", key=key, overwrite=overwrite)
        q_idx = select_queries(ds, preds[split]["pred"], queries, limit)
        if multihost.index() == 0:
            print(f"pass 1: {split} accuracy {np.mean(preds[split]['pred'] == ds.labels):.3f} on {len(ds)} images, "
                  f"{len(q_idx)} queries to explain ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)

        return [_explain_method(split_model, params, ds, ref_ds, preds[split], preds[reference_split], q_idx,
                                config, counterfactual.explain, writer, mesh=mesh, batch_size=batch_size, shard_size=shard_size,
                                weights=run["weights"])
                for config, writer in zip(configs, writers)]


def check_classes(ds, info) -> None:
    """FgvceError unless the dataset's classes are the checkpoint's. A checkpoint without class names (e.g.
    converted without ``--class-names``) is taken to be indexed like the dataset when the counts agree,
    with a notice."""
    if info.class_names is None:
        if len(ds.class_names) != info.num_classes:
            raise FgvceError(f"dataset {ds.name!r} has {len(ds.class_names)} classes but the checkpoint has "
                             f"{info.num_classes} outputs")
        print(f"notice: the checkpoint has no class names; output i is taken to be {ds.name}'s class i "
              f"({ds.class_names[0]!r}, ...)", file=sys.stderr)
        return
    if list(ds.class_names) != list(info.class_names):
        raise FgvceError(f"dataset {ds.name!r} has {len(ds.class_names)} classes that do not match "
                         f"the checkpoint's {len(info.class_names)}")


RUN_FLAGS = ("at", "dataset", "split", "reference_split", "queries")  # run keys a flag of `fgvce explain` sets


def screening_plan(config, n_windows: int) -> str:
    """The plan line's words on screening (empty when off): what each map keeps, or that it does not pay."""
    settings = {role: saliency_settings(config, role) or {} for role in ROLES}
    if "screen_samples" not in settings["query"]:
        return ""
    keep = {role: s["screen_keep"] if saves(n_windows, s["screen_keep"], config.screen_samples, config.samples)
            else None for role, s in settings.items()}
    if keep["query"] is None and keep["reference"] is None:
        return f" (--screen {config.screen_samples} would not save evaluations on this map: off)"
    words = {role: "all" if k is None else f"the top {k} of {n_windows}" for role, k in keep.items()}
    return (f" (screened: {config.screen_samples} samples per window first, then {config.samples} at "
            f"{words['query']} query and {words['reference']} reference windows)")


def _explain_method(split_model, params, ds, ref_ds, pred, ref_pred, q_idx, config, explain, writer, *,
                    mesh, batch_size, shard_size, weights) -> Summary:
    """Passes 2-5 for one config into ``writer.dir`` (resumes the shards already there). Under several
    processes each takes every P-th shard still to do; process 0 merges the manifests and writes the summary.
    A rendering method (``Method.flow == "render"``) explains each shard itself (:func:`_render_shards`);
    the others go through the region-swap engine (:func:`_swap_shards`)."""
    out = writer.dir
    n_shards = -(-len(q_idx) // shard_size)
    rows = min(shard_size, len(q_idx))  # every shard padded to this: one compilation
    bounds = {s: (s * shard_size, min((s + 1) * shard_size, len(q_idx))) for s in range(n_shards)}
    wanted = {s: (a, b, shard_inputs(ds.ids[q_idx[a:b]], rows))
              for s, (a, b) in bounds.items()}  # (start, stop, inputs) of every shard
    stale = writer.retain(wanted)
    if stale:
        if multihost.index() == 0:
            print(f"pass 4-5: {config.method}: shard(s) {', '.join(map(str, stale))} were computed for other "
                  "queries (another --limit); computing them again", file=sys.stderr)
        multihost.barrier(f"retain {out}")  # process 0 has unlisted them before any is written again
    todo = [s for s in range(n_shards) if s not in writer.done]
    mine = multihost.mine(todo)
    my_rows = sum(wanted[s][1] - wanted[s][0] for s in mine)  # queries this process explains
    if writer.done and multihost.index() == 0:
        print(f"pass 4-5: {config.method}: {n_shards - len(todo)} of {n_shards} shards were done already",
              file=sys.stderr)
    t0, computed = time.perf_counter(), 0
    if todo:
        args = (split_model, params, ds, pred, q_idx, config)
        plan = f"{len(q_idx)} queries in {n_shards} shards of {shard_size} ({n_shards - len(todo)} done)"
        shard, close = (_render_shards(*args, plan=plan)
                        if counterfactual.methods.get(config.method).flow == "render" else
                        _swap_shards(*args, ref_ds, ref_pred, explain, mesh=mesh, batch_size=batch_size,
                                     weights=weights, cache_dir=out.parent, my_rows=my_rows, plan=plan))
        several = multihost.count() > 1  # then the bar counts process 0's shards only
        with progress.bar(total=my_rows if several else len(q_idx), initial=0 if several else len(writer.done_rows()),
                          unit="query", desc=f"pass 4-5: {config.method} search" + (" (process 0's shards)" if several
                                                                                     else ""),
                          disable=multihost.index() > 0) as bar:
            for s in mine:
                start, stop, inputs = wanted[s]
                idx = q_idx[start:stop]
                table, arrays = shard(idx, pad_to(idx, rows))
                writer.write_shard(s, start, stop, table, arrays, inputs)
                computed += len(idx)
                bar.update(len(idx))
        close()
    multihost.barrier(f"shards of {out}")
    writer.merge()
    computed = multihost.total(computed)
    multihost.barrier(f"merged {out}")
    summary = summarise(out, config.method, time.perf_counter() - t0, computed)
    if not computed and (out / "summary.json").exists():  # all shards were there: keep the timing that made them
        previous = json.loads((out / "summary.json").read_text())
        summary = dataclasses.replace(summary, seconds_per_query=previous["seconds_per_query"])
    if multihost.index() == 0:
        store.atomic_write_json(out / "summary.json", dataclasses.asdict(summary))
        print(summary.line(), file=sys.stderr)
    multihost.barrier(f"summary of {out}")
    return summary


def _swap_shards(split_model, params, ds, pred, q_idx, config, ref_ds, ref_pred, explain, *, mesh, batch_size,
                 weights, cache_dir, my_rows, plan):
    """(shard, close) of the region-swap engine: ``shard(idx, padded) -> (table, arrays)`` after the references,
    their features and Phi (passes 2-3) are made here, computing per shard the queries' features, Phi and search
    (passes 4-5); ``close()`` reports the samples that tolerance sampling used, once every shard is written."""
    draws = reference_draws(config, ref_ds.split, ref_ds.ids)
    r_idx = (select_references(ds.labels[q_idx], pred["pooled"][q_idx], ref_pred, draws, config.n_references,
                               config.reference_mode) if len(q_idx) else np.zeros(0, np.int64))
    if len(r_idx) == 0:
        raise FgvceError(f"no correctly classified {ref_ds.split} images of the queries' classes to use as references")
    refs = _features(split_model, params, ref_ds, r_idx, ref_ds.labels[r_idx], ref_pred["pred"][r_idx],
                     batch_size, mesh, f"pass 3: {config.method} reference features")
    if multihost.index() == 0:
        print(f"plan: {config.method}: {plan}, {len(r_idx)} references, Phi windows {config.kernel}x{config.kernel} on a {refs.z.shape[1]}x{refs.z.shape[2]} "
              f"map, {config.samples} samples{screening_plan(config, refs.z.shape[1] * refs.z.shape[2])}, at most "
              f"{config.t_max} edits", file=sys.stderr)
    ref_phi = reference_phi(split_model, params, refs, ref_ds.ids[r_idx], config, split=ref_ds.split,
                            cache_dir=cache_dir, weights=weights, mesh=mesh, query_maps=my_rows)
    used = SamplesUsed()

    def shard(idx, padded):
        batch = _features(split_model, params, ds, padded, ds.labels[padded], pred["pred"][padded],
                          batch_size, mesh, "query features", show=False)
        q_keys = run_keys.image_keys(config.seed, phi_stream(config), ds.split, ds.ids[padded])
        q_phi, samples = phi_and_samples(split_model, params, batch, pred["pred"][padded], config,
                                         keys=q_keys, mesh=mesh, role="query")
        used.add(None if samples is None else np.asarray(samples)[:len(idx)])
        ex = explain(split_model, params, batch, refs, config, key=None,
                     query_phi=None if q_phi is None else jnp.asarray(q_phi),
                     reference_phi=None if ref_phi is None else jnp.asarray(ref_phi),
                     reference_draws=None if draws is None else jnp.asarray(draws[r_idx]), mesh=mesh)
        return results_table(ex.rows(len(idx)), idx, ds, r_idx, ref_ds)

    return shard, lambda: used.report("pass 4: query Phi", config)


def _render_shards(split_model, params, ds, pred, q_idx, config, *, plan):
    """(shard, close) of a rendering method: its artefact loaded once here (``Method.prepare``), then
    ``shard(idx, padded) -> (table, arrays)`` runs ``Method.explain_batch`` on the queries' images, true and
    predicted classes and keys (stream: the method's name), stored by :func:`fgvce_jax.results.rendered_table`;
    nothing to close."""
    method = counterfactual.methods.of(config)
    prepared = method.prepare(split_model, params, ds)
    if multihost.index() == 0:
        print(f"plan: {config.method}: {plan}, each explained with its {method.needs or 'own model'}",
              file=sys.stderr)

    def shard(idx, padded):
        keys = run_keys.image_keys(config.seed, config.method, ds.split, ds.ids[padded])
        r = method.explain_batch(prepared, split_model, params, ds.images(padded), ds.labels[padded],
                                 pred["pred"][padded], keys)
        return rendered_table(r, idx, ds, pred["pred"][idx])

    return shard, lambda: None


def shard_inputs(query_ids, rows: int) -> str:
    """Fingerprint of what a shard's results depend on besides the stored config; a listed shard is reused only
    when it is unchanged (so a larger --limit recomputes only the trailing partial shard and the new ones).

    That is the shard's query ids and the row count its batch is padded to (``min(shard_size, queries)``). The
    rest of the batch never matters: a query uses only its own N references (nearest, or of highest own draw,
    :func:`reference_draws`), which every reference batch of a run holds (:func:`select_references`), and each
    reference's Phi (from its own key, also for method ``random``) and candidates depend on it alone.
    """
    # "references": None keeps the fingerprints of shards written when random references depended on the batch
    return store.config_hash({"queries": [str(i) for i in query_ids], "rows": int(rows), "references": None})