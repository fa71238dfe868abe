"""Screening (``--screen``, issue 16): do the regions and the explanations stay those of the full Phi?

The demo's tiny ResNet trained on the embedded digits at ``--image-size`` (64 px: an 8 x 8 map at
``layer4.0``; at the demo's 32 px the 4 x 4 map is too small for screening to save anything) explains its
test mistakes through ``pipeline.explain_split`` (the CLI's code path) with the default settings (M = 32
samples per window, K = 8 query regions, 4 candidates per reference, r = 1), once per setting:

- ``full``: no screening (the reference run);
- ``full, seed 1``: no screening, another seed, so other Shapley draws: the agreement two full runs reach
  with each other, the noise floor any cheaper estimate is judged against;
- ``screen M0 x margin``: ``--screen M0 --screen-margin margin`` for each ``--settings`` entry.

Reported per run, against ``full``: the share of queries with the same explanation (number of edits and,
per edit, the query region, the reference and its region), the share of maps whose regions the search reads
are the same (a query's K regions, a reference's top 4, same cells in the same order: SPEC 4's NMS on the
stored maps), validity, the game evaluations Phi used (counted from the settings: 2 HW M per unscreened map,
2 HW M0 + 2 S M screened) and the run's seconds. The issue's rule: screening becomes the default only if
at least 99% of the explanations agree.

    python benchmarks/screening.py            # about 45 minutes on a 2-core CPU (--limit 8: 10)
    python benchmarks/screening.py --quick    # 1 epoch at 32 px, 3 queries: a smoke test
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

import common
from bf16_head import same_explanations

RULE = 0.99  # the share of agreeing explanations screening needs to become the default


def regions(phi: np.ndarray, k: int) -> list[tuple]:
    """The (row, col) centres, in order, of the k regions NMS takes from each map (N, H, W) (r = 1)."""
    from fgvce_jax.counterfactual.partition import partition

    out = partition(np.asarray(phi, np.float32), region_size=1, max_regions=k)
    centre, valid = np.asarray(out.center), np.asarray(out.valid)
    return [tuple(map(tuple, centre[i][valid[i]])) for i in range(len(phi))]


def phi_evaluations(n_maps: int, n_windows: int, config) -> int:
    """Game evaluations of ``n_maps`` Phi maps of one role under ``config`` (its screen_keep from the settings)."""
    from fgvce_jax.shapley.local_screening import saves

    m, m0 = config["samples"], config.get("screen_samples")
    if m0 is not None and saves(n_windows, config["screen_keep"], m0, m):
        return n_maps * 2 * (n_windows * m0 + config["screen_keep"] * m)
    return n_maps * 2 * n_windows * m


def run(model, out: Path, config, limit) -> dict:
    """One explain_split run: its results, reference Phi by id and seconds."""
    from fgvce_jax import store
    from fgvce_jax.pipeline import explain_split

    t0 = time.perf_counter()
    explain_split(model, "digits", "test", out, config, at="layer4.0", limit=limit, overwrite=True)
    seconds = time.perf_counter() - t0
    _, arrays = store.read_results(out / "fgvce")
    ref = store.load_arrays(next(out.glob("cache-reference-phi-*.npz")))
    return {"seconds": seconds, "arrays": arrays, "ref": dict(zip(ref["ids"].tolist(), ref["phi"]))}


def compare(name: str, config, got: dict, full: dict) -> dict:
    """The row of one run against the full run."""
    from fgvce_jax.counterfactual.explain import saliency_settings

    ids = sorted(full["ref"])
    q_full, q_got = full["arrays"]["query_phi"], got["arrays"]["query_phi"]
    r_full, r_got = (np.stack([d["ref"][i] for i in ids]) for d in (full, got))
    n_windows = q_full.shape[1] * q_full.shape[2]
    same_q = [a == b for a, b in zip(regions(q_full, config.max_regions), regions(q_got, config.max_regions))]
    same_r = [a == b for a, b in zip(regions(r_full, config.candidates_per_reference),
                                     regions(r_got, config.candidates_per_reference))]
    evaluations = (phi_evaluations(len(q_got), n_windows, saliency_settings(config, "query"))
                   + phi_evaluations(len(r_got), n_windows, saliency_settings(config, "reference")))
    same = same_explanations(full["arrays"], got["arrays"])
    row = {"run": name, "queries": int(len(same)), "references": len(ids),
           "same_explanations": float(same.mean()), "same_query_regions": float(np.mean(same_q)),
           "same_reference_regions": float(np.mean(same_r)), "validity": float(got["arrays"]["success"].mean()),
           "phi_evaluations": int(evaluations), "seconds": got["seconds"]}
    print(f"  {name:22s} same explanations {row['same_explanations']:.3f}, query regions "
          f"{row['same_query_regions']:.3f}, reference regions {row['same_reference_regions']:.3f}, validity "
          f"{row['validity']:.3f}, {evaluations / 1e6:.2f} M evaluations, {got['seconds']:.0f} s", flush=True)
    return row


def main():
    from end_to_end import digits_model
    from fgvce_jax.counterfactual import CounterfactualConfig

    p = common.parser(__doc__, "screening")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of the digits model (the demo's)")
    p.add_argument("--image-size", type=int, default=64, help="input side of the digits model")
    p.add_argument("--samples", type=int, default=32, help="Shapley samples per window M (the default)")
    p.add_argument("--settings", nargs="*", default=["4x3", "8x3", "4x2"], metavar="M0xMARGIN",
                   help="screening settings to compare")
    p.add_argument("--limit", type=int, default=None, help="explain at most this many mistakes (default: all)")
    p.add_argument("--no-seed-run", action="store_true", help="leave out the noise-floor run with seed 1")
    p.add_argument("--cache", default=None, help="directory for the model and the runs (default: a temp dir)")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.image_size, args.samples, args.limit, args.settings = 1, 32, 8, 3, ["2x2"]
    env = common.environment()
    print(f"screening on {common.describe(env)}", flush=True)
    base = CounterfactualConfig(samples=args.samples, screen_samples=None)
    runs = {"full": base} if args.no_seed_run else {"full": base, "full, seed 1": dataclasses.replace(base, seed=1)}
    for s in args.settings:
        m0, margin = (int(x) for x in s.split("x"))
        runs[f"screen {m0} x {margin}"] = dataclasses.replace(base, screen_samples=m0, screen_margin=margin)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache or tmp).absolute()
        model = digits_model(cache, args.epochs, args.image_size)
        done = {name: run(model, cache / f"explain-{i}", config, args.limit) for i, (name, config) in
                enumerate(runs.items())}
    rows = [compare(name, runs[name], done[name], done["full"]) for name in runs]
    full = rows[0]
    summary = {}
    for row in rows[1:]:
        summary[f"{row['run']}: same explanations / query regions / reference regions"] = \
            f"{row['same_explanations']:.3f} / {row['same_query_regions']:.3f} / {row['same_reference_regions']:.3f}"
        summary[f"{row['run']}: Phi evaluations / full's, seconds / full's"] = \
            f"{row['phi_evaluations'] / full['phi_evaluations']:.3f}, {row['seconds'] / full['seconds']:.3f}"
    screened = [r for r in rows if r["run"].startswith("screen")]
    good = [r for r in screened if r["same_explanations"] >= RULE]
    summary["default"] = (f"screening could be the default ({', '.join(r['run'] for r in good)} agree on >= "
                          f"{RULE:.0%} of explanations)" if good else
                          f"screening stays off by default: no setting agrees on {RULE:.0%} of the explanations")
    for k, v in summary.items():
        print(f"{k}: {v}")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "cache")}
    notes = ["All runs: digits test mistakes at layer4.0, defaults otherwise (k 3, M as set, K 8, 4 candidates, "
             "N 10, r 1); 'same' is against the full run with seed 0.",
             "Phi evaluations are counted from the settings (2 HW M per map, or 2 HW M0 + 2 S M screened); "
             "seconds are whole explain runs (features, reference and query Phi, search)."]
    doc = common.document("screening", env, settings, summary, {"runs": rows}, notes)
    print(f"wrote {common.write_json(args.out, doc)}")


if __name__ == "__main__":
    main()
