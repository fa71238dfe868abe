"""bf16 head evaluation for Phi (issue 16): its effect on Phi and on the explanations, and its time.

1. Explanations. The demo's tiny ResNet trained on the embedded digits (``end_to_end.digits_model``) explains
   its test mistakes at split ``layer4.0`` through ``pipeline.explain_split`` twice, with the same
   arguments but ``head_dtype`` float32 and bfloat16. Reported: the relative L2 error
   ||Phi_bf16 - Phi_f32|| / ||Phi_f32|| of every reference and query map (median, 90th percentile, max),
   the share of queries whose explanation is the same (number of edits and, per edit, the query region,
   the reference and its region), validity under each, and the seconds of each run.
2. Deep head. A ResNet-50 (random weights, fc calibrated as in ``end_to_end``) split ``layer4.0`` at
   224 px (7 x 7 x 2048): the same Phi error on a few images (skipped by ``--quick``).

On a CPU, XLA computes bf16 convolutions by converting to float32 and back, so the times here show no
speed-up (often a slow-down); the errors are the bf16 rounding of weights and activations, as on a GPU or
TPU (where products accumulate in float32 too). Measure the time on the accelerator.

Run:  python benchmarks/bf16_head.py            (minutes on a 2-core CPU)
      python benchmarks/bf16_head.py --quick    (1 epoch, 3 queries, smoke test)
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

import common

DTYPES = ("float32", "bfloat16")


def relative_errors(exact: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """(N,) ||approx_i - exact_i|| / ||exact_i|| over the trailing axes of (N, ...) maps (0 where exact_i = 0
    and approx_i = exact_i)."""
    num = np.linalg.norm((approx - exact).reshape(len(exact), -1), axis=1)
    den = np.linalg.norm(exact.reshape(len(exact), -1), axis=1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def same_explanations(a: dict, b: dict) -> np.ndarray:
    """(Q,) whether two runs' result arrays (``store.read_results``) give query q the same edits."""
    same = a["n_edits"] == b["n_edits"]
    for q in range(len(same)):
        k = a["n_edits"][q]
        for name in ("query_region", "ref_split_index", "ref_region"):
            same[q] &= bool(np.array_equal(a[name][q, :k], b[name][q, :k]))
    return same


def error_summary(err: np.ndarray) -> dict:
    return {"maps": int(len(err)), "median": float(np.median(err)), "p90": float(np.quantile(err, 0.9)),
            "max": float(err.max())}


def explanations(args, cache: Path) -> dict:
    """Part 1: both dtypes through explain_split on the digits model."""
    from end_to_end import digits_model
    from fgvce_jax import store
    from fgvce_jax.counterfactual import CounterfactualConfig
    from fgvce_jax.pipeline import explain_split

    model = digits_model(cache, args.epochs)
    base = CounterfactualConfig(samples=args.samples, n_references=args.references)
    runs = {}
    for dtype in DTYPES:
        out = cache / f"explain-{dtype}"
        t0 = time.perf_counter()
        explain_split(model, "digits", "test", out, dataclasses.replace(base, head_dtype=dtype), at="layer4.0",
                      limit=args.limit, overwrite=True)
        seconds = time.perf_counter() - t0
        _, arrays = store.read_results(out / "fgvce")
        ref = store.load_arrays(next(out.glob("cache-reference-phi-*.npz")))
        runs[dtype] = {"seconds": seconds, "arrays": arrays, "ref": dict(zip(ref["ids"].tolist(), ref["phi"]))}
        print(f"  {dtype}: {len(arrays['success'])} queries, validity {arrays['success'].mean():.3f}, {seconds:.1f} s")
    f32, bf16 = runs["float32"], runs["bfloat16"]
    ids = sorted(f32["ref"])
    ref_err = relative_errors(np.stack([f32["ref"][i] for i in ids]), np.stack([bf16["ref"][i] for i in ids]))
    query_err = relative_errors(f32["arrays"]["query_phi"], bf16["arrays"]["query_phi"])
    same = same_explanations(f32["arrays"], bf16["arrays"])
    return {"queries": int(len(same)), "same_explanations": float(same.mean()),
            "reference_phi_error": error_summary(ref_err), "query_phi_error": error_summary(query_err),
            **{f"validity_{d}": float(runs[d]["arrays"]["success"].mean()) for d in DTYPES},
            **{f"seconds_{d}": runs[d]["seconds"] for d in DTYPES}}


