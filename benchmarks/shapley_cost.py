"""Cost and accuracy of the Shapley engine (issue 3), written to benchmarks/results/shapley_cost.json.

(a) the CUB-sized linear game (14x14x2048 map, 200 classes, split ``layer4``: GAP + linear fast path):
    ``local`` (k=7) and global ``permutation`` through ``saliency.compute``, against a bare jitted
    matmul + softmax over the same number of coalitions, and against Captum's ShapleyValueSampling on the
    same game (timed on a few permutations; rates are compared).
    Also the same map under a flatten + linear head (``flatten_linear``), where Captum's own per-evaluation
    cost is the full head: the setting of the ~120 evaluations/s Captum figure in DEVELOPERS.md.
(b) the deep-head game (ResNet-50 split ``layer4.0``, 7x7x2048, 200 classes, random weights): ``local``
    through the generic path, against a bare jitted batched forward of the same head and against Captum
    on a torch copy of the head.
(c) error vs budget of every estimator against ``exact`` on a 16-player feature-map game from a trained
    model (the demo's resnet_tiny trained on digits, split ``layer4``, a real test digit; no converted
    ImageNet/CUB checkpoint can be downloaded here), players = 2x2 blocks of its 8x8 map; RMSE over keys,
    with shapiq's approximators as a peer; plot in shapley_error.png.

Run:  python benchmarks/shapley_cost.py            (a few minutes on a 2-core CPU)
      python benchmarks/shapley_cost.py --quick    (smaller sizes, a smoke test)
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import common
from fgvce_jax import saliency, shapley
from fgvce_jax.models import create, split
from fgvce_jax.shapley.benchmark_games import GapLinear
from fgvce_jax.shapley.game import Game, LinearHead

RESULTS = Path(__file__).parent / "results"


def timed(fn, repeats: int = 3) -> float:
    """Best wall time in seconds of ``fn()`` (results blocked on) after one warm-up call."""
    jax.block_until_ready(fn())
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def captum_rates(torch_head, z_nchw, n_players_grid, n_samples: int, per_eval=(1, 16), repeats: int = 3) -> dict:
    """Evaluations/s of Captum's ShapleyValueSampling on ``softmax(torch_head(z))[:, 0]``, for each
    ``perturbations_per_eval`` in ``per_eval`` (1 is Captum's default; more batches the forward calls);
    the best of ``repeats`` runs, as for our own timings."""
    import torch
    from captum.attr import ShapleyValueSampling

    h, w = n_players_grid
    fmask = torch.arange(h * w).reshape(1, 1, h, w)
    rates = {}
    for ppe in per_eval:
        calls = [0]

        def forward(z, calls=calls):
            calls[0] += z.shape[0]
            return torch.softmax(torch_head(z), dim=-1)[:, 0]

        svs = ShapleyValueSampling(forward)
        for _ in range(repeats):
            calls[0] = 0
            with torch.no_grad():
                t = time.perf_counter()
                svs.attribute(z_nchw, baselines=0.0, feature_mask=fmask, n_samples=n_samples,
                              perturbations_per_eval=ppe)
                rates[ppe] = max(rates.get(ppe, 0.0), calls[0] / (time.perf_counter() - t))
    return rates


def captum_yardstick(out: dict, rates: dict, methods) -> None:
    """Record Captum's rates and our speed-up over its fastest setting (the stronger yardstick)."""
    best = max(rates, key=rates.get)
    out["captum_svs_evals_per_s"] = rates[best]
    out["captum_perturbations_per_eval"] = best
    out["captum_svs_evals_per_s_by_perturbations_per_eval"] = rates
    for method in methods:
        out[method]["x_captum"] = out[method]["evals_per_s"] / rates[best]


def bench_linear(quick: bool) -> dict:
    """(a): 14x14x2048, 200 classes; local k=7 and global permutation vs bare matmul+softmax and Captum."""
    import torch

    h = w = 14
    d, c, n_img, samples = 2048, 200, (2 if quick else 4), (8 if quick else 32)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"W": jax.random.normal(k1, (d, c)) / np.sqrt(d), "b": jnp.zeros(c)}
    z = jax.nn.relu(jax.random.normal(k2, (n_img, h, w, d)))
    classes = jnp.arange(n_img)
    sm = GapLinear(c)
    evals = 2 * h * w * samples  # per image, for both methods
    out = {"grid": [h, w, d], "classes": c, "images": n_img, "evaluations_per_image": evals}
    for method in ("local", "global"):
        kw = dict(kernel=7, samples=samples) if method == "local" else dict(budget=evals)
        dt = timed(lambda: saliency.compute(sm, params, z, None, classes, method=method, key=k3, **kw))
        out[method] = {"s": dt, "ms_per_image": 1e3 * dt / n_img, "evals_per_s": evals * n_img / dt}
    # bare limit: the same number of coalitions through a jitted matmul + softmax, masks given; the best of
    # a few chunkings (one call, or lax.map over cache-sized pieces), so the yardstick is not handicapped
    contrib = (z[0] @ params["W"]).reshape(h * w, c) / (h * w)
    masks = jax.random.bernoulli(k3, 0.5, (evals * n_img, h * w))
    by_chunks = {}
    for chunks in (1, 8, 32):
        bare = jax.jit(lambda m, k=chunks: jax.lax.map(
            lambda mm: jax.nn.softmax(mm.astype(jnp.float32) @ contrib + params["b"], -1)[:, 0],
            m.reshape(k, -1, h * w)).reshape(-1))
        by_chunks[chunks] = timed(lambda: bare(masks))
    best = min(by_chunks, key=by_chunks.get)
    out["bare_matmul_softmax"] = {"s": by_chunks[best], "evals_per_s": evals * n_img / by_chunks[best],
                                  "chunks": best, "s_by_chunks": by_chunks}
    W_t, b_t = torch.tensor(np.asarray(params["W"])), torch.tensor(np.asarray(params["b"]))
    z_t = torch.tensor(np.asarray(z[:1])).permute(0, 3, 1, 2).contiguous()
    captum_yardstick(out, captum_rates(lambda zz: zz.mean((2, 3)) @ W_t + b_t, z_t, (h, w),
                                       n_samples=1 if quick else 2), ("local", "global"))
    for method in ("local", "global"):
        out[method]["of_bare"] = out[method]["evals_per_s"] / out["bare_matmul_softmax"]["evals_per_s"]
    out["flatten_linear"] = flatten_linear_variant(z, classes, samples, out["bare_matmul_softmax"]["evals_per_s"])
    return out


