"""Cost of counterfactual explanations: FG-VCE vs cve (Goyal et al.) on ResNet-50 heads.

Random weights (torchvision layout, 200 classes) and random post-ReLU 7x7x2048
feature maps (times a per-map log-normal channel gain); the heads are
``layer4.0`` (two bottleneck blocks + GAP + fc) and ``layer4`` (GAP + fc). Images whose prediction is the commonest class y of a pool
become references of class y, the others queries of true class y.

FG-VCE time = Shapley (Phi of the queries on y_hat + of their references on y)
+ search; cve needs no Phi. Every timing is taken after a warm-up call with the
same shapes (compilation excluded).

    python benchmarks/counterfactual_cost.py            # defaults below, a few minutes on 2 CPU cores
    python benchmarks/counterfactual_cost.py --pool 32 --queries 8 --samples 16 --cve-t-max 3

The defaults are tiny because cve costs H W x N H W = 2401 head calls per step on a
7x7 map; reference Phi is reported apart (at dataset scale it is computed once per
reference and shared by all queries).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fgvce_jax import models, saliency
from fgvce_jax.counterfactual import CounterfactualConfig, FeatureBatch, explain, select_references


def timed(fn):
    """(result, seconds) of fn() after one warm-up call."""
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def problem(split_model, params, pool: int, n_queries: int, seed: int):
    """Query and reference FeatureBatches from random post-ReLU maps (see module docstring)."""
    rng = np.random.default_rng(seed)
    # A per-map channel gain keeps pooled features (and so predictions) apart.
    gain = rng.lognormal(sigma=1.0, size=(pool, 1, 1, 2048))
    z = (np.maximum(rng.normal(size=(pool, 7, 7, 2048)), 0) * gain).astype(np.float32)
    preds = np.asarray(jax.jit(split_model.head)(params, jnp.asarray(z)).argmax(-1))
    y = np.bincount(preds).argmax()
    ref, query = np.flatnonzero(preds == y), np.flatnonzero(preds != y)[:n_queries]
    if query.size == 0:
        raise SystemExit("every pooled map has the same prediction; raise --pool or change --seed")

    def fb(idx, labels):
        return FeatureBatch(jnp.asarray(z[idx]), {}, np.asarray(labels), preds[idx], jnp.asarray(z[idx].mean((1, 2))))

    return fb(query, np.full(query.size, y)), fb(ref, np.full(ref.size, y))


def measure(at: str, args) -> dict:
    model = models.create("resnet50", 200, seed=args.seed)
    split_model, params = models.split(model, at)
    queries, refs = problem(split_model, params, args.pool, args.queries, args.seed)
    n_q = len(queries.labels)
    fg = CounterfactualConfig(kernel=args.kernel, samples=args.samples, region_size=args.region_size,
                              max_regions=args.t_max, n_references=args.references,
                              candidates_per_reference=args.candidates, t_max=args.t_max,
                              chunk_size=args.chunk_size)
    cve = CounterfactualConfig(method="cve", n_references=args.cve_references, t_max=args.cve_t_max,
                               chunk_size=args.chunk_size)
    key = jax.random.key(args.seed)
    k_q, k_r = jax.random.split(key)

    def phi(batch, classes, k):
        return saliency.compute(split_model, params, batch.z, batch.ctx, jnp.asarray(classes), method="local",
                                kernel=fg.kernel, samples=fg.samples, key=k)

    q_phi, t_q_phi = timed(lambda: phi(queries, queries.preds, k_q))
    n_ref_used = min(args.references, len(refs.labels))
    # Phi only for the union of the queries' nearest references, as explain() would compute it.
    index, valid = select_references(queries.pooled, jnp.asarray(queries.labels), refs.pooled,
                                     jnp.asarray(refs.labels), jnp.asarray(refs.preds), n=args.references,
                                     mode="nearest")
    r_used = np.unique(np.asarray(index)[np.asarray(valid)])
    r_sub = FeatureBatch(refs.z[r_used], {}, refs.labels[r_used], refs.preds[r_used], refs.pooled[r_used])
    r_phi_sub, t_r_phi = timed(lambda: phi(r_sub, r_sub.labels, k_r))
    r_phi = np.zeros(refs.z.shape[:3], np.float32)
    r_phi[r_used] = np.asarray(r_phi_sub)
    ex, t_search = timed(lambda: explain(split_model, params, queries, refs, fg, key=key,
                                         query_phi=q_phi, reference_phi=r_phi).success)
    cve_ok, t_cve = timed(lambda: explain(split_model, params, queries, refs, cve, key=key).success)
    t_fg = t_q_phi + t_r_phi + t_search
    return dict(
        head=at, queries=n_q, references_in_pool=int(len(refs.labels)), references_with_phi=int(r_used.size),
        fgvce=dict(seconds=t_fg, explanations_per_s=n_q / t_fg,
                   explanations_per_s_reference_phi_precomputed=n_q / (t_q_phi + t_search), shapley_query_s=t_q_phi,
                   shapley_reference_s=t_r_phi, search_s=t_search,
                   shapley_share=(t_q_phi + t_r_phi) / t_fg, search_share=t_search / t_fg,
                   success=int(np.sum(ex)), n_references=n_ref_used),
        cve=dict(seconds=t_cve, explanations_per_s=n_q / t_cve, success=int(np.sum(cve_ok)),
                 n_references=min(args.cve_references, len(refs.labels)), t_max=args.cve_t_max),
        fgvce_speedup_over_cve=(n_q / t_fg) / (n_q / t_cve))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", nargs="+", default=["layer4", "layer4.0"])
    p.add_argument("--pool", type=int, default=12, help="random maps drawn; split into queries/references")
    p.add_argument("--queries", type=int, default=1)
    p.add_argument("--references", type=int, default=2, help="FG-VCE references per query (N)")
    p.add_argument("--candidates", type=int, default=3, help="candidates per reference")
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--samples", type=int, default=2, help="local Shapley samples per window (M)")
    p.add_argument("--region-size", type=int, default=1)
    p.add_argument("--t-max", type=int, default=4)
    p.add_argument("--cve-references", type=int, default=1)
    p.add_argument("--cve-t-max", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=64, help="head calls per batch when scoring candidates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "counterfactual_cost.json"))
    args = p.parse_args()

    import flax
    versions = dict(jax=jax.__version__, flax=flax.__version__, numpy=np.__version__, python=platform.python_version())
    print(f"devices: {jax.devices()}  versions: {versions}")
    results = []
    for at in args.heads:
        r = measure(at, args)
        results.append(r)
        f, c = r["fgvce"], r["cve"]
        print(f"{at:9s} Q={r['queries']}  FG-VCE {f['explanations_per_s']:.3f} expl/s "
              f"(Shapley {100 * f['shapley_share']:.0f}%, search {100 * f['search_share']:.0f}%, "
              f"{f['seconds']:.2f} s)  cve {c['explanations_per_s']:.3f} expl/s ({c['seconds']:.2f} s, "
              f"t_max={c['t_max']}, N={c['n_references']})  ratio {r['fgvce_speedup_over_cve']:.1f}x")
    out = dict(benchmark="counterfactual_cost", devices=[str(d) for d in jax.devices()],
               backend=jax.default_backend(), versions=versions,
               settings={k: v for k, v in vars(args).items() if k != "out"}, results=results,
               note="ResNet-50 random weights, 200 classes, random post-ReLU 7x7x2048 maps; timings after "
                    "a warm-up call (compilation excluded); FG-VCE = Shapley (queries + their references) + search.")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2, default=str))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
