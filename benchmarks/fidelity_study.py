"""FG-VCE's open settings, one at a time, on the birds and on the digits (issue 14, item 4).

The demo's models (``fgvce_jax.commands.demo``: resnet_tiny at 32 px, ``BIRDS_TRAIN`` and ``DEMO_TRAIN``)
explain their first ``--limit`` test mistakes at ``layer4`` (an 8 x 8 map) through ``pipeline.explain_split``
(the CLI's code path), and ``evaluate.evaluate_directory`` scores them (the code path of ``fgvce evaluate``).

- ``methods``: FG-VCE with the base settings (:data:`BASE`: the demo's k 3, M 8, K 8, N 5, t_max 8 and 4
  candidates per reference, r 1, similarity selection, lambda 1, zero baseline, cells outside a Shapley window
  absent; written out, so that the study keeps meaning the settings it was run with when the library's defaults
  change: joint selection with lambda 0.1 is the default since this study) next to the other methods of the paper's main and
  ablation tables (``evaluate.PAPER_TABLES``: cve, global, gradient, single-step, random) and Grad-CAM.
- ``settings``: FG-VCE with one setting changed from the base per row (:data:`VARIANTS`). Del-Ins depends on
  Phi only, so it is measured for the rows that change Phi (k, M, baseline) and shown as the base's for the
  others. ``t_max 4`` is read off the base run (the search is greedy: its first 4 edits are the base's), the
  other rows are runs of their own.

Measured per row: validity, mean edits (regions and cells, successful queries), Del-Ins (20 RISE steps, as
the demo), cause precision and recall (birds: ``fgvce_jax.metrics.causes``) and the pipeline's seconds per
query (search and Phi of queries and references; every settings row computes its own reference Phi). The
chance level of cause precision is the share of query cells that lie on a cause part.

``--merge`` adds rows to a committed JSON without recomputing it: it trains the same models (seeded), runs the
base FG-VCE once more and checks that it reproduces the stored base row (else it stops), then runs only the
``--variants`` given and writes them into ``--out`` beside the rows already there (keyed by variant name).

    python benchmarks/fidelity_study.py               # about 17 minutes on 2 shared CPU cores
    python benchmarks/fidelity_study.py --quick       # 1 epoch, 3 queries, 2 settings: a smoke test
    python benchmarks/fidelity_study.py --merge --variants "outside present"  # add rows to the committed JSON
    python benchmarks/fidelity_study.py --write-docs  # rewrite docs/fidelity.md's tables and docs/fidelity_study.png
                                                      # from the JSON (--out names another JSON)
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "fidelity.md"

DATASETS = ("birds", "digits")
RISE_STEPS = 20
# The base settings, written out: DEMO_EXPLAIN and the CounterfactualConfig defaults the study was run with (the
# defaults of selection and lam changed after it); the fields not named keep CounterfactualConfig's defaults
# (none of them changed since).
BASE = {"kernel": 3, "samples": 8, "max_regions": 8, "n_references": 5, "t_max": 8, "candidates_per_reference": 4,
        "region_size": 1, "selection": "similarity", "lam": 1.0, "baseline": "zero", "outside": "absent"}
BASE_TEXT = ("k 3, M 8, K 8, N 5, candidates 4, t_max 8, r 1, similarity, lambda 1, zero baseline, outside absent "
             "(BASE in benchmarks/fidelity_study.py)")
# name -> the fields changed from BASE, one setting per row (the last: outside present with the new defaults)
VARIANTS = {
    "kernel 1": {"kernel": 1}, "kernel 5": {"kernel": 5},
    "samples 32": {"samples": 32},
    "baseline mean": {"baseline": "mean"},
    "region 2": {"region_size": 2},
    "joint, lambda 1": {"selection": "joint", "lam": 1.0}, "joint, lambda 0.1": {"selection": "joint", "lam": 0.1},
    "references 10": {"n_references": 10},
    "candidates 2": {"candidates_per_reference": 2}, "candidates 8": {"candidates_per_reference": 8},
    "t_max 16": {"t_max": 16},
    "joint, lambda 0.3": {"selection": "joint", "lam": 0.3}, "joint, lambda 0.03": {"selection": "joint", "lam": 0.03},
    "joint, lambda 0": {"selection": "joint", "lam": 0.0},
    "outside present": {"outside": "present"},
    "joint, lambda 0.1, outside present": {"selection": "joint", "lam": 0.1, "outside": "present"},
}
CONFIRM_ONLY = ("joint, lambda 0.3", "joint, lambda 0.03", "joint, lambda 0")  # rows of the confirmation run
MAIN_VARIANTS = tuple(v for v in VARIANTS if v not in CONFIRM_ONLY)  # the study's rows
PHI_FIELDS = ("kernel", "samples", "baseline", "outside")  # the settings that change Phi, hence Del-Ins
QUICK_VARIANTS = ("kernel 1", "joint, lambda 1")
TRUNCATED = {"t_max 4": 4}  # rows read off the base run: the greedy search's first edits
NOTES = [
    "Del-Ins of rows that do not change Phi is the base's (Phi, hence the curves, are the same).",
    "t_max 4 is read off the base run (greedy search: its first 4 edits are the base's).",
    "Seconds per query are the pipeline's (pass 3 to 5: reference and query Phi, search) and include the JIT "
    "compilation of each new shape. In 'methods', single-step shares FG-VCE's Phi settings and reuses the reference "
    "Phi FG-VCE computed in that folder, so its seconds are lower than a run of its own.",
    "The CPU is shared with other jobs: seconds are comparable within one run only.",
    "The base settings are written out (BASE): the library's defaults of selection and lam changed after the "
    "study (joint, 0.1).",
    "Rows added with --merge ran later, in a process of their own: their seconds compare with each other only.",
]
METRICS = ("validity", "edits_regions", "edits_cells", "del_ins", "cause_precision", "cause_recall")


def _model(work: Path, dataset: str, epochs: int | None) -> Path:
    """The demo's model of ``dataset`` in ``work/<dataset>/model`` (reused when there)."""
    from fgvce_jax.commands.demo import RECIPES, _model

    recipe = RECIPES[dataset]
    return _model(work / dataset, {**recipe, "epochs": recipe["epochs"] if epochs is None else epochs})


