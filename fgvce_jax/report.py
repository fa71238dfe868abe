"""A self-contained HTML report of an explain directory (one PNG per query next to it; no scripts, no CDN).

The page, top to bottom:

- a warning for every method whose run did not finish (:mod:`fgvce_jax.completeness`);
- what the figures show, and what a fixed / not fixed query does and does not tell;
- a summary table per method and, when ``fgvce evaluate`` was run, its metric table, every column
  named in words with the direction that is better;
- one section per method, in :func:`fgvce_jax.evaluate.method_order`: its config, an index of its
  queries grouped by confusion (true -> predicted) with counts, a fixed / not fixed filter
  (CSS ``:target``), and per query (anchor ``<method>-q<row>``) the figure of
  :func:`fgvce_jax.figures.query_figure` and a table of its edits (similarity, p(true), p(pred)).
- on data with part masks (a Dataset whose ``part_names`` is set, e.g. ``birds``), per query also the
  image with each part's mask outlined in its colour (:func:`parts_image`), a legend naming the parts
  (hidden ones and, with known causes, the parts in which the true and predicted classes differ) and,
  per edit, the parts it touched (:func:`touched_parts`).
"""
from __future__ import annotations

import functools
import html
import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from fgvce_jax import data, metrics, progress, results, store
from fgvce_jax.completeness import Completeness, queries_text, read_summary, warn_partial
from fgvce_jax.data.dataset import positions_of
from fgvce_jax.errors import FgvceError
from fgvce_jax.counterfactual import methods
from fgvce_jax.evaluate import CF_COLUMNS, _ordered, header, stored_params
from fgvce_jax.figures import _COLOURS, _cells, enlarge, query_figure
from fgvce_jax.metrics.causes import cell_parts

_WORDS = {"↑": "(higher is better)", "↓": "(lower is better)"}
_LABELS = {"method": "method", "queries": "queries explained", "run": "run",
           "seconds_per_query": "seconds per explanation (lower is better)"}
_INTRO = (
    "<p>For each image the model misclassified (the <em>query</em>), a method replaces regions of the query's "
    "feature map, one per edit, with the matching regions of correctly classified <em>reference</em> images, "
    "until the search's stop rule holds (config <code>stop</code>: the model predicts the true class, or no "
    "longer the predicted one) or it gives up. Per query: the query image; its saliency map Phi for the "
    "predicted class (red: evidence for it, blue: against, white: none; the colour bar gives the values); the "
    "counterfactual, i.e. the query with each replaced region's reference pixels pasted in, outlined and numbered "
    "in edit order (the edits act on features, the pasted pixels show where they came from); and per edit the "
    "similarity of the two regions and p(true), p(pred) after it. The margin is p(true) &minus; p(pred) after the "
    "last edit.</p><p><b>Fixed</b> means the stop rule held: the replaced regions are a change that suffices to "
    "flip this model's decision, evidence of what it relied on, not proof of the cause. <b>Not fixed</b> means "
    "the search found no such change within its budget; its edits show what was tried and explain nothing.</p>")
_CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em;line-height:1.4}"
    "table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee}"
    ".q{margin:1.5em 0;padding-top:.5em;border-top:1px solid #ddd}"
    ".warn{background:#fff3cd;border:1px solid #e0a800;padding:.5em 1em;margin:1em 0}"
    ".fixed{color:#1a7f37}.notfixed{color:#b42318}.index li{margin:.2em 0}"
    ".swatch{display:inline-block;width:.9em;height:.9em;margin:0 .2em 0 .6em;vertical-align:middle}"
    ".only-fixed:target .q[data-fixed=no],.only-notfixed:target .q[data-fixed=yes]{display:none}")


# --------------------------------------------------------------------------- numbers and tables
def margin(row: dict) -> float:
    """p(true) - p(pred) after the last edit of a result row (before any edit when it made none)."""
    if row["n_edits"]:
        return float(row["edit_p_true"][-1] - row["edit_p_pred"][-1])
    return float(row["p_true_before"] - row["p_pred_before"])


def label(key: str) -> str:
    """A metric key in words with the better direction: ``validity`` -> ``Validity (higher is better)``."""
    if key in _LABELS:
        return _LABELS[key]
    text = header(key)
    return " ".join(_WORDS.get(w, w) for w in text.split(" "))


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else (
        f"{x:.3f}" if isinstance(x, float) else html.escape(str(x)))