def flatten_linear_variant(z, classes, samples: int, bare_rate: float) -> dict:
    """(a) with a linear layer on the flattened map instead of GAP + fc (the setting in which Captum runs
    at ~120 evaluations/s on this CPU, as DEVELOPERS.md records). Its logits are affine in the mask too,
    contrib_p = z_p . W_p (W: (HW, D, C)), so ``local`` takes the same affine path; Captum pays the full
    (HW D) x C product per evaluation. The bare matmul + softmax over the (HW, C) contributions is the
    one measured above (same shapes)."""
    import torch

    n_img, h, w, d = z.shape
    c = 200
    W = jax.random.normal(jax.random.key(5), (h * w, d, c)) / np.sqrt(h * w * d)
    b = jnp.zeros(c)
    build = jax.jit(lambda zz: jnp.einsum("npd,pdc->npc", zz.reshape(n_img, h * w, d), W))

    def run():
        contrib = build(z)
        return [shapley.local(Game(LinearHead("prob"), {"contrib": contrib[i], "offset": b, "cls": classes[i]}),
                              (h, w), kernel=7, samples=samples, key=jax.random.fold_in(jax.random.key(6), i))
                for i in range(n_img)]

    evals = 2 * h * w * samples
    dt = timed(run)
    out = {"local": {"s": dt, "ms_per_image": 1e3 * dt / n_img, "evals_per_s": evals * n_img / dt}}
    out["local"]["of_bare"] = out["local"]["evals_per_s"] / bare_rate
    lin = torch.nn.Linear(h * w * d, c)
    with torch.no_grad():  # torch flattens (D, H, W): weight[c, d HW + p] = W[p, d, c]
        lin.weight.copy_(torch.tensor(np.asarray(W).transpose(2, 1, 0).reshape(c, d * h * w)))
        lin.bias.zero_()
    z_t = torch.tensor(np.asarray(z[:1])).permute(0, 3, 1, 2).contiguous()
    captum_yardstick(out, captum_rates(lambda zz: lin(zz.flatten(1)), z_t, (h, w), n_samples=1), ("local",))
    return out