def _explain(model: Path, dataset: str, out: Path, configs, limit: int) -> dict[str, float]:
    """explain_split into ``out``; method -> seconds per query (the pipeline's summary)."""
    from fgvce_jax.commands.demo import DEMO_SPLIT
    from fgvce_jax.pipeline import explain_split

    summaries = explain_split(model, dataset, "test", out, configs, reference_split="train", limit=limit,
                              at=DEMO_SPLIT, batch_size=32, shard_size=32, overwrite=True)
    return {s.method: s.seconds_per_query for s in summaries}


def _row(row: dict, seconds: float | None) -> dict:
    """The study's figures of one evaluate row (NaN / missing as None)."""
    out = {k: row.get(k) for k in ("queries", *METRICS)}
    out["seconds_per_query"] = seconds
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def chance(directory: Path) -> float | None:
    """The share of query cells (all queries of the fgvce run in ``directory``) that lie on a cause part: the
    cause precision of edits placed at random; None without known causes."""
    from fgvce_jax import data
    from fgvce_jax.evaluate import by_id, causes_for_runs
    from fgvce_jax.results import load_run

    e, run = load_run(directory / "fgvce")
    ds = data.load_as_run(run, run["split"])
    found = causes_for_runs(ds, {"fgvce": by_id(e, ds)})
    if found is None:
        return None
    cells, cause = found["fgvce"]
    return float((cells & cause[:, :, None, None]).any(1).mean())