def _table(rows: list[dict], head=lambda k: html.escape(k)) -> str:
    """An HTML table of dict rows (columns: every key, in first-seen order; header cells ``head(key)``)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    heads = "".join(f"<th>{head(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{heads}</tr>{body}</table>"


def _metric_table(rows: list[dict]) -> str:
    return _table(rows, lambda k: html.escape(label(k)))


def _evaluation(directory: Path) -> str:
    """The metrics table of ``fgvce evaluate`` (``DIR/evaluation/metrics.json``), if it was run."""
    path = directory / "evaluation" / "metrics.json"
    if not path.exists():
        return "<p>Run <code>fgvce evaluate DIR</code> for the full metrics table (deletion/insertion, parts).</p>"
    return f"<h2>Metrics (fgvce evaluate)</h2>{_metric_table(json.loads(path.read_text()))}"


def _warning(text: str) -> str:
    return f"<div class='warn'><b>Warning:</b> {text}</div>"


# --------------------------------------------------------------------------- one method
def _anchor(method: str, i: int) -> str:
    return f"{method}-q{i}"


def _state(row: dict) -> str:
    return "fixed" if row["success"] else "notfixed"


def _verdict(row: dict) -> str:
    n, m = row["n_edits"], f"margin {margin(row):+.3f}"
    text = f"fixed after {n} edit(s)" if row["success"] else f"not fixed ({html.escape(row['reason'])}, {n} edit(s))"
    return f"<span class='{_state(row)}'>{text}, {m}</span>"


def touched_parts(row: dict, masks: np.ndarray, grid) -> list[np.ndarray]:
    """The parts each edit of a result row touched: per edit (P,) bool, part p has a cell among the query cells
    the edit wrote (the pairs of :func:`fgvce_jax.metrics.edited_cells`), a cell lying on p as in
    :func:`fgvce_jax.metrics.causes.cell_parts` (any of its pixels on p's mask).

    Args:
      row: a result row with ``n_edits``, ``query_region``, ``ref_region``, ``region_size`` (optional ``edit_mask``).
      masks: (P, S, S) bool pixel masks of the query's parts; grid: (H, W).
    """
    cells = cell_parts(masks, grid)  # (P, H, W)
    qc, _, valid = _cells(row, grid)
    return [cells[:, qc[t, valid[t], 0], qc[t, valid[t], 1]].any(-1) for t in range(len(valid))]


def parts_image(image: np.ndarray, masks: np.ndarray, side: int = 256) -> np.ndarray:
    """uint8 (kS, kS, 3), k = max(1, side // S): ``image`` (S, S, 3) enlarged k times (nearest) with the outline
    of each part p's mask (P, S, S) drawn in ``_COLOURS[p]``: the enlarged mask's pixels that have a 4-neighbour
    outside it (or lie on the border), thickened to 2 pixels for k >= 4."""
    k = max(1, side // image.shape[0])
    out = enlarge(image, k).copy()
    for p, mask in enumerate(np.asarray(masks, bool)):
        rgb = tuple(int(_COLOURS[p % len(_COLOURS)][i:i + 2], 16) for i in (1, 3, 5))
        m = enlarge(mask, k)
        for _ in range(2 if k >= 4 else 1):
            inner = np.pad(m, 1)  # False outside the image
            inner = inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
            out[m & ~inner] = rgb
            m = inner
    return out


def _legend(names, masks: np.ndarray, cause) -> str:
    """Part names in their outline colours; hidden parts and (``cause``: (P,) bool or None) cause parts marked."""
    items = []
    for p, name in enumerate(names):
        text = html.escape(name) + (" (hidden)" if not masks[p].any() else "")
        text = f"<b>{text} (differs)</b>" if cause is not None and cause[p] else text
        items.append(f"<span class='swatch' style='background:{_COLOURS[p % len(_COLOURS)]}'></span>{text}")
    note = (" <b>(differs)</b>: the true and predicted classes differ in this part (a known cause)."
            if cause is not None else "")
    return f"<p class='parts'>Parts outlined:{''.join(items)}.{note}</p>"


def _edits_table(row: dict, touched=None, names=()) -> str:
    """One line per edit (reference, cells, similarity, p(true) and p(pred) after it), after the unedited query;
    with ``touched`` (per edit (P,) bool, :func:`touched_parts`) also the names of the parts each edit touched."""
    p_true, p_pred = f"p(true = {row['true_name']})", f"p(pred = {row['pred_name']})"
    rows = [{"edit": "none (the query)", "reference": None, "query cell (row, col)": None,
             "reference cell (row, col)": None, "similarity (cosine)": None,
             p_true: row["p_true_before"], p_pred: row["p_pred_before"]}]
    for t in range(row["n_edits"]):
        rows.append({"edit": t + 1, "reference": row["edit_ref_id"][t],
                     "query cell (row, col)": f"({row['edit_query_row'][t]}, {row['edit_query_col'][t]})",
                     "reference cell (row, col)": f"({row['edit_ref_row'][t]}, {row['edit_ref_col'][t]})",
                     "similarity (cosine)": row["edit_similarity"][t],
                     p_true: row["edit_p_true"][t], p_pred: row["edit_p_pred"][t]})
        if touched is not None:
            rows[-1]["parts touched"] = ", ".join(n for n, hit in zip(names, touched[t]) if hit) or "no part"
    return _table(rows)


def _query_section(method: str, i: int, row: dict, src: str, parts: str = "", edits: str | None = None) -> str:
    """One query: heading, figure ``src``, then ``parts`` (HTML) and the edits table (default :func:`_edits_table`)."""
    qid = html.escape(row["query_id"])
    return (f"<section class='q' id='{_anchor(method, i)}' data-fixed='{'yes' if row['success'] else 'no'}'>"
            f"<h3>{qid}: {html.escape(row['true_name'])} predicted as {html.escape(row['pred_name'])} — "
            f"{_verdict(row)} <a href='#{method}-index'>(index)</a></h3>"
            f"<img src='{src}' alt='query {qid}: image, Phi, counterfactual'>{parts}"
            f"{_edits_table(row) if edits is None else edits}</section>")


def _index(method: str, rows: list[dict], drawn: int) -> str:
    """Queries grouped by (true, predicted) class, largest group first; links to the drawn ones."""
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        groups[(r["true_name"], r["pred_name"])].append(i)
    items = []
    for (true, pred), members in sorted(groups.items(), key=lambda g: (-len(g[1]), g[0])):
        fixed = sum(rows[i]["success"] for i in members)
        links = " ".join(f"<a href='#{_anchor(method, i)}' class='{_state(rows[i])}'>"
                         f"{html.escape(rows[i]['query_id'])}</a>" for i in members if i < drawn)
        undrawn = sum(i >= drawn for i in members)
        items.append(f"<li class='group' data-true='{html.escape(true)}' data-pred='{html.escape(pred)}' "
                     f"data-count='{len(members)}' data-fixed='{fixed}'><b>{html.escape(true)} → "
                     f"{html.escape(pred)}</b>: {queries_text(len(members))}, "
                     f"{fixed} fixed — {links}" + (f" (+{undrawn} not drawn)" if undrawn else "") + "</li>")
    if not items:
        return "<p>No queries.</p>"
    return (f"<div class='index' id='{method}-index'><h3>Queries by confusion (true → predicted)</h3>"
            f"<ul>{''.join(items)}</ul></div>")


def _filter(method: str, body: str) -> str:
    """``body`` inside two targets: ``#<method>-fixed`` hides the not fixed queries, ``#<method>-notfixed``
    the fixed ones (CSS ``:target``, no script); ``#<method>-all`` shows all."""
    return (f"<p id='{method}-all'>Show: <a href='#{method}-all'>all</a> · <a href='#{method}-fixed'>fixed only</a>"
            f" · <a href='#{method}-notfixed'>not fixed only</a></p><div class='only-fixed' id='{method}-fixed'>"
            f"<div class='only-notfixed' id='{method}-notfixed'>{body}</div></div>")


def _method_section(method: str, config: dict, state: Completeness, rows: list[dict], queries: list[str]) -> str:
    config_rows = [{"setting": k, "value": v} for k, v in sorted(config.items())]
    more = len(rows) - len(queries)
    return (f"<section id='m-{method}'><h2>{html.escape(method)}</h2>"
            + (_warning(f"this run did not finish ({html.escape(state.line())}); what follows covers "
                        "only the queries written so far.") if state.partial else "")
            + f"<details><summary>config</summary>{_table(config_rows)}</details>"
            + _index(method, rows, len(queries))
            + _filter(method, "".join(queries) + (f"<p>{more} more queries not drawn.</p>" if more else ""))
            + "</section>")


class _Datasets:
    """The query and reference datasets of each run config's ``data.RUN_KEYS`` (dataset, splits, preprocessing,
    content), loaded once."""

    def __init__(self):
        self._loaded = {}

    def __call__(self, cfg: dict):
        key = json.dumps({k: cfg.get(k) for k in data.RUN_KEYS}, sort_keys=True)
        if key not in self._loaded:
            q = data.load_as_run(cfg, cfg["split"])
            r = q if cfg["reference_split"] == cfg["split"] else data.load_as_run(cfg, cfg["reference_split"])
            self._loaded[key] = (q, r)
        return self._loaded[key]


def _draw(method: str, rows: list[dict], arrays: dict, datasets, out: Path, prefix: str) -> list[str]:
    """Draw the figures of ``rows`` into ``out/<method>/`` and return their query sections."""
    qds, rds = datasets
    # images by id, not by the stored positions: a dataset that gained or lost images keeps them attached
    query_at = positions_of(qds, [row["query_id"] for row in rows], "query images")
    ref_ids = sorted({rid for row in rows for rid in row["edit_ref_id"]})
    ref_at = dict(zip(ref_ids, positions_of(rds, ref_ids, "reference images")))
    (out / method).mkdir()
    per_row = ("query_region", "ref_region", "edit_mask")
    sections = []
    for i, row in enumerate(progress.bar(rows, desc=f"report: {method} figures", unit="query", leave=False)):
        row = {**row, **{k: arrays[k][i] for k in per_row if k in arrays}}
        png = Path(method) / f"q{i:05d}.png"
        refs = {r: rds.raw_image(ref_at[rid]) for r, rid in zip(row["edit_ref_split_index"], row["edit_ref_id"])}
        query_image = qds.raw_image(query_at[i])
        query_figure(out / png, query_image, arrays["query_phi"][i], row, refs)
        parts, edits = _parts_html(qds, query_at[i], query_image, row, arrays["query_phi"][i].shape, out,
                                   Path(method) / f"q{i:05d}_parts.png", prefix) if qds.part_names else ("", None)
        sections.append(_query_section(method, i, row, f"{prefix}/{png.as_posix()}", parts, edits))
    return sections


def _draw_rendered(method, rows: list[dict], arrays: dict, datasets, out: Path, prefix: str) -> list[str]:
    """Draw a rendering method's figures (``Method.figures``: PNG, or GIF for frames) of ``rows`` into
    ``out/<method name>/`` and return its run's overview (``Method.overview``, if any) and the query sections:
    heading with the verdict, the figures, and a table of the row's numbers (its scalar columns)."""
    qds = datasets[0]
    query_at = positions_of(qds, [row["query_id"] for row in rows], "query images")
    (out / method.name).mkdir()
    overview = "".join(_figure(f, out, Path(method.name) / f"overview_{j}", prefix)
                       for j, f in enumerate(method.overview()))
    common = ("query_split_index", "query_id", "true", "true_name", "pred", "pred_name", "success", "reason")
    sections = []
    for i, row in enumerate(progress.bar(rows, desc=f"report: {method.name} figures", unit="query", leave=False)):
        figures = method.figures(row, {k: a[i] for k, a in arrays.items()}, qds.raw_image(query_at[i]))
        images = [_figure(f, out, Path(method.name) / f"q{i:05d}_{j}", prefix) for j, f in enumerate(figures)]
        numbers = {k: v for k, v in row.items() if k not in common and not isinstance(v, (list, dict))}
        qid, state = html.escape(row["query_id"]), _state(row)
        verdict = "fixed" if row["success"] else f"not fixed ({html.escape(row['reason'])})"
        sections.append(f"<section class='q' id='{_anchor(method.name, i)}' data-fixed='{'yes' if row['success'] else 'no'}'>"
                        f"<h3>{qid}: {html.escape(row['true_name'])} predicted as {html.escape(row['pred_name'])} — "
                        f"<span class='{state}'>{verdict}</span> <a href='#{method.name}-index'>(index)</a></h3>"
                        + "".join(images) + _table([numbers]) + "</section>")
    if overview and sections:  # above the first query (the index counts the sections as queries)
        sections[0] = f"<div class='overview'>{overview}</div>" + sections[0]
    return sections


def _figure(figure, out: Path, stem: Path, prefix: str) -> str:
    """Write one ``methods.Figure`` to ``out/stem`` (.png, or .gif for frames) and return its HTML figure."""
    from PIL import Image

    frames = np.asarray(figure.image, np.uint8)
    name = stem.with_suffix(".gif" if frames.ndim == 4 else ".png")
    if frames.ndim == 4:
        first, *rest = (Image.fromarray(a) for a in frames)
        first.save(out / name, save_all=True, append_images=rest, duration=150, loop=0)
    else:
        Image.fromarray(frames).save(out / name)
    caption = html.escape(figure.caption)
    return f"<figure><img src='{prefix}/{name.as_posix()}' alt='{caption}'><figcaption>{caption}</figcaption></figure>"


def _parts_html(qds, position: int, query_image, row: dict, grid, out: Path, png: Path, prefix: str):
    """(parts figure and legend, edits table with the parts each edit touched) of one query of a dataset with
    part masks; the figure :func:`parts_image` goes to ``out/png``."""
    from PIL import Image

    masks = qds.part_masks(position)
    Image.fromarray(parts_image(query_image, masks)).save(out / png)
    cause = qds.cause_parts(row["true"], row["pred"])
    names = qds.part_names
    return (f"<img src='{prefix}/{png.as_posix()}' alt='query {html.escape(row['query_id'])}: parts outlined'>"
            f"{_legend(names, masks, cause)}", _edits_table(row, touched_parts(row, masks, grid), names))


def _page(summary_rows, states: dict[str, Completeness], evaluation: str, sections: list[str]) -> str:
    partial = [f"{html.escape(m)}: {html.escape(s.line())}" for m, s in states.items() if s.partial]
    banner = _warning("some runs did not finish, so their tables and figures cover only the queries written "
                      "so far (run the same <code>fgvce explain</code> again to complete them): "
                      + "; ".join(partial)) if partial else ""
    nav = " · ".join(f"<a href='#m-{m}'>{html.escape(m)}</a>" for m in states)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>FG-VCE report</title>"
            f"<style>{_CSS}</style></head><body><h1>FG-VCE: what changes the model's mistakes</h1>{banner}"
            f"{_INTRO}<p>Methods: {nav}</p><h2>Summary</h2>{_metric_table(summary_rows)}{evaluation}"
            + "".join(sections) + "</body></html>")


def write_report(directory, html_path=None, *, max_queries: int = 50) -> Path:
    """Write the report of explain output ``directory`` and return the HTML path.

    Args:
      directory: an ``fgvce explain --out`` directory (or one method's sub-directory).
      html_path: where to write (default ``directory/report.html``); the PNGs go to
        ``<stem>_files/`` next to it and are referenced relatively.
      max_queries: per method, the first queries drawn (all rows are counted in the tables and the index).

    A partial run (see :mod:`fgvce_jax.completeness`) gets a warning on stderr and on the page.
    The figures are drawn into a temporary directory that replaces the old one only
    when complete, and the HTML is written last, atomically.
    """
    directory = Path(directory)
    html_path = Path(html_path) if html_path else directory / "report.html"
    if html_path.is_dir():
        raise FgvceError(f"--html {html_path} is a directory; give the page's file name, "
                         f"e.g. {html_path / 'report.html'}")
    found = results.find_runs(directory)
    runs = {m: found[m] for m in _ordered(found)}
    states = warn_partial(runs, "the report")
    files = html_path.parent / f"{html_path.stem}_files"
    html_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{files.name}.", dir=html_path.parent))
    tmp.chmod(0o777 & ~store.umask())  # mkdtemp makes it 0700; the report is for others to read too
    try:
        summary_rows, sections, datasets = [], [], _Datasets()
        for method, d in runs.items():
            cfg, table, arrays = results.read(d)
            rows = table.to_pylist()
            timing = read_summary(d) or {}
            if results.is_rendered(cfg):
                numbers = {"validity": metrics.validity(arrays["success"]) if rows else None,
                           "edits_regions": metrics.edits_in_regions(arrays["n_edits"], arrays["success"])
                           if rows else None}
                draw = functools.partial(_draw_rendered, methods.get(method)(stored_params(method, cfg)))
            else:
                ex = results.stored_explanations(cfg, table, arrays, d) if rows else None
                numbers = metrics.summary(ex) if ex is not None else dict.fromkeys(CF_COLUMNS)
                draw = functools.partial(_draw, method)
            summary_rows.append({"method": method, "queries": len(rows), "run": states[method].line(), **numbers,
                                 "seconds_per_query": timing.get("seconds_per_query")})
            drawn = draw(rows[:max_queries], {k: a[:max_queries] for k, a in arrays.items()}, datasets(cfg), tmp,
                         files.name) if (max_queries and rows) else []
            sections.append(_method_section(method, cfg, states[method], rows, drawn))
        page = _page(summary_rows, states, _evaluation(directory), sections)
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
