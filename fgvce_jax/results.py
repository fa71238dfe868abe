"""The explain-output schema's one owner: ``Explanations`` -> Parquet/npz shard rows, reading a run back, finding
the runs of a directory, and the schema version (``docs/output_format.md``).

Schema versions (``config.schema`` of ``manifest.json``; absent = 1):

- 1: query Phi keys per shard; every config field stored for every method.
- 2: every image's key from (seed, stream, split, id) (:mod:`fgvce_jax.keys`); each method stores only the
  settings that decide its results, with the values it ran with (``cve``: ``region_size`` 1); a method's
  own per-query arrays after the common columns; the fields that hold dataset positions are named for the
  split they index (``query_split_index``, ``ref_split_index``, ``edit_ref_split_index``; version 1 called
  them ``query_index``, ``ref_index``, ``edit_ref_index``).

Both read (:func:`read` gives version 1's fields their version 2 names); only version 2 is written, and a run
never adds to a directory of another version.
"""
from __future__ import annotations

import json
from pathlib import Path
import dataclasses

import numpy as np
import pyarrow as pa

from fgvce_jax import store
from fgvce_jax.counterfactual.search import REASONS
from fgvce_jax.errors import FgvceError

SCHEMA = 2
READABLE = (1, 2)
RENAMED_IN_2 = {"query_index": "query_split_index", "ref_index": "ref_split_index",
                "edit_ref_index": "edit_ref_split_index"}  # version 1 name -> version 2 name


def schema_of(manifest: dict) -> int:
    """The schema version of a parsed manifest (1 when it names none)."""
    return manifest.get("config", {}).get("schema", 1)


def check_readable(run_dir) -> dict:
    """The stored config of ``run_dir``; FgvceError (one line) for a schema this version cannot read."""
    manifest = store.read_manifest(run_dir)
    version = schema_of(manifest)
    if version not in READABLE:
        raise FgvceError(f"{run_dir} holds explain-output schema {version}; this fgvce reads schemas "
                         f"{', '.join(map(str, READABLE))}: read it with the fgvce that wrote it")
    return manifest["config"]