def truncated(directory: Path, t_max: int) -> dict:
    """The base run of ``directory`` read with at most ``t_max`` edits: a query succeeds iff it did within
    ``t_max`` edits (the search is greedy, so its first edits do not depend on t_max)."""
    from fgvce_jax import data
    from fgvce_jax.evaluate import by_id, causes_for_runs, summarise
    from fgvce_jax.results import load_run

    e, run = load_run(directory / "fgvce")
    ds = data.load_as_run(run, run["split"])
    e = by_id(e, ds)
    e = dataclasses.replace(e, success=e.success & (e.n_edits <= t_max))
    causes = causes_for_runs(ds, {"fgvce": e})
    return summarise({"fgvce": e}, causes_by_method=causes)[0]


def part_sensitivity(model_dir: Path) -> dict:
    """What the birds classifier reads: per part, the share of test birds whose prediction changes when only
    that part is drawn in its other type (same nuisance, ``birds.render``), and the mean total-variation
    distance between the two softmax outputs; with it, the share of the model's test mistakes whose cause
    (``birds.cause_parts``) includes the part."""
    import jax
    import numpy as np

    from fgvce_jax import data, models
    from fgvce_jax.commands.demo import DEMO_SPLIT
    from fgvce_jax.data import birds
    from fgvce_jax.models.preprocess import eval_transform

    model, info = models.load(model_dir)
    split_model, params = models.split(model, DEMO_SPLIT)
    ds = data.load("birds", "test", preprocessing=data.Preprocessing.of_model(info))
    pre = ds.preprocessing
    logits = jax.jit(split_model.logits)
    probs = lambda images: np.asarray(jax.nn.softmax(logits(params, eval_transform(
        images, pre.resize_size, pre.image_size, pre.mean, pre.std)), -1))
    ks, size = [birds.sample_index(i) for i in ds.ids], ds.read(0).shape[0]  # drawn at this side, as read
    before = probs([ds.read(i) for i in range(len(ds))])
    wrong = before.argmax(-1) != ds.labels
    cause = birds.cause_parts(ds.labels[wrong], before.argmax(-1)[wrong])  # (mistakes, P)
    out = {}
    for p, part in enumerate(birds.PARTS):
        flipped = []
        for k in ks:
            types = birds.CLASS_TYPES[birds.label_of(k)].copy()
            types[p] = 1 - types[p]  # every part has two types
            flipped.append(birds.render(types, birds.nuisance_of(k), size)[0])
        after = probs(flipped)
        out[part] = {"prediction_changes": float((after.argmax(-1) != before.argmax(-1)).mean()),
                     "mean_tv_distance": float(0.5 * np.abs(after - before).sum(-1).mean()),
                     "share_of_mistakes_caused": float(cause[:, p].mean())}
    return {"test_accuracy": float(1 - wrong.mean()), "mistakes": int(wrong.sum()), "parts": out}


def _agrees(row: dict, stored: dict, tol: float = 1e-4) -> list[str]:
    """The figures (METRICS and queries) on which ``row`` and ``stored`` differ by more than ``tol``."""
    def differ(a, b):
        if a is None or b is None:
            return (a is None) != (b is None)
        return abs(a - b) > tol
    return [k for k in ("queries", *METRICS) if differ(row.get(k), stored.get(k))]