def bench_deep(quick: bool) -> dict:
    """(b): ResNet-50 split layer4.0 (7x7x2048), 200 classes, generic path vs bare head and Captum."""
    import torch
    import torchvision

    sm, params = split(create("resnet50", 200, seed=0), at="layer4.0")
    z, ctx = jax.jit(sm.encode)(params, jax.random.normal(jax.random.key(1), (1, 224, 224, 3)))
    h, w = z.shape[1:3]
    samples = 2
    evals = 2 * h * w * samples
    dt = timed(lambda: saliency.compute(sm, params, z, ctx, jnp.array([0]), kernel=3, samples=samples,
                                        key=jax.random.key(2)), repeats=1)
    out = {"grid": list(z.shape[1:]), "evaluations": evals, "local": {"s": dt, "evals_per_s": evals / dt}}
    zb = jnp.broadcast_to(z, (evals, *z.shape[1:])) * jax.random.bernoulli(
        jax.random.key(3), 0.5, (evals, h, w, 1))
    head = jax.jit(lambda zz: jax.nn.softmax(sm.head(params, zz, {}), -1)[:, 0])
    dt = timed(lambda: head(zb), repeats=1)
    out["bare_head"] = {"s": dt, "evals_per_s": evals / dt}
    out["local"]["of_bare"] = out["local"]["evals_per_s"] / out["bare_head"]["evals_per_s"]
    tv = torchvision.models.resnet50(num_classes=200).eval()
    torch_head = torch.nn.Sequential(*list(tv.layer4)[1:], torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                     tv.fc)
    z_t = torch.relu(torch.randn(1, 2048, h, w))
    captum_yardstick(out, captum_rates(torch_head, z_t, (h, w), n_samples=1), ("local",))
    return out


def block_game(cache: Path):
    """A 16-player game on a trained model: the demo's resnet_tiny trained on digits (cached in ``cache``,
    as benchmarks/end_to_end.py does), split ``layer4`` (GAP + fc fast path), the first test digit,
    its predicted class; players are the 2x2 blocks of the 8x8 feature map."""
    from end_to_end import digits_model

    from fgvce_jax import data, models

    model, _ = models.load(digits_model(cache, 3))
    sm, params = split(model, at="layer4")
    image = data.load("digits", "test").images(np.arange(1))
    z, _ = jax.jit(sm.encode)(params, jnp.asarray(image))
    logits = sm.head(params, z, {})
    game = shapley.feature_game(sm, params, z[0], {}, int(jnp.argmax(logits[0])))
    up = lambda m: jnp.repeat(jnp.repeat(m.reshape(-1, 4, 4), 2, axis=1), 2, axis=2)  # noqa: E731
    return lambda m: game(up(m)), 16


def shapiq_errors(v_np, n, exact, budgets, reps) -> dict:
    """RMSE vs exact of shapiq's approximators on the same game (None where they do not run)."""
    try:
        import shapiq
    except ImportError as e:
        return {"error": str(e)}
    out = {}
    for name in ("PermutationSamplingSV", "KernelSHAP", "SVARM"):
        cls = getattr(shapiq.approximator, name, None) or getattr(shapiq, name, None)
        if cls is None:
            continue
        errs = []
        try:
            for b in budgets:
                e = []
                for r in range(reps):
                    approx = cls(n=n, random_state=r)
                    iv = approx.approximate(budget=b, game=v_np)
                    e.append(np.sqrt(np.mean((np.asarray(iv.get_n_order_values(1)) - exact) ** 2)))
                errs.append(float(np.mean(e)))
            out[name] = errs
        except Exception as ex:  # noqa: BLE001 -- a peer that fails is reported, not fatal
            out[name] = f"failed: {type(ex).__name__}: {ex}"
    return out


def bench_error(quick: bool, cache: Path) -> dict:
    """(c): RMSE of every estimator vs exact on the 16-player block game, over budgets and keys."""
    game, n = block_game(cache)
    exact = np.asarray(shapley.estimate(game, n, method="exact", budget=2 ** n, key=jax.random.key(0)).phi)
    budgets = [68, 136, 272, 544, 1088] + ([] if quick else [2176, 4352])
    reps = 4 if quick else 8
    out = {"players": n, "budgets": budgets, "reps": reps, "rmse": {}}
    for method in ("permutation", "antithetic", "kernel"):
        errs = []
        for b in budgets:
            phis = [shapley.estimate(game, n, method=method, budget=b, key=jax.random.key(r)).phi for r in range(reps)]
            errs.append(float(np.mean([np.sqrt(np.mean((np.asarray(p) - exact) ** 2)) for p in phis])))
        out["rmse"][method] = errs
    out["exact_norm"] = float(np.sqrt(np.mean(exact ** 2)))
    v_np = lambda m: np.asarray(game(jnp.asarray(np.asarray(m, bool))))  # noqa: E731
    out["shapiq"] = shapiq_errors(v_np, n, exact, budgets[:3] if quick else budgets[:5], reps)
    return out


