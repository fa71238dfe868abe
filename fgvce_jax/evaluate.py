"""Tables of SPEC 6 metrics from explanations: one row per method, as in the paper's tables.

Two layers:

- :func:`summarise` works on in-memory ``Explanations``-like objects (one per
  method), optional RISE curves per saliency method and optional part masks.
- :func:`evaluate_directory` reads an ``fgvce explain`` output directory
  (``DIR/<method>/`` written by :mod:`fgvce_jax.pipeline`), recomputes what it
  needs (query images, model probabilities, Grad-CAM, part masks) and writes
  ``table.md``, ``table.csv``, ``metrics.json`` and ``curves.png``.

Columns: validity, edits (regions), edits (cells), deletion AUC, insertion AUC,
Del-Ins, with parts Near-KP, Same-KP, Part IoU, coverage, misleading, and on
data with part masks and known causes (a :class:`~fgvce_jax.data.Dataset` whose
``part_masks`` and ``cause_parts`` are given, e.g. ``birds``) cause precision
and cause recall (:mod:`fgvce_jax.metrics.causes`).
Metric definitions: ``docs/metrics.md``.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fgvce_jax import data, models, progress, saliency, store
from fgvce_jax.completeness import warn_partial
from fgvce_jax.counterfactual import methods
from fgvce_jax.errors import FgvceError
from fgvce_jax.metrics import causes as cause_metrics
from fgvce_jax.metrics import counterfactual as cf_metrics
from fgvce_jax.metrics import parts as part_metrics
from fgvce_jax.metrics import rise, validity
from fgvce_jax.data.dataset import positions_of
from fgvce_jax.results import StoredExplanations, find_runs, is_rendered, load_run
from fgvce_jax.sharding import device_mesh, pad_to

COLUMNS = {  # key -> header (arrows: which direction is better)
    "validity": "Validity ↑",
    "edits_regions": "Edits (regions) ↓",
    "edits_cells": "Edits (cells) ↓",
    "deletion_auc": "Deletion AUC ↓",
    "insertion_auc": "Insertion AUC ↑",
    "del_ins": "Del-Ins ↑",
    "near_kp": "Near-KP ↑",
    "same_kp": "Same-KP ↑",
    "part_iou": "Part IoU ↑",
    "coverage": "Coverage ↑",
    "misleading": "Misleading ↓",
    "cause_precision": "Cause precision ↑",
    "cause_recall": "Cause recall ↑",
}
CF_COLUMNS = ("validity", "edits_regions", "edits_cells")
RISE_COLUMNS = ("deletion_auc", "insertion_auc", "del_ins")
GRADCAM = "gradcam"
PAPER_TABLES = {  # the paper's tables: name -> (methods in this order, None: every region-swap one; columns)
    "main": (("fgvce", GRADCAM, "gradient", "cve"), (*CF_COLUMNS, *RISE_COLUMNS)),
    # full, w/o saliency partition (global Shapley), w/o Shapley (gradient), single-step, random regions
    "ablation": (("fgvce", "global", "gradient", "single-step", "random"), (*CF_COLUMNS, *RISE_COLUMNS)),
    "localisation": (None, (*part_metrics.NAMES, *cause_metrics.NAMES)),
}


def method_order() -> tuple[str, ...]:
    """The order of methods in tables and reports: the registered counterfactual methods in registration order
    (``fgvce_jax.counterfactual.methods``), then Grad-CAM."""
    return (*methods.names(), GRADCAM)


def _ordered(names) -> list[str]:
    names, order = list(dict.fromkeys(names)), method_order()
    return [m for m in order if m in names] + sorted(m for m in names if m not in order)


def summarise(explanations_by_method: Mapping[str, object], *,
              curves_by_method: Mapping[str, rise.RiseCurves] | None = None,
              parts_by_method: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
              causes_by_method: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> list[dict]:
    """One row per method with the metrics of SPEC 6.

    Args:
      explanations_by_method: method -> Explanations-like (see
        :mod:`fgvce_jax.metrics.counterfactual`).
      curves_by_method: method -> :class:`~fgvce_jax.metrics.rise.RiseCurves`
        of that method's saliency maps; may name attribution-only methods
        (``gradcam``), whose counterfactual columns are NaN.
      parts_by_method: method -> (query_parts (Q, P, H, W), reference_parts
        (R, P, H, W)) bool, CUB-format data only.
      causes_by_method: method -> (query part cells (Q, P, H, W) bool, cause parts (Q, P) bool), data with
        known causes only (:func:`fgvce_jax.metrics.causes.cause_metrics`).

    Returns:
      list of dicts ``{"method": str, "queries": int, <column>: float}``, in
      :func:`method_order`; only the column groups that were given appear.
    """
    curves_by_method = dict(curves_by_method or {})
    parts_by_method = dict(parts_by_method or {})
    causes_by_method = dict(causes_by_method or {})
    rows = []
    for method in _ordered([*explanations_by_method, *curves_by_method]):
        row: dict = {"method": method}
        e = explanations_by_method.get(method)
        row["queries"] = int(np.shape(e.success)[0]) if e is not None else (
            int(curves_by_method[method].deletion.shape[0]))
        row.update(cf_metrics.summary(e) if e is not None else dict.fromkeys(CF_COLUMNS, math.nan))
        if curves_by_method:
            c = curves_by_method.get(method)
            row.update(dict.fromkeys(RISE_COLUMNS, math.nan) if c is None else {
                "deletion_auc": float(c.deletion_auc.mean()), "insertion_auc": float(c.insertion_auc.mean()),
                "del_ins": float(c.del_ins.mean())})
        if parts_by_method:
            p = parts_by_method.get(method)
            row.update(dict.fromkeys(part_metrics.NAMES, math.nan) if (p is None or e is None)
                       else part_metrics.part_metrics(e, *p))
        if causes_by_method:
            c = causes_by_method.get(method)
            row.update(dict.fromkeys(cause_metrics.NAMES, math.nan) if (c is None or e is None)
                       else cause_metrics.cause_metrics(e, *c))
        rows.append(row)
    return rows


def header(column: str) -> str:
    """A metric's table header: :data:`COLUMNS`, or a rendering method's ``metric_columns``."""
    if column in COLUMNS:
        return COLUMNS[column]
    return next((m.metric_columns[column] for m in map(methods.get, methods.names())
                 if column in getattr(m, "metric_columns", {})), column)


def _columns(rows: list[dict]) -> list[str]:
    """The metric keys of ``rows`` (all but method and queries): :data:`COLUMNS` order first, then the others
    as they first appear."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("method", "queries")))
    return [c for c in COLUMNS if c in keys] + [c for c in keys if c not in COLUMNS]