def study(dataset: str, work: Path, *, limit: int, epochs: int | None, variants, compared, log,
          stored: dict | None = None) -> dict:
    """Every row of one dataset: {"methods": {...}, "settings": {...}, "chance_cause_precision": ...}. With
    ``stored`` (that dataset's results of a committed JSON: ``--merge``), the methods are not run: the base
    FG-VCE alone is, and must reproduce ``stored``'s base row; the result is ``stored`` with ``variants``'
    rows added or replaced."""
    from fgvce_jax.counterfactual import CounterfactualConfig, methods
    from fgvce_jax.evaluate import evaluate_directory

    t0 = time.perf_counter()
    model = _model(work, dataset, epochs)
    log(f"{dataset}: model ready ({time.perf_counter() - t0:.0f} s)")
    parts = dataset == "birds"
    base = work / dataset / "methods"
    if stored is None:
        seconds = _explain(model, dataset, base, [CounterfactualConfig(**BASE, method=m)
                                                  for m in methods.names() if m in ("fgvce", *compared)], limit)
        rows, _ = evaluate_directory(base, steps=RISE_STEPS, parts=parts)
        out = {"methods": {r["method"]: _row(r, seconds.get(r["method"])) for r in rows},
               "chance_cause_precision": chance(base) if parts else None, "settings": {}}
        if parts:
            out["part_sensitivity"] = part_sensitivity(model)
        log(f"{dataset}: methods done ({time.perf_counter() - t0:.0f} s)")
        base_row = out["methods"]["fgvce"]
        out["settings"]["base"] = {**base_row, "changed": {}}
        for name, t_max in TRUNCATED.items():
            out["settings"][name] = {**_row(truncated(base, t_max), None), "del_ins": base_row["del_ins"],
                                     "changed": {"t_max": t_max}, "read_off_base": True}
    else:
        out = json.loads(json.dumps(stored))
        base_row = out["settings"]["base"]
        _explain(model, dataset, base, [CounterfactualConfig(**BASE)], limit)
        rows, _ = evaluate_directory(base, steps=RISE_STEPS, gradcam=False, parts=parts)
        again = _row(rows[0], None)
        differ = _agrees(again, base_row)
        if differ:
            raise SystemExit(f"{dataset}: the base run does not reproduce the stored base row ({', '.join(differ)}: "
                             f"{[again[k] for k in differ]} vs {[base_row[k] for k in differ]}); not merged")
        log(f"{dataset}: base row reproduced ({time.perf_counter() - t0:.0f} s)")
    for name in variants:
        changed = VARIANTS[name]
        d = work / dataset / name.replace(" ", "_").replace(",", "")
        seconds = _explain(model, dataset, d, [CounterfactualConfig(**{**BASE, **changed})], limit)
        new_phi = any(k in PHI_FIELDS for k in changed)
        rows, _ = evaluate_directory(d, steps=RISE_STEPS, use_rise=new_phi, gradcam=False, parts=parts)
        row = _row(rows[0], seconds["fgvce"])
        if not new_phi:
            row["del_ins"] = base_row["del_ins"]
        out["settings"][name] = {**row, "changed": changed}
        log(f"{dataset}: {name} done ({time.perf_counter() - t0:.0f} s): " + ", ".join(
            f"{k} {row[k]:.3f}" for k in METRICS if row[k] is not None))
    return out


def _summary(results: dict) -> dict:
    """Key figures for the README table: per dataset FG-VCE's validity and Del-Ins, Grad-CAM's Del-Ins, and on
    the birds FG-VCE's cause precision and its chance level."""
    s = {}
    for dataset, r in results.items():
        m = r["methods"]
        s[f"{dataset}: fgvce validity"] = m["fgvce"]["validity"]
        s[f"{dataset}: fgvce del_ins"] = m["fgvce"]["del_ins"]
        s[f"{dataset}: gradcam del_ins"] = m.get("gradcam", {}).get("del_ins")
        if r["chance_cause_precision"] is not None:
            s[f"{dataset}: fgvce cause precision"] = m["fgvce"]["cause_precision"]
            s[f"{dataset}: cause precision at chance"] = r["chance_cause_precision"]
    return s


# --------------------------------------------------------------------------- docs/fidelity.md
COLUMN_NAMES = {"validity": "Validity ↑", "edits_regions": "Edits ↓", "edits_cells": "Cells ↓",
                "del_ins": "Del-Ins ↑", "cause_precision": "Cause prec. ↑", "cause_recall": "Cause rec. ↑",
                "seconds_per_query": "s / query"}


