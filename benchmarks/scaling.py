"""Throughput of ``saliency.compute`` and of the counterfactual search on 1, 2 and 4 devices.

The script re-executes itself once per device count k, in a subprocess whose
``XLA_FLAGS`` carry ``--xla_force_host_platform_device_count=max(k)`` (so a CPU
host shows that many devices), and the worker builds a 1-D mesh over the first
k devices and passes it to the library (``mesh=``). Each worker builds the same
random-weight model (fc calibrated as in ``end_to_end.py``), the same images
and feature maps, times ``saliency.compute`` (local Shapley, Phi of every image
on its predicted class) and ``counterfactual.explain`` (every second image a
misclassified query, the others references, Phi reused), and saves the
outputs. The parent checks the outputs of every k against those of the
smallest k and records the check: Phi must be bit-identical, the search's
decisions identical and its probabilities equal to within 1e-5 (the head
then runs on differently sharded batches, whose float rounding may differ).

On CPU the "devices" are fake: they share the host's cores, so CPU numbers
show the overhead of sharding, not a speed-up. On a multi-GPU/TPU host the
same command measures real scaling (the flag only affects the CPU platform).

    python benchmarks/scaling.py                                  # a few minutes on 2 CPU cores
    python benchmarks/scaling.py --arch resnet50 --image-size 448 --images 64 --samples 32   # on accelerators
    python benchmarks/scaling.py --quick --out /tmp/scaling.json

Processes: ``fgvce explain`` on the digits model (``end_to_end.digits_model``) as one process with 2
devices and as two ``jax.distributed`` processes (gloo on localhost) with 1 device each, timed wall to
wall (process start, compilation and writing included). The output directories must be byte-identical
(shards, manifest, caches); the efficiency is (t_1 / t_2) / 2. On one 2-core CPU the two processes share
the cores, so it shows the overhead of splitting, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common

SEARCH_OUTPUTS = ("success", "n_edits", "query_region", "ref_row", "ref_region", "probs")
PROBS_ATOL = 1e-5


def with_device_count(env: dict, n: int) -> dict:
    """A copy of ``env`` whose XLA_FLAGS ask the CPU platform for ``n`` devices (replacing any earlier count)."""
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    return {**env, "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])}


# --------------------------------------------------------------------------- worker (one device count)
def worker(args) -> None:
    import jax
    import jax.numpy as jnp

    from end_to_end import calibrated_random_model, query_labels, smooth_images
    from fgvce_jax import counterfactual, models, saliency
    from fgvce_jax.data.dataset import Preprocessing
    from fgvce_jax.models.preprocess import eval_transform

    k = args.devices
    if jax.device_count() < k:
        raise SystemExit(f"only {jax.device_count()} devices for a mesh of {k}")
    mesh = jax.make_mesh((k,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:k])
    pre = Preprocessing.imagenet(args.image_size) if args.arch != "resnet_tiny" else Preprocessing(32, 32)
    images = eval_transform(list(smooth_images(args.images, pre.resize_size, args.seed)), pre.resize_size,
                            pre.image_size, pre.mean, pre.std)
    model, preds = calibrated_random_model(args.arch, args.classes, lambda i, j: images[i:j], args.images, args.seed)
    split_model, params = models.split(model, args.at)
    z, ctx = jax.jit(split_model.encode)(params, jnp.asarray(images))
    key = jax.random.key(args.seed)

    def phi_fn():
        return saliency.compute(split_model, params, z, ctx, jnp.asarray(preds), method="local", kernel=args.kernel,
                                samples=args.samples, key=key, mesh=mesh)

    phi, t_phi = common.time_call(phi_fn, repeats=args.repeats)
    phi = np.asarray(phi)
    labels = query_labels(preds)
    q, r = np.flatnonzero(labels != preds), np.flatnonzero(labels == preds)
    pooled = z.mean((1, 2))

    def batch(idx):
        return counterfactual.FeatureBatch(z[idx], jax.tree.map(lambda a: a[idx], ctx), jnp.asarray(labels[idx]),
                                           jnp.asarray(preds[idx]), pooled[idx])

    config = counterfactual.CounterfactualConfig(kernel=args.kernel, samples=args.samples, n_references=2, t_max=4)
    queries, refs = batch(q), batch(r)

    def search_fn():
        return counterfactual.explain(split_model, params, queries, refs, config, key=key, query_phi=phi[q],
                                      reference_phi=phi[r], mesh=mesh).success

    _, t_search = common.time_call(search_fn, repeats=args.repeats)
    ex = counterfactual.explain(split_model, params, queries, refs, config, key=key, query_phi=phi[q],
                                reference_phi=phi[r], mesh=mesh)
    h, w = phi.shape[1:]
    evaluations = args.images * 2 * h * w * args.samples
    np.savez(args.save, phi=phi, **{name: np.asarray(getattr(ex, name)) for name in SEARCH_OUTPUTS})
    print(json.dumps({"devices": k, "device_kind": jax.devices()[0].device_kind, "grid": [h, w, int(z.shape[-1])],
                      "queries": int(q.size), "references": int(r.size),
                      "saliency": {**t_phi.as_dict(), "images_per_s": args.images / t_phi.median,
                                   "evaluations": evaluations, "evaluations_per_s": evaluations / t_phi.median},
                      "search": {**t_search.as_dict(), "queries_per_s": q.size / t_search.median}}))


# --------------------------------------------------------------------------- parent
def compare(outputs: dict[int, dict[str, np.ndarray]], probs_atol: float) -> dict:
    """Each k's outputs against the smallest k's.

    ``identical``: bit-for-bit equality per output. ``consistent``: Phi and every
    search decision (success, edits, regions, references) identical and the
    probabilities equal within ``probs_atol`` (the head runs on differently
    sharded batches, so float rounding may differ).
    """
    base_k = min(outputs)
    base = outputs[base_k]
    check = {}
    for k, out in sorted(outputs.items()):
        same = {name: bool(np.array_equal(out[name], a, equal_nan=np.issubdtype(a.dtype, np.floating)))
                for name, a in base.items()}
        probs_diff = float(np.nanmax(np.abs(out["probs"] - base["probs"]), initial=0.0))
        check[str(k)] = {"compared_to": base_k, "identical": same,
                         "consistent": (all(v for name, v in same.items() if name != "probs")
                                        and probs_diff <= probs_atol),
                         "phi_max_abs_diff": float(np.max(np.abs(out["phi"] - base["phi"]))),
                         "probs_max_abs_diff": probs_diff}
    return check


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def output_files(out: Path) -> dict[str, bytes]:
    """Every result and cache file of an explain directory, except the timing in summary.json."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "summary.json"}