def plot(err: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, e in err["rmse"].items():
        ax.loglog(err["budgets"], e, "o-", label=m)
    for m, e in err["shapiq"].items():
        if isinstance(e, list):
            ax.loglog(err["budgets"][:len(e)], e, "x--", label=f"shapiq {m}")
    ax.set_xlabel("budget (game evaluations)")
    ax.set_ylabel("RMSE vs exact")
    ax.set_title(f"{err['players']}-player game: trained resnet_tiny (digits), layer4")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summarize(results: dict) -> dict:
    """The README's figures: rates, and the ratios the issue's goals are stated in."""
    out = {}
    if "a" in results:
        a = results["a"]
        for m in ("local", "global"):
            out[f"(a) {m}: evaluations/s"] = a[m]["evals_per_s"]
            out[f"(a) {m}: ms per image (game building included)"] = a[m]["ms_per_image"]
            out[f"(a) {m}: speed vs bare matmul+softmax (>1 = faster)"] = a[m]["of_bare"]
            out[f"(a) {m}: x Captum ShapleyValueSampling"] = a[m]["x_captum"]
        out["(a) bare matmul+softmax: evaluations/s"] = a["bare_matmul_softmax"]["evals_per_s"]
        out["(a) bare: x Captum"] = a["bare_matmul_softmax"]["evals_per_s"] / a["captum_svs_evals_per_s"]
        out["(a) Captum: evaluations/s (fastest perturbations_per_eval)"] = a["captum_svs_evals_per_s"]
        if "flatten_linear" in a:
            f = a["flatten_linear"]
            out["(a) flatten+linear head, local: evaluations/s"] = f["local"]["evals_per_s"]
            out["(a) flatten+linear head, Captum: evaluations/s"] = f["captum_svs_evals_per_s"]
            out["(a) flatten+linear head, local: x Captum"] = f["local"]["x_captum"]
    if "b" in results:
        b = results["b"]
        out["(b) local: evaluations/s"] = b["local"]["evals_per_s"]
        out["(b) bare head: evaluations/s"] = b["bare_head"]["evals_per_s"]
        out["(b) local: speed vs bare head (>1 = faster)"] = b["local"]["of_bare"]
        out["(b) local: x Captum"] = b["local"]["x_captum"]
    if "c" in results:
        c = results["c"]
        for m, errs in c["rmse"].items():
            out[f"(c) {m}: RMSE at {c['budgets'][-1]} evaluations (exact norm {c['exact_norm']:.3g})"] = errs[-1]
    return out


NOTES = ["(a) 14x14x2048 map, 200 classes, 4 images, local k=7 and global permutation at 2 HW M = 12,544 "
         "evaluations per image, timed through saliency.compute including building the games; bare = a jitted "
         "matmul+softmax over pre-drawn masks, best of 1/8/32 chunks; Captum at its fastest of "
         "perturbations_per_eval 1 and 16. (b) ResNet-50 layer4.0 head, random weights. (c) trained digits "
         "resnet_tiny, 16 players; the plot is shapley_error.png."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c")
    parser.add_argument("--cache", default=str(Path(__file__).resolve().parents[1] / "runs" / "benchmarks"),
                        help="where (c)'s trained digits model is kept (shared with end_to_end.py)")
    args = parser.parse_args()
    env = {"devices": [str(d) for d in jax.devices()], "platform": platform.platform(),
           "versions": {p: metadata.version(p) for p in ("jax", "jaxlib", "flax", "torch", "captum", "shapiq")
                        if _installed(p)}, "quick": args.quick}
    print(json.dumps(env, indent=1))
    results = {"env": env}
    skip = set(args.skip.split(","))
    parts = (("a", bench_linear), ("b", bench_deep), ("c", functools.partial(bench_error, cache=Path(args.cache))))
    for part, fn in parts:
        if part in skip:
            continue
        t = time.perf_counter()
        results[part] = fn(args.quick)
        print(f"({part}) in {time.perf_counter() - t:.0f}s:", json.dumps(results[part], indent=1))
    name = "shapley_cost_quick.json" if args.quick else "shapley_cost.json"
    results["summary"], results["notes"] = summarize(results), NOTES
    common.write_json(RESULTS / name, results)
    if "c" in results:
        plot(results["c"], RESULTS / ("shapley_error_quick.png" if args.quick else "shapley_error.png"))
    print("wrote", RESULTS / name)


def _installed(p: str) -> bool:
    try:
        metadata.version(p)
        return True
    except metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