def _cell(v) -> str:
    return "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def table(rows: dict, with_causes: bool, label: str) -> str:
    """A Markdown table of ``rows`` (name -> figures)."""
    cols = [c for c in COLUMN_NAMES if with_causes or not c.startswith("cause")]
    lines = [f"| {label} | Queries | " + " | ".join(COLUMN_NAMES[c] for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['queries']} | " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def docs_tables(document: dict, source: str = "fidelity_study.json") -> str:
    """The generated block of docs/fidelity.md: per dataset the methods table and the settings table."""
    parts = [f"Generated by `python benchmarks/fidelity_study.py --write-docs --out benchmarks/results/{source}` "
             f"from that file ({document['date']}, {document['settings']['queries']}, "
             f"{document['environment']['cpu_count']} CPU cores, jax {document['environment']['versions']['jax']})"
             + "".join(f"; rows {', '.join(f'`{v}`' for v in m['variants'])} added with `--merge` on {m['date']}"
                       for m in document.get("merged", ())) + ".\n"]
    for dataset, r in document["results"].items():
        causes = r["chance_cause_precision"] is not None
        parts.append(f"### {dataset}: methods (base settings)\n\n" + table(r["methods"], causes, "Method"))
        if causes:
            parts.append(f"Cause precision of edits placed at random (share of query cells on a cause part): "
                         f"{r['chance_cause_precision']:.2f}.\n")
        if "part_sensitivity" in r:
            ps = r["part_sensitivity"]
            parts.append(f"### {dataset}: what the classifier reads\n\nTest accuracy {ps['test_accuracy']:.3f}, "
                         f"{ps['mistakes']} test mistakes. Per part: the share of test birds whose prediction "
                         "changes when only that part is drawn in its other type, the mean total-variation "
                         "distance between the two softmax outputs, and the share of mistakes whose cause "
                         "includes the part.\n\n| Part | Prediction changes | Mean TV distance | "
                         "Share of mistakes caused |\n|---|---:|---:|---:|\n" + "".join(
                             f"| {part} | {v['prediction_changes']:.2f} | {v['mean_tv_distance']:.2f} | "
                             f"{v['share_of_mistakes_caused']:.2f} |\n" for part, v in ps["parts"].items()))
        parts.append(f"### {dataset}: FG-VCE settings, one changed at a time\n\n" + table(r["settings"], causes,
                                                                                            "Setting"))
    return "\n".join(parts)


def plot(document: dict, png: Path) -> None:
    """Per dataset, validity against Del-Ins of every settings row and method (cause precision in the labels
    of the birds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = document["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), squeeze=False)
    for ax, (dataset, r) in zip(axes[0], results.items()):
        for group, marker, colour in (("settings", "o", "tab:blue"), ("methods", "s", "tab:red")):
            for name, row in r[group].items():
                if row["validity"] is None or row["del_ins"] is None or (group == "methods" and name == "fgvce"):
                    continue
                ax.scatter(row["del_ins"], row["validity"], marker=marker, color=colour)
                cp = row.get("cause_precision")
                label = name if cp is None or r["chance_cause_precision"] is None else f"{name} ({cp:.2f})"
                ax.annotate(label, (row["del_ins"], row["validity"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set(title=f"{dataset}: FG-VCE settings (blue), other methods (red)"
               + ("; (cause precision)" if r["chance_cause_precision"] is not None else ""),
               xlabel="Del-Ins", ylabel="validity")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def markers(name: str) -> tuple[str, str]:
    """The lines around the block generated from ``benchmarks/results/<name>.json``."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def update_docs(text: str, block: str, name: str = "fidelity_study") -> str:
    """``text`` with the part between the :func:`markers` of ``name`` replaced by ``block``."""
    start, end = markers(name)
    if start not in text or end not in text:
        raise SystemExit(f"{DOCS} must hold the lines {start} and {end}")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{block}{end}{rest.split(end, 1)[1]}"


def main() -> None:
    p = common.parser(__doc__, "fidelity_study")
    p.add_argument("--limit", type=int, default=16, help="test mistakes explained per dataset (default 16)")
    p.add_argument("--work", default=None, help="where models and explanations go (default: a temporary folder); "
                                                 "a model already there is reused")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--variants", nargs="+", default=list(MAIN_VARIANTS), choices=tuple(VARIANTS), metavar="NAME",
                   help="the settings rows to run (default: every row of the study)")
    p.add_argument("--methods", nargs="*", default=None, metavar="METHOD",
                   help="the methods run beside FG-VCE in 'methods' (default: those of the paper's main and "
                        "ablation tables, evaluate.PAPER_TABLES)")
    p.add_argument("--merge", action="store_true",
                   help="add the --variants rows to the JSON at --out instead of running the study: the methods are "
                        "not run, the base FG-VCE is and must reproduce the stored base row (--limit as that JSON's)")
    p.add_argument("--write-docs", action="store_true",
                   help="only rewrite docs/fidelity.md's tables and docs/<name of --out>.png from --out")
    args = p.parse_args()
    if args.methods is None:
        from fgvce_jax.counterfactual import methods
        from fgvce_jax.evaluate import PAPER_TABLES

        args.methods = [m for m in methods.names() if m != "fgvce" and any(
            m in (names or ()) for names, _ in PAPER_TABLES.values())]
    if args.write_docs:
        out, document = Path(args.out), json.loads(Path(args.out).read_text())
        DOCS.write_text(update_docs(DOCS.read_text(), docs_tables(document, out.name), out.stem))
        plot(document, DOCS.parent / f"{out.stem}.png")
        print(f"wrote {DOCS} and {DOCS.parent / f'{out.stem}.png'}")
        return
    env = common.environment()
    print(common.describe(env), flush=True)
    limit, epochs = (3, 1) if args.quick else (args.limit, None)
    variants = QUICK_VARIANTS if args.quick else tuple(args.variants)
    out = Path(args.out)
    if args.quick and out == common.RESULTS / "fidelity_study.json":
        out = out.with_name("fidelity_study_quick.json")
    t0 = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {line}", file=sys.stderr, flush=True)

    if args.merge:
        return merge(out, args, env, variants, limit, epochs, log, t0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        results = {}
        for dataset in args.datasets:
            results[dataset] = study(dataset, work, limit=limit, epochs=epochs, variants=variants,
                                     compared=args.methods, log=log)
            doc = common.document(
                out.stem.removesuffix("_quick"), env,
                {"models": "the demo's: resnet_tiny at 32 px (BIRDS_TRAIN, DEMO_TRAIN in fgvce_jax/commands/demo.py)",
                 "split": "layer4 (8 x 8 map)", "queries": f"the first {limit} test mistakes per dataset",
                 "base": BASE_TEXT,
                 "variants": {v: VARIANTS[v] for v in variants}, "rise_steps": RISE_STEPS, "quick": args.quick,
                 "seconds": time.perf_counter() - t0},
                _summary(results), results,
                NOTES)
            print(f"wrote {common.write_json(out, doc)}", flush=True)



def merge(out: Path, args, env: dict, variants, limit: int, epochs: int | None, log, t0: float) -> None:
    """``--merge``: ``variants``' rows of ``args.datasets`` added to (or replaced in) the JSON at ``out``, which
    records the addition under ``merged``; its other rows, methods and date stay as they were."""
    document = json.loads(out.read_text())
    entry = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "variants": {v: VARIANTS[v] for v in variants},
             "datasets": list(args.datasets), "environment": {"cpu_count": env["cpu_count"],
                                                              "jax": env["versions"]["jax"]}}
    document.setdefault("merged", []).append(entry)
    document["settings"]["base"] = BASE_TEXT
    document["settings"]["variants"].update(entry["variants"])
    document["notes"] = NOTES
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        for dataset in args.datasets:
            document["results"][dataset] = study(dataset, work, limit=limit, epochs=epochs, variants=variants,
                                                 compared=(), log=log, stored=document["results"][dataset])
            entry["seconds"] = time.perf_counter() - t0
            print(f"wrote {common.write_json(out, document)}", flush=True)


if __name__ == "__main__":
    main()