def _fmt(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def to_markdown(rows: list[dict]) -> str:
    """GitHub-Markdown tables: rows = methods, NaN shown as '–'. Rows with the same metrics share a table
    (the region-swap methods; each rendering method has metrics of its own, so a table of its own)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(_columns([r])), []).append(r)
    tables = []
    for cols, group in groups.items():
        lines = ["| Method | Queries | " + " | ".join(header(c) for c in cols) + " |",
                 "|---|---:|" + "---:|" * len(cols)]
        lines += [f"| {r['method']} | {r['queries']} | " + " | ".join(_fmt(r[c]) for c in cols) + " |"
                  for r in group]
        tables.append("\n".join(lines) + "\n")
    return "\n".join(tables)


def to_csv(rows: list[dict]) -> str:
    """CSV with a header of metric keys (every row's); NaN and a metric a method does not have left empty."""
    cols = ["method", "queries", *_columns(rows)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None or (isinstance(r[c], float) and math.isnan(r[c])) else r[c]
                    for c in cols])
    return buf.getvalue()


def paper_tables(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of :func:`summarise` cut into :data:`PAPER_TABLES`: per table, the rows of its methods that were
    evaluated, in the table's order, with ``method``, ``queries`` and those of its columns the rows have; a table
    none of whose columns was computed (no parts: no localisation) is left out."""
    by_method = {r["method"]: r for r in rows}
    out = {}
    for name, (names, columns) in PAPER_TABLES.items():
        present = [c for c in columns if rows and c in rows[0]]
        if present:
            out[name] = [{k: by_method[m][k] for k in ("method", "queries", *present)}
                         for m in (methods.names("swap") if names is None else names) if m in by_method]
    return out


def tables_markdown(tables: Mapping[str, list[dict]]) -> str:
    """The tables of :func:`paper_tables` as Markdown, one ``## <name>`` section each (:func:`to_markdown`)."""
    return "\n".join(f"## {name}\n\n{to_markdown(rows)}" for name, rows in tables.items())


def plot_curves(curves_by_method: Mapping[str, rise.RiseCurves]) -> bytes:
    """PNG bytes: mean deletion (left) and insertion (right) curves per method, AUC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for method in _ordered(curves_by_method):
        c = curves_by_method[method]
        for ax, y, a in ((axes[0], c.deletion, c.deletion_auc), (axes[1], c.insertion, c.insertion_auc)):
            ax.plot(np.linspace(0, 1, y.shape[1]), y.mean(0), label=f"{method} (AUC {a.mean():.3f})")
    for ax, title in zip(axes, ("Deletion", "Insertion")):
        ax.set(title=title, xlabel="fraction of pixels", xlim=(0, 1))
        ax.legend(fontsize=8)
    axes[0].set_ylabel("probability of the explained class")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def json_rows(rows: list[dict]) -> list[dict]:
    """``rows`` with NaN as None (JSON null)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]


def write_outputs(rows: list[dict], out_dir, curves_by_method=None) -> list[Path]:
    """Atomically write table.md, table.csv, metrics.json (and curves.png) into ``out_dir``."""
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"table.md": to_markdown(rows).encode(), "table.csv": to_csv(rows).encode()}
    if curves_by_method:
        files["curves.png"] = plot_curves(curves_by_method)
    for name, content in files.items():
        store.atomic_write(out_dir / name, lambda f, d=content: f.write(d))
    store.atomic_write_json(out_dir / "metrics.json", json_rows(rows))
    return [out_dir / n for n in (*files, "metrics.json")]