def deep_head(args) -> dict:
    """Part 2: Phi error of a ResNet-50 layer4.0 head at 224 px on ``args.deep_images`` images."""
    import jax

    from end_to_end import calibrated_random_model, smooth_images
    from fgvce_jax import models, saliency
    from fgvce_jax.models.preprocess import eval_transform

    n = args.deep_images
    images = eval_transform(list(smooth_images(max(n, 16), 224, seed=0)), 224, 224)
    model, preds = calibrated_random_model("resnet50", 200, lambda i, j: images[i:j], len(images), seed=0)
    split_model, params = models.split(model, "layer4.0")
    z, ctx = jax.jit(split_model.encode)(params, images[:n])
    phi, seconds = {}, {}
    for dtype in DTYPES:
        (phi[dtype], timing) = common.time_call(
            lambda: np.asarray(saliency.compute(split_model, params, z, ctx, preds[:n], kernel=3,
                                                samples=args.samples, key=jax.random.key(0), dtype=dtype)),
            warmup=1, repeats=1)
        seconds[dtype] = timing.best
        print(f"  ResNet-50 layer4.0 {dtype}: {seconds[dtype]:.1f} s for {n} maps")
    return {"images": n, "grid": list(z.shape[1:]), "phi_error": error_summary(relative_errors(phi["float32"],
                                                                                             phi["bfloat16"])),
            **{f"seconds_{d}": seconds[d] for d in DTYPES}}


def headline(parts: dict) -> dict:
    """The flat summary of the parts' results (the README table)."""
    out = {}
    d = parts.get("digits_layer4.0")
    if d:
        out[f"digits layer4.0: queries with the same edits (of {d['queries']})"] = d["same_explanations"]
        out["digits layer4.0: validity float32 / bfloat16"] = f"{d['validity_float32']:.3f} / {d['validity_bfloat16']:.3f}"
        for part in ("reference", "query"):
            e = d[f"{part}_phi_error"]
            out[f"digits layer4.0: {part} Phi relative error, median / max ({e['maps']} maps)"] = \
                f"{e['median']:.4f} / {e['max']:.4f}"
    r = parts.get("resnet50_layer4.0_224px")
    if r:
        e = r["phi_error"]
        out[f"ResNet-50 layer4.0 224 px: Phi relative error, median / max ({e['maps']} maps)"] = \
            f"{e['median']:.4f} / {e['max']:.4f}"
    return out


def main():
    p = common.parser(__doc__, "bf16_head")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of the digits model (the demo's)")
    p.add_argument("--samples", type=int, default=32, help="Shapley samples per window M")
    p.add_argument("--references", type=int, default=10, help="references per query N")
    p.add_argument("--limit", type=int, default=None, help="explain at most this many mistakes (default: all)")
    p.add_argument("--deep-images", type=int, default=2, help="ResNet-50 maps in part 2 (0: skip it)")
    p.add_argument("--cache", default=None, help="directory for the model and the runs (default: a temp dir)")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.samples, args.references, args.limit, args.deep_images = 1, 4, 2, 3, 0
    env = common.environment()
    print(f"bf16_head on {common.describe(env)}")
    parts = {}
    if args.deep_images:  # the short part first
        parts["resnet50_layer4.0_224px"] = deep_head(args)
    with tempfile.TemporaryDirectory() as tmp:
        parts["digits_layer4.0"] = explanations(args, Path(args.cache or tmp).absolute())
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "cache")}
    notes = ["Phi error = ||Phi_bf16 - Phi_f32|| / ||Phi_f32|| per map; same_explanations = share of queries "
             "with identical edits (count, query regions, references, reference regions).",
             "On a CPU bf16 convolutions are emulated through float32: the times are not a speed measurement."]
    doc = common.document("bf16_head", env, settings, headline(parts), parts, notes)
    print(f"wrote {common.write_json(args.out, doc)}")


if __name__ == "__main__":
    main()