def check_writable(run_dir: Path) -> None:
    """FgvceError (one line) if ``run_dir`` holds results of another schema than :data:`SCHEMA`: this version
    cannot add to them."""
    path = Path(run_dir) / store.MANIFEST
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text())
        version, shards = schema_of(manifest), manifest["shards"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return  # the writer names the damaged manifest
    if version != SCHEMA and shards:
        raise FgvceError(f"{run_dir} holds results of explain-output schema {version}; this fgvce writes schema "
                         f"{SCHEMA} and cannot add to them: pass --overwrite to replace them or choose another "
                         "output directory")


def results_table(ex, query_idx, query_ds, ref_idx, ref_ds) -> tuple[pa.Table, dict]:
    """Explanations of one shard -> (Parquet table, arrays) in the layout of ``docs/output_format.md``: the
    common columns, then the method's own per-query arrays (``ex.extras``; 1-D ones also as Parquet columns).

    ``query_idx`` (Q,) are the queries' positions in their split, and ``ref_idx`` maps ``ex.ref_row`` (rows of
    the references batch) to positions in the reference split.
    """
    q, t_max = len(query_idx), ex.ref_row.shape[1]
    true, pred = np.asarray(ex.true, np.int64), np.asarray(ex.pred, np.int64)
    n_edits = np.asarray(ex.n_edits, np.int32)
    ref_split = np.where(ex.ref_row >= 0, ref_idx[np.maximum(ex.ref_row, 0)], -1).astype(np.int64)
    rows = np.arange(q)[:, None]
    p_true = np.asarray(ex.probs, np.float32)[rows, np.arange(t_max)[None], true[:, None]]
    p_pred = np.asarray(ex.probs, np.float32)[rows, np.arange(t_max)[None], pred[:, None]]
    before = np.asarray(ex.probs_before, np.float32)
    names = np.asarray(query_ds.class_names)

    def edits(a):  # (Q, T) -> list of the first n_edits entries per row
        return [a[i, :n_edits[i]].tolist() for i in range(q)]

    columns = {
        "query_split_index": pa.array(query_idx, pa.int64()),
        "query_id": pa.array(query_ds.ids[query_idx].tolist(), pa.string()),
        "true": pa.array(true, pa.int32()), "true_name": pa.array(names[true].tolist(), pa.string()),
        "pred": pa.array(pred, pa.int32()), "pred_name": pa.array(names[pred].tolist(), pa.string()),
        "success": pa.array(np.asarray(ex.success, bool)),
        "reason": pa.array([REASONS[int(r)] for r in ex.reason], pa.string()),
        "n_edits": pa.array(n_edits, pa.int32()),
        "region_size": pa.array(np.full(q, ex.region_size), pa.int32()),
        "p_true_before": pa.array(before[np.arange(q), true], pa.float32()),
        "p_pred_before": pa.array(before[np.arange(q), pred], pa.float32()),
        "edit_query_row": pa.array(edits(ex.query_region[..., 0]), pa.list_(pa.int32())),
        "edit_query_col": pa.array(edits(ex.query_region[..., 1]), pa.list_(pa.int32())),
        "edit_ref_split_index": pa.array(edits(ref_split), pa.list_(pa.int64())),
        "edit_ref_id": pa.array([ref_ds.ids[r].tolist() for r in edits(ref_split)], pa.list_(pa.string())),
        "edit_ref_row": pa.array(edits(ex.ref_region[..., 0]), pa.list_(pa.int32())),
        "edit_ref_col": pa.array(edits(ex.ref_region[..., 1]), pa.list_(pa.int32())),
        "edit_similarity": pa.array(edits(np.asarray(ex.similarity, np.float32)), pa.list_(pa.float32())),
        "edit_p_true": pa.array(edits(p_true), pa.list_(pa.float32())),
        "edit_p_pred": pa.array(edits(p_pred), pa.list_(pa.float32())),
    }
    arrays = {"query_split_index": np.asarray(query_idx, np.int64), "success": np.asarray(ex.success, bool),
              "n_edits": n_edits, "true": true, "pred": pred,
              "query_region": np.asarray(ex.query_region, np.int32), "ref_split_index": ref_split,
              "ref_region": np.asarray(ex.ref_region, np.int32),
              "similarity": np.asarray(ex.similarity, np.float32),
              "probs": np.asarray(ex.probs, np.float32), "probs_before": before,
              "edit_mask": np.asarray(ex.edit_mask, bool), "query_phi": np.asarray(ex.query_phi, np.float32)}
    for name, values in getattr(ex, "extras", {}).items():  # the method's own per-query arrays (Method.per_query)
        if name in columns or name in arrays or np.shape(values)[:1] != (q,):
            raise ValueError(f"method {ex.method!r}: per-query array {name!r} clashes with a common column or "
                             f"does not have {q} rows")
        arrays[name] = np.asarray(values)
        if np.ndim(values) == 1:
            columns[name] = pa.array(np.asarray(values))
    return pa.table(columns), arrays


def rendered_table(r, query_idx, query_ds, pred) -> tuple[pa.Table, dict]:
    """A rendering method's :class:`~fgvce_jax.counterfactual.methods.Rendered` for one shard -> (Parquet table,
    arrays): the common columns (query, true and predicted class ``pred`` (Q,), success, reason, n_edits), then
    the method's columns ((Q,) as scalars, (Q, T) as lists) and, in the npz only, its arrays. Rows past Q (the
    shard's padding) are dropped."""
    q = len(query_idx)
    true, pred = np.asarray(query_ds.labels[query_idx], np.int64), np.asarray(pred, np.int64)[:q]
    names = np.asarray(query_ds.class_names)
    success, n_edits = np.asarray(r.success, bool)[:q], np.asarray(r.n_edits, np.int32)[:q]
    columns = {
        "query_split_index": pa.array(query_idx, pa.int64()),
        "query_id": pa.array(query_ds.ids[query_idx].tolist(), pa.string()),
        "true": pa.array(true, pa.int32()), "true_name": pa.array(names[true].tolist(), pa.string()),
        "pred": pa.array(pred, pa.int32()), "pred_name": pa.array(names[pred].tolist(), pa.string()),
        "success": pa.array(success), "reason": pa.array([str(x) for x in np.asarray(r.reason)[:q]], pa.string()),
        "n_edits": pa.array(n_edits, pa.int32()),
    }
    arrays = {"query_split_index": np.asarray(query_idx, np.int64), "success": success, "n_edits": n_edits,
              "true": true, "pred": pred}
    for kind, extra in (("column", r.columns), ("array", r.arrays)):
        for name, values in extra.items():
            values = np.asarray(values)[:q]
            if name in columns or name in arrays or values.shape[:1] != (q,) or (kind == "column" and values.ndim > 2):
                raise ValueError(f"per-query {kind} {name!r} clashes with a common column or does not have {q} rows"
                                 + (" of at most two dimensions" if kind == "column" else ""))
            arrays[name] = values
            if kind == "column":
                columns[name] = (pa.array(list(values), pa.list_(pa.from_numpy_dtype(values.dtype))) if values.ndim == 2
                                 else pa.array(values))
    return pa.table(columns), arrays


EXPLANATION_ARRAYS = ("query_split_index", "success", "n_edits", "true", "pred", "query_region",
                      "ref_split_index", "ref_region", "query_phi")


def read(run_dir) -> tuple[dict, pa.Table, dict[str, np.ndarray]]:
    """(stored config, table, arrays) of one run directory in this schema's names, whichever readable version
    wrote it: :func:`check_readable`, then the completed shards (``store.read_results``), version 1's fields
    renamed (:data:`RENAMED_IN_2`)."""
    config = check_readable(run_dir)
    table, arrays = store.read_results(run_dir)
    if schema_of({"config": config}) == 1:
        table = table.rename_columns([RENAMED_IN_2.get(c, c) for c in table.column_names])
        arrays = {RENAMED_IN_2.get(k, k): v for k, v in arrays.items()}
    return config, table, arrays


@dataclasses.dataclass
class StoredExplanations:
    """One method's explanations as stored (Q queries, T edit slots; unused slots -1 / NaN).

    query_split_index (Q,) int64 and query_id (Q,) str: each query's position and id in its split.
    success, n_edits, true, pred (Q,); query_region, ref_region (Q, T, 2) int32 centres of the edited regions;
    ref_split_index (Q, T) int64 and ref_id (Q, T) str ("" in unused slots): the reference image of each edit,
    by position and id in the reference split; query_phi (Q, H, W) float32 (NaN for methods without Phi);
    edit_mask (Q, T, H, W) bool or None (older runs); region_size, method: the run's.
    """
    query_split_index: np.ndarray
    success: np.ndarray
    n_edits: np.ndarray
    true: np.ndarray
    pred: np.ndarray
    query_region: np.ndarray
    ref_split_index: np.ndarray
    ref_region: np.ndarray
    query_phi: np.ndarray
    query_id: np.ndarray
    ref_id: np.ndarray
    region_size: int
    method: str
    edit_mask: np.ndarray | None = None


@dataclasses.dataclass
class StoredRendered:
    """A rendering method's explanations as stored (Q queries): query_split_index (Q,) int64, query_id (Q,) str,
    success, n_edits, true, pred (Q,); table: the Parquet rows (its own columns included); arrays: every npz
    array (its own images and curves included); method: its name."""
    query_split_index: np.ndarray
    query_id: np.ndarray
    success: np.ndarray
    n_edits: np.ndarray
    true: np.ndarray
    pred: np.ndarray
    table: pa.Table
    arrays: dict
    method: str


def is_rendered(config: dict) -> bool:
    """Whether a stored config is a rendering method's (its rows are not region swaps)."""
    return config.get("flow", "swap") == "render"


def find_runs(directory) -> dict[str, Path]:
    """method -> run directory: ``DIR`` itself if it holds a manifest, else every ``DIR/*/manifest.json``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FgvceError(f"{directory} is not a directory")
    dirs = [directory] if (directory / store.MANIFEST).exists() else sorted(
        p.parent for p in directory.glob(f"*/{store.MANIFEST}"))
    if not dirs:
        raise FgvceError(f"{directory} holds no explain results (no {store.MANIFEST}); run `fgvce explain` first")
    runs = {}
    for d in dirs:
        method = store.read_manifest(d).get("config", {}).get("method", d.name)
        if method in runs:
            raise FgvceError(f"method {method!r} appears twice, in {runs[method]} and {d}")
        runs[method] = d
    return runs


def load_run(run_dir) -> tuple[StoredExplanations | StoredRendered, dict]:
    """(explanations, stored config) of one ``DIR/<method>`` written by the pipeline (:func:`read`): a
    :class:`StoredRendered` for a rendering method, else :class:`StoredExplanations`."""
    config, table, arrays = read(run_dir)
    if is_rendered(config):
        return stored_rendered(config, table, arrays, run_dir), config
    return stored_explanations(config, table, arrays, run_dir), config


def stored_rendered(config: dict, table: pa.Table, arrays: dict, run_dir) -> StoredRendered:
    """The :class:`StoredRendered` of what :func:`read` returned for a rendering method's ``run_dir``."""
    common = ("query_split_index", "success", "n_edits", "true", "pred")
    missing = [k for k in common if k not in arrays]
    if missing:
        raise FgvceError(f"{run_dir} has no completed shards or lacks arrays: {', '.join(missing)}")
    return StoredRendered(**{k: arrays[k] for k in common}, table=table, arrays=arrays,
                          query_id=np.asarray(table.column("query_id").to_pylist(), dtype=str),
                          method=config.get("method", ""))


def stored_explanations(config: dict, table: pa.Table, arrays: dict, run_dir) -> StoredExplanations:
    """The :class:`StoredExplanations` of what :func:`read` returned for ``run_dir`` (named in errors). The
    region size is the one each row ran with (the ``region_size`` column), which version 1's config could
    misstate (``cve`` stored the user's value)."""
    missing = [k for k in EXPLANATION_ARRAYS if k not in arrays]
    if missing:
        raise FgvceError(f"{run_dir} has no completed shards or lacks arrays: {', '.join(missing)}")
    sizes = set(table.column("region_size").to_pylist() if "region_size" in table.column_names
                else [config.get("region_size", 1)])
    if len(sizes) != 1:
        raise FgvceError(f"{run_dir}: the shards ran with different region sizes {sorted(sizes)}")
    return StoredExplanations(**{k: arrays[k] for k in EXPLANATION_ARRAYS}, edit_mask=arrays.get("edit_mask"),
                              region_size=int(sizes.pop()), method=config.get("method", ""),
                              query_id=np.asarray(table.column("query_id").to_pylist(), dtype=str),
                              ref_id=_ref_ids(table, arrays["ref_split_index"]))


def _ref_ids(table, ref_split_index: np.ndarray) -> np.ndarray:
    """str (Q, T): the reference id of each edit slot ("" where ``ref_split_index`` is -1), from the rows'
    lists."""
    out = np.full(ref_split_index.shape, "", dtype=object)
    for q, ids in enumerate(table.column("edit_ref_id").to_pylist()):
        out[q, :len(ids)] = ids
    return out.astype(str)
