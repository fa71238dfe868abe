"""A self-contained HTML report of an explain directory (one PNG per query next to it).

For every query (up to ``max_queries`` per method) one figure shows:

- the query image with its Phi heatmap (on the predicted class ŷ) upsampled
  over it, and each replaced region outlined and numbered in edit order;
- each reference image the edits drew on, with its source regions outlined
  under the same numbers;
- the probability trajectory p_y and p_ŷ from before the first edit to after
  the last one.

Above them, a table per method: queries, validity, mean edits (regions and
cells, :mod:`fgvce_jax.metrics`), time per explanation, and the run's config.
"""
from __future__ import annotations

import html
import os
import shutil
import tempfile
import types
from pathlib import Path

import numpy as np

from fgvce_jax import store

_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def region_boxes(query_region, ref_region, n_edits: int, region_size: int, grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell boxes of each edit: (T', 4) ``(row0, col0, row1, col1)`` inclusive, for the query and
    the reference side, and (T',) bool (the edit kept at least one cell inside the grid).

    Uses the cell pairing of :func:`fgvce_jax.metrics.edited_cells` (cells outside the map dropped).
    """
    from fgvce_jax.metrics import edited_cells

    qc, rc, valid = edited_cells(np.asarray(query_region)[None], np.asarray(ref_region)[None],
                                 np.asarray([n_edits]), region_size, tuple(grid))
    qc, rc, valid = qc[0, :n_edits], rc[0, :n_edits], valid[0, :n_edits]

    def box(cells, ok):
        if not ok.any():
            return np.zeros(4, int)
        c = cells[ok]
        return np.concatenate([c.min(0), c.max(0)])

    return (np.array([box(qc[t], valid[t]) for t in range(n_edits)], int).reshape(-1, 4),
            np.array([box(rc[t], valid[t]) for t in range(n_edits)], int).reshape(-1, 4),
            valid.any(-1))


def _outline(ax, box, grid, size, colour, label):
    """Draw cell box ``(r0, c0, r1, c1)`` of an (H, W) grid over a ``size``-pixel image."""
    from matplotlib.patches import Rectangle

    sy, sx = size[0] / grid[0], size[1] / grid[1]
    r0, c0, r1, c1 = box
    ax.add_patch(Rectangle((c0 * sx - 0.5, r0 * sy - 0.5), (c1 - c0 + 1) * sx, (r1 - r0 + 1) * sy,
                           fill=False, edgecolor=colour, linewidth=2))
    ax.text(c0 * sx + 1, r0 * sy + 1, label, color="white", fontsize=8, va="top",
            bbox={"facecolor": colour, "pad": 1, "linewidth": 0})


def query_figure(path: Path, query_image, phi, edits: dict, reference_images: dict, class_names, region_size: int):
    """Write the PNG of one query (see the module docstring).

    Args:
      query_image: uint8 (S, S, 3); phi: (H, W) Phi on ŷ.
      edits: one row of the results table (``true``, ``pred``, ``n_edits``, ``edit_*`` lists,
        ``p_true_before``, ``p_pred_before``, ``success``, ``query_id``) plus ``query_region``,
        ``ref_region`` (T, 2) arrays.
      reference_images: reference index -> uint8 (S, S, 3).
    """
    from matplotlib.figure import Figure

    n = int(edits["n_edits"])
    grid = phi.shape
    q_boxes, r_boxes, ok = region_boxes(edits["query_region"], edits["ref_region"], n, region_size, grid)
    refs = list(dict.fromkeys(edits["edit_ref_index"]))
    fig = Figure(figsize=(2.6 * (2 + max(len(refs), 1)), 2.9), layout="constrained")
    axes = fig.subplots(1, 2 + max(len(refs), 1), squeeze=False)[0]
    size = query_image.shape[:2]
    ax = axes[0]
    ax.imshow(query_image)
    ax.imshow(phi, cmap="jet", alpha=0.4, extent=(-0.5, size[1] - 0.5, size[0] - 0.5, -0.5),
              interpolation="bilinear")
    for t in range(n):
        if ok[t]:
            _outline(ax, q_boxes[t], grid, size, _COLOURS[t % len(_COLOURS)], str(t + 1))
    ax.set_title(f"query {edits['query_id']}\ntrue {class_names[edits['true']]}, pred {class_names[edits['pred']]}",
                 fontsize=8)
    for j, r in enumerate(refs):
        ax = axes[1 + j]
        ax.imshow(reference_images[r])
        for t in range(n):
            if ok[t] and edits["edit_ref_index"][t] == r:
                _outline(ax, r_boxes[t], grid, reference_images[r].shape[:2], _COLOURS[t % len(_COLOURS)], str(t + 1))
        ax.set_title(f"reference {edits['edit_ref_id'][edits['edit_ref_index'].index(r)]}", fontsize=8)
    if not refs:
        axes[1].text(0.5, 0.5, "no edit", ha="center", va="center")
    for a in axes[:-1]:
        a.set_xticks([]), a.set_yticks([])
    ax = axes[-1]
    steps = np.arange(n + 1)
    ax.plot(steps, [edits["p_true_before"], *edits["edit_p_true"]], "o-", color="#3cb44b",
            label=f"p(true={class_names[edits['true']]})")
    ax.plot(steps, [edits["p_pred_before"], *edits["edit_p_pred"]], "s--", color="#e6194b",
            label=f"p(pred={class_names[edits['pred']]})")
    ax.set_ylim(-0.02, 1.02), ax.set_xticks(steps), ax.set_xlabel("edits"), ax.legend(fontsize=7)
    ax.set_title("success" if edits["success"] else "no counterfactual", fontsize=8)
    fig.savefig(path, dpi=80)


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else (
        f"{x:.3f}" if isinstance(x, float) else html.escape(str(x)))


def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _evaluation(directory: Path) -> str:
    """The metrics table of ``fgvce evaluate`` (``DIR/evaluation/metrics.json``), if it was run."""
    import json

    path = directory / "evaluation" / "metrics.json"
    if not path.exists():
        return "<p>Run <code>fgvce evaluate DIR</code> for the full metrics table (deletion/insertion, parts).</p>"
    return f"<h2>Metrics (fgvce evaluate)</h2>{_table(json.loads(path.read_text()))}"


_CSS = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "img{max-width:100%;border:1px solid #eee}.q{margin:1.5em 0}")


def write_report(directory, html_path=None, *, max_queries: int = 50) -> Path:
    """Write the report of explain output ``directory`` and return the HTML path.

    Args:
      directory: an ``fgvce explain --out`` directory (or one method's sub-directory).
      html_path: where to write (default ``directory/report.html``); the PNGs go to
        ``<stem>_files/`` next to it and are referenced relatively.
      max_queries: per method, the first queries drawn (all rows are counted in the tables).

    The figures are drawn into a temporary directory that replaces the old one only
    when complete, and the HTML is written last, atomically.
    """
    import json

    from fgvce_jax import data, metrics
    from fgvce_jax.evaluate import find_runs

    directory = Path(directory)
    dirs = list(find_runs(directory).values())
    html_path = Path(html_path) if html_path else directory / "report.html"
    files = html_path.parent / f"{html_path.stem}_files"
    html_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{files.name}.", dir=html_path.parent))
    try:
        summary_rows, sections, datasets = [], [], {}
        for d in dirs:
            cfg = store.read_manifest(d)["config"]
            method = cfg.get("method", d.name)
            table, arrays = store.read_results(d)
            rows = table.to_pylist()
            timing = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
            ex = types.SimpleNamespace(**arrays, region_size=rows[0]["region_size"]) if rows else None
            scores = metrics.summary(ex) if ex is not None else {}
            summary_rows.append({"method": method, "queries": len(rows), **scores,
                                 "s / explanation": timing.get("seconds_per_query")})
            key = (cfg["dataset"], cfg["split"], cfg["reference_split"], cfg["image_size"])
            if key not in datasets:
                q = data.load(cfg["dataset"], cfg["split"], image_size=cfg["image_size"])
                r = q if cfg["reference_split"] == cfg["split"] else data.load(
                    cfg["dataset"], cfg["reference_split"], image_size=cfg["image_size"])
                datasets[key] = (q, r)
            qds, rds = datasets[key]
            (tmp / method).mkdir()
            items = []
            for i, row in enumerate(rows[:max_queries]):
                row = {**row, "query_region": arrays["query_region"][i], "ref_region": arrays["ref_region"][i]}
                png = Path(method) / f"q{i:05d}.png"
                query_figure(tmp / png, qds.raw_image(row["query_index"]), arrays["query_phi"][i], row,
                             {r: rds.raw_image(r) for r in set(row["edit_ref_index"])}, qds.class_names,
                             row["region_size"])
                verdict = (f"fixed after {row['n_edits']} edit(s)" if row["success"]
                           else f"not fixed ({row['reason']}, {row['n_edits']} edit(s))")
                items.append(f"<div class='q'><h3>{html.escape(row['query_id'])}: "
                             f"{html.escape(row['true_name'])} predicted as {html.escape(row['pred_name'])}"
                             f" — {verdict}</h3><img src='{files.name}/{png.as_posix()}' "
                             f"alt='query {html.escape(row['query_id'])}'></div>")
            more = len(rows) - min(len(rows), max_queries)
            config_rows = [{"setting": k, "value": v} for k, v in sorted(cfg.items())]
            sections.append(f"<h2>{html.escape(method)}</h2>"
                            f"<details><summary>config</summary>{_table(config_rows)}</details>"
                            + "".join(items) + (f"<p>{more} more queries not drawn.</p>" if more else ""))
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>FG-VCE report</title>"
                f"<style>{_CSS}</style></head><body><h1>FG-VCE: why the model got these wrong</h1>"
                "<p>Each query: the misclassified image with its Shapley saliency Phi for the predicted "
                "class (red = evidence for the wrong class), the regions whose features were replaced "
                "(numbered in order), the correctly classified references they were taken from, and the "
                "probabilities of the true and predicted class after each replacement. The replaced "
                "regions are the features that caused the mistake.</p>"
                f"<h2>Summary</h2>{_table(summary_rows)}{_evaluation(directory)}"
                + "".join(sections) + "</body></html>")
        old = html_path.parent / f".{files.name}.old"
        shutil.rmtree(old, ignore_errors=True)  # left by a run killed at this point
        if files.exists():
            os.replace(files, old)
        os.replace(tmp, files)
        store.atomic_write(html_path, lambda f: f.write(page.encode()))
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return html_path