# --------------------------------------------------------------------------- explain directories
def by_id(e: StoredExplanations, ds, ref_ds=None) -> StoredExplanations:
    """``e`` with ``query_split_index`` (and ``ref_split_index``, given ``ref_ds``) re-derived from the stored
    image ids in today's datasets (``positions_of``): positions alone would point at other images once a dataset
    changes."""
    out = dataclasses.replace(e, query_split_index=positions_of(ds, e.query_id, "query images"))
    if ref_ds is not None:
        used = e.ref_split_index >= 0
        ref_split_index = np.full(e.ref_split_index.shape, -1, np.int64)
        ref_split_index[used] = positions_of(ref_ds, e.ref_id[used], "reference images")
        out = dataclasses.replace(out, ref_split_index=ref_split_index)
    return out


RUN_KEYS = ("model", "at", *data.RUN_KEYS)


def _shared_run(configs: Mapping[str, dict]) -> dict:
    """The run-level settings every method shares (model, data); FgvceError if they differ."""
    first = next(iter(configs.values()))
    for method, c in configs.items():
        diff = [k for k in RUN_KEYS if c.get(k) != first.get(k)]
        if diff:
            raise FgvceError(f"methods were run on different settings ({', '.join(diff)}); "
                             f"evaluate them separately (e.g. {method})")
    return {k: first.get(k) for k in RUN_KEYS}


def _part_grids(annotations, n_types: int, grid) -> np.ndarray:
    """List of PartAnnotation (or None: no parts) -> (len, P, H, W) bool masks on the grid."""
    empty = np.zeros((n_types, *grid), bool)
    return np.stack([empty if a is None else a.grid(grid) for a in annotations]) if annotations else (
        np.zeros((0, n_types, *grid), bool))


def _predict(split_model, params, images):
    """Softmax probabilities of the full classifier: images (B, S, S, 3) -> (B, C)."""
    return jax.nn.softmax(split_model.logits(params, images), -1)


def _gradcam(split_model, params, images, classes, mesh):
    """Grad-CAM maps (B, H, W) on the split's feature map, via :func:`fgvce_jax.saliency.compute`.

    ``params`` must be replicated on ``mesh`` (saliency shards its work over it).
    """
    z, ctx = split_model.encode(params, images)
    return np.asarray(saliency.compute(split_model, params, z, ctx, classes, method=GRADCAM,
                                       key=jax.random.key(0), mesh=mesh))