def process_scaling(cache: Path, quick: bool) -> dict:
    """One explain process (2 devices) against two jax.distributed processes (1 device each)."""
    from end_to_end import digits_model

    model = digits_model(cache, 0 if quick else 3)
    explain = [sys.executable, "-m", "fgvce_jax.cli", "explain", "--model", str(model), "--dataset", "digits",
               "--limit", "4" if quick else "16", "--samples", "4" if quick else "8", "--references", "3",
               "--t-max", "4", "--shard-size", "2", "--at", "layer4.0"]
    runs = {}
    for n in (1, 2):
        out = cache / f"processes-{n}"
        dist = ["--coordinator", f"localhost:{_free_port()}", "--num-processes", str(n)] if n > 1 else []
        env = with_device_count(dict(os.environ), 2 // n)
        t0 = time.perf_counter()
        procs = [subprocess.Popen(explain + ["--out", str(out), "--overwrite"] + dist
                                  + (["--process-id", str(i)] if n > 1 else []), env=env, text=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(n)]
        errors = [p.communicate()[1] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"explain with {n} process(es) failed:\n{errors[0][-3000:]}")
        runs[n] = {"seconds": time.perf_counter() - t0, "files": output_files(out)}
        print(f"  {n} process(es): {runs[n]['seconds']:.1f} s", flush=True)
    speedup = runs[1]["seconds"] / runs[2]["seconds"]
    return {"seconds_1_process_2_devices": runs[1]["seconds"], "seconds_2_processes_1_device": runs[2]["seconds"],
            "speedup": speedup, "efficiency": speedup / 2, "files": len(runs[1]["files"]),
            "byte_identical": runs[1]["files"] == runs[2]["files"]}


def main(argv=None) -> None:
    p = common.parser(__doc__, "scaling")
    p.add_argument("--device-counts", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--arch", default="resnet_tiny")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--at", default="layer4.0")
    p.add_argument("--images", type=int, default=8, help="feature maps per saliency.compute call")
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--samples", type=int, default=4, help="local Shapley samples per window (M)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls after the warm-up call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-processes", action="store_true", help="skip the one- against two-process explain run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.samples, args.repeats, args.device_counts = 4, 2, 1, [1, 2]
    if args.worker:
        return worker(args)

    env = common.environment()
    print(f"scaling on {common.describe(env)}; device counts {args.device_counts}", flush=True)
    shared = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
              ("arch", "classes", "image_size", "at", "images", "kernel", "samples", "repeats", "seed")]
    child_env = with_device_count(dict(os.environ), max(args.device_counts))
    runs, outputs = [], {}
    with tempfile.TemporaryDirectory(prefix="fgvce-scaling-") as tmp:
        for k in args.device_counts:
            save = Path(tmp) / f"k{k}.npz"
            proc = subprocess.run([sys.executable, __file__, "--worker", "--devices", str(k), "--save", str(save),
                                   *shared], env=child_env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"worker for {k} device(s) failed:\n{proc.stderr[-3000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            with np.load(save) as f:
                outputs[k] = dict(f)
            r = runs[-1]
            print(f"  {k} device(s): saliency {r['saliency']['images_per_s']:.2f} img/s "
                  f"({r['saliency']['evaluations_per_s']:.0f} evals/s), search {r['search']['queries_per_s']:.2f} "
                  f"queries/s", flush=True)
        processes = None if args.no_processes else process_scaling(Path(tmp), args.quick)
    check = compare(outputs, PROBS_ATOL)
    base = runs[0]
    for r in runs:
        r["saliency"]["speedup"] = r["saliency"]["images_per_s"] / base["saliency"]["images_per_s"]
        r["search"]["speedup"] = r["search"]["queries_per_s"] / base["search"]["queries_per_s"]
    phi_identical = all(c["identical"]["phi"] for c in check.values())
    consistent = all(c["consistent"] for c in check.values())
    bitwise = all(all(c["identical"].values()) for c in check.values())
    probs_diff = max(c["probs_max_abs_diff"] for c in check.values())
    print(f"across device counts: Phi bit-identical {phi_identical}; search decisions identical and probabilities "
          f"within {PROBS_ATOL:g}: {consistent} (all outputs bit-identical: {bitwise}, max |dp| {probs_diff:.1e})")
    summary = {}
    for r in runs:
        summary[f"{r['devices']} dev: saliency images/s"] = round(r["saliency"]["images_per_s"], 3)
        summary[f"{r['devices']} dev: search queries/s"] = round(r["search"]["queries_per_s"], 3)
        summary[f"{r['devices']} dev: saliency speed-up"] = round(r["saliency"]["speedup"], 3)
    summary["Phi bit-identical across device counts"] = phi_identical
    summary[f"search identical across device counts (probs within {PROBS_ATOL:g})"] = consistent
    summary["search probs max abs diff across device counts"] = probs_diff
    if processes:
        summary["explain: 1 -> 2 processes efficiency"] = round(processes["efficiency"], 3)
        summary["explain: 2 processes byte-identical to 1"] = processes["byte_identical"]
    notes = [f"workload: {args.arch} (random weights, fc calibrated) at {args.at}, {args.images} images, local Shapley "
             f"k={args.kernel}, M={args.samples}; search: t_max 4, 2 references per query",
             "times are medians after a warm-up call (compilation excluded)"]
    if env["backend"] == "cpu":
        notes.append("CPU: the devices are fake (--xla_force_host_platform_device_count) and share the same "
                     f"{env['cpu_count']} cores, so these numbers show sharding overhead, not a speed-up; "
                     "run on a multi-GPU/TPU host for real scaling")
    doc = common.document("scaling", {**env, "worker_xla_flags": child_env["XLA_FLAGS"]}, vars(args), summary,
                          {"runs": runs, "check": check, "processes": processes}, notes)
    print(f"wrote {common.write_json(args.out, doc)}")
    if not (phi_identical and consistent):
        raise SystemExit("outputs differ across device counts (see the JSON)")
    if processes and not processes["byte_identical"]:
        raise SystemExit("explain outputs differ between one and two processes (see the JSON)")


if __name__ == "__main__":
    main()