def rise_for_runs(split_model, params, dataset, explanations_by_method, *, steps: int = 50,
                  chunk_size: int = 64, batch_size: int = 16, gradcam: bool = True) -> dict[str, rise.RiseCurves]:
    """RISE curves of each method's query Phi (on ŷ) and, with ``gradcam``, of Grad-CAM.

    Methods without a saliency map (``cve``: query_phi is NaN) are skipped.
    Grad-CAM uses the queries of the first method; it runs on a 1-D mesh of
    all devices (as :func:`fgvce_jax.sharding.device_mesh`), the curves on one.
    """
    predict = functools.partial(_predict, split_model)
    jobs = {m: (e.query_split_index, np.asarray(e.query_phi), np.asarray(e.pred))
            for m, e in explanations_by_method.items() if not np.isnan(np.asarray(e.query_phi)).any()}
    if gradcam and explanations_by_method:
        e = next(iter(explanations_by_method.values()))
        jobs[GRADCAM] = (e.query_split_index, None, np.asarray(e.pred))
        mesh = device_mesh()
        replicated = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    out = {}
    for method, (index, phi, classes) in jobs.items():
        dele, ins = [], []
        for s in progress.bar(range(0, len(index), batch_size), desc=f"evaluate: {method} deletion/insertion",
                              unit="batch", leave=False):
            n = min(batch_size, len(index) - s)
            # the last batch is padded to a full one (no recompilation) and the padding dropped
            rows = pad_to(np.arange(s, s + n), batch_size)
            images = jnp.asarray(dataset.images(index[rows]))
            cls = classes[rows]
            if phi is None:
                maps = _gradcam(split_model, replicated, images, jnp.asarray(cls), mesh)
            else:
                maps = phi[rows]
            c = rise.deletion_insertion(predict, images, maps, cls, params=params, steps=steps, chunk_size=chunk_size)
            dele.append(c.deletion[:n])
            ins.append(c.insertion[:n])
        out[method] = rise.RiseCurves(np.concatenate(dele), np.concatenate(ins))
    return out


def evaluate_directory(directory, out=None, *, steps: int = 50, chunk_size: int = 64, batch_size: int = 16,
                       use_rise: bool = True, gradcam: bool = True, parts: bool = True) -> tuple[list[dict], list[Path]]:
    """Evaluate every method found in an explain output directory and write the tables.

    Args:
      directory: ``--out`` of ``fgvce explain`` (or one ``<method>`` sub-directory).
      out: where to write (default ``DIR/evaluation``).
      steps, chunk_size: RISE steps and curve images per model call.
      batch_size: query images loaded at once.
      use_rise: compute deletion / insertion (needs the model checkpoint and the images).
      gradcam: add a Grad-CAM row to the RISE comparison.
      parts: compute part metrics when the dataset has part annotations, and cause precision / recall
        when it has part masks and known causes.

    Returns:
      (rows, written files).
    """
    runs = find_runs(directory)
    warn_partial(runs, "the evaluation")
    loaded = {m: load_run(d) for m, d in progress.bar(runs.items(), desc="evaluate: reading results", unit="method",
                                                      leave=False)}
    explanations = {m: e for m, (e, c) in loaded.items() if not is_rendered(c)}
    rendered = {m: (e, c) for m, (e, c) in loaded.items() if is_rendered(c)}
    run = _shared_run({m: c for m, (_, c) in loaded.items()})
    curves, part_masks, causes, rendered_rows = None, None, None, []
    if explanations and (use_rise or parts) or rendered:
        for key in ("dataset", "split"):
            if not run.get(key):
                raise FgvceError(f"the explain manifest does not name the {key}; pass --no-rise --no-parts")
        ds = data.load_as_run(run, run["split"])
    if explanations and (use_rise or parts):
        ref_ds = None
        if parts:
            ref_split = run.get("reference_split") or run["split"]
            ref_ds = ds if ref_split == run["split"] else data.load_as_run(run, ref_split)
        explanations = {m: by_id(e, ds, ref_ds) for m, e in explanations.items()}
        if parts:
            part_masks = _parts_for_runs(ds, ref_ds, explanations)
            causes = causes_for_runs(ds, explanations)
        if use_rise:
            split_model, params = _model(run, "pass --no-rise")
            curves = rise_for_runs(split_model, params, ds, explanations, steps=steps, chunk_size=chunk_size,
                                   batch_size=batch_size, gradcam=gradcam)
    if rendered:
        split_model, params = _model(run, "a rendering method's metrics need it")
        for m, (e, c) in rendered.items():
            method = methods.get(m)(stored_params(m, c))
            rendered_rows.append({"method": m, "queries": int(len(e.success)), "validity": validity(e.success),
                                  **method.metrics(split_model, params, ds, e)})
    rows = summarise(explanations, curves_by_method=curves, parts_by_method=part_masks, causes_by_method=causes)
    rows += rendered_rows
    out = Path(out) if out is not None else Path(directory) / "evaluation"
    return rows, write_outputs(rows, out, curves)


def _model(run: dict, why: str):
    """(split model, params) of the explain run's checkpoint at its split point; FgvceError naming ``why`` when
    the checkpoint is not there."""
    model_dir = Path(run.get("model") or "")
    if not (model_dir.is_absolute() and model_dir.exists()):
        raise FgvceError(f"model checkpoint {model_dir} of the explain run is not there; {why}")
    model, _ = models.load(model_dir)
    return models.split(model, run.get("at"))


def stored_params(method: str, config: dict):
    """Method ``method``'s ``Params`` as stored in a run ``config`` (its ``params.<name>`` keys)."""
    cls = methods.get(method).Params
    return cls(**{f.name: config[f"params.{f.name}"] for f in dataclasses.fields(cls) if f"params.{f.name}" in config})


def _parts_for_runs(ds, ref_ds, explanations_by_method) -> dict | None:
    """method -> (query part masks, reference part masks indexed by ref_split_index); None without parts.

    Only the referenced rows of the reference mask array are filled.
    """
    annotations = {}
    for method, e in explanations_by_method.items():
        used = np.unique(e.ref_split_index[e.ref_split_index >= 0])
        images = [(ds, i) for i in e.query_split_index] + [(ref_ds, i) for i in used]
        found = [d.parts(int(i)) for d, i in progress.bar(images, desc=f"evaluate: {method} part annotations",
                                                          unit="image", leave=False)]
        annotations[method] = (found[:len(e.query_split_index)], used, found[len(e.query_split_index):])
    named = [a for q, _, r in annotations.values() for a in (*q, *r) if a is not None]
    if not named:
        return None
    n_types = len(named[0].names)
    out = {}
    for method, (q_ann, used, r_ann) in annotations.items():
        grid = cf_metrics.grid_of(explanations_by_method[method])
        rp = np.zeros((int(used.max()) + 1 if used.size else 1, n_types, *grid), bool)
        rp[used] = _part_grids(r_ann, n_types, grid)
        out[method] = (_part_grids(q_ann, n_types, grid), rp)
    return out


def causes_for_runs(ds, explanations_by_method) -> dict | None:
    """method -> (query part cells (Q, P, H, W) bool, cause parts (Q, P) bool) for
    :func:`fgvce_jax.metrics.causes.cause_metrics`; None when ``ds`` has no part masks or no known causes.

    Query i's part cells are :func:`fgvce_jax.metrics.causes.cell_parts` of ``ds.part_masks(query_split_index[i])``
    on the method's grid; its causes are ``ds.cause_parts(true[i], pred[i])``. Each image's masks are read once.
    """
    if ds.part_names is None or ds.cause_parts(0, 0) is None:
        return None
    masks: dict[int, np.ndarray] = {}
    out = {}
    for method, e in explanations_by_method.items():
        index = np.asarray(e.query_split_index, np.int64)
        for i in progress.bar([i for i in dict.fromkeys(index.tolist()) if i not in masks],
                              desc=f"evaluate: {method} part masks", unit="image", leave=False):
            masks[i] = ds.part_masks(i)
        grid = cf_metrics.grid_of(e)
        cells = (cause_metrics.cell_parts(np.stack([masks[i] for i in index.tolist()]), grid) if index.size
                 else np.zeros((0, len(ds.part_names), *grid), bool))
        out[method] = (cells, np.asarray(ds.cause_parts(e.true, e.pred), bool).reshape(len(index), -1))
    return out
