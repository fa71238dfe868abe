"""Our Shapley estimators against Captum's and shapiq's on one and the same game.

The game (SPEC 2): one image's feature map Z (7 x 7 x D at 224 px) at a
ResNet split, players = the 49 positions, ``v(m) = softmax(g(Z * m))_c`` for
the predicted class c (zero baseline, prob output). The model is a torchvision
ResNet with random weights (``torch.manual_seed``), converted to Flax with
``converters.convert``; its fc is calibrated on a few random images as in
``end_to_end.py`` (a random network otherwise gives a saturated softmax and
so a flat game) and copied back to torch, so both sides hold identical
weights. The JAX side evaluates ``g`` through ``fgvce_jax.shapley.feature_game``
(with its GAP + linear fast path at ``layer4``; the row ``permutation
(generic head)`` switches it off), Captum and shapiq evaluate the torch head.

Every estimator gets the same budget of game evaluations and runs
``--trials`` times with different seeds after one untimed warm-up call. Error
= ||phi - phi_ref|| / ||phi_ref|| (root mean square over the trials) against
a reference from our ``antithetic_cv`` estimator at ``--reference-budget``
evaluations; its own noise is estimated from two independent halves (at the
default 8 million it is about 0.002, far below the errors compared; the runs
before 2026-12-06 used 400,000 antithetic evaluations, noise 0.031, which
inflated every small error).
``local`` (the saliency partition, k = 3, outside absent) estimates a
different quantity, so only its cost is compared; ``local (k covers map,
outside present)`` is the global Shapley value by SPEC 3 and has an error.

    python benchmarks/peers.py                       # a few minutes on 2 CPU cores
    python benchmarks/peers.py --at layer4.0 --budget 5000 --reference-budget 200000   # on a GPU
    python benchmarks/peers.py --quick --out /tmp/peers.json
"""
from __future__ import annotations

import inspect
import time

import numpy as np

import common
from end_to_end import calibrate_fc, smooth_images


# --------------------------------------------------------------------------- the model on both sides
def build_models(arch: str, num_classes: int, image_size: int, seed: int):
    """(flax model, torch model, calibration images (8, S, S, 3)) with identical, calibrated weights."""
    import torch
    import torchvision

    import converters
    from fgvce_jax import models
    from fgvce_jax.data.dataset import Preprocessing
    from fgvce_jax.models.preprocess import eval_transform

    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(num_classes=num_classes).eval()
    model = converters.convert(arch, net.state_dict())
    pre = Preprocessing.imagenet(image_size)
    x = eval_transform(list(smooth_images(8, pre.resize_size, seed)), pre.resize_size, pre.image_size,
                       pre.mean, pre.std)
    split_model, params = models.split(model, "layer4")
    calibrate_fc(model, np.asarray(split_model.encode(params, x)[0].mean((1, 2))))
    with torch.no_grad():
        net.fc.weight.copy_(torch.from_numpy(np.asarray(model.fc.kernel[...]).T.copy()))
        net.fc.bias.copy_(torch.from_numpy(np.asarray(model.fc.bias[...]).copy()))
    return model, net, x


def torch_head(net, at: str):
    """z (B, D, H, W) -> logits (B, C): what follows split ``at`` in the torch ResNet."""
    import torch

    rest = {"layer4": [], "layer4.0": list(net.layer4.children())[1:]}[at]
    return torch.nn.Sequential(*rest, net.avgpool, torch.nn.Flatten(), net.fc).eval()


def torch_game(head, z_t, cls: int):
    """The game for shapiq: coalitions bool (B, n) or (n,) -> prob of ``cls`` (B,) numpy; z_t (1, D, H, W)."""
    import torch

    def game(coalitions):
        m = torch.from_numpy(np.atleast_2d(coalitions).astype(np.float32)).reshape(-1, 1, *z_t.shape[2:])
        with torch.no_grad():
            return torch.softmax(head(z_t * m), -1)[:, cls].numpy().astype(np.float64)
    return game


# --------------------------------------------------------------------------- estimators
def ours(name, game, n, budget, grid, *, local_kernel=3, outside="absent"):
    """fn(seed) -> phi (n,) numpy for one of our estimators, and the evaluations it uses."""
    import jax

    from fgvce_jax import shapley

    if name == "local":
        h, w = grid
        samples = max(2, 2 * round(budget / (4 * h * w)))  # paired: 2 HW M evaluations
        def fn(seed):
            return np.asarray(shapley.local(game, grid, kernel=local_kernel, samples=samples, key=jax.random.key(seed),
                                            outside=outside)).reshape(-1)
        return fn, 2 * h * w * samples
    res = shapley.estimate(game, n, method=name, budget=budget, key=jax.random.key(0))
    return (lambda seed: np.asarray(shapley.estimate(game, n, method=name, budget=budget,
                                                     key=jax.random.key(seed)).phi)), res.evaluations


def captum(name, head, z_t, cls, n, budget, batch):
    """fn(seed) -> phi (n,) for Captum's ShapleyValueSampling or KernelShap on the torch head."""
    import torch
    from captum.attr import KernelShap, ShapleyValueSampling

    h, w = z_t.shape[2:]
    mask = torch.arange(n).reshape(1, 1, h, w)
    forward = torch.nn.Sequential(head, torch.nn.Softmax(-1))
    if name == "ShapleyValueSampling":
        perms = max(1, budget // (n + 1))
        algo, kwargs, evals = ShapleyValueSampling(forward), {"n_samples": perms}, perms * (n + 1) + 1
    else:
        algo, kwargs, evals = KernelShap(forward), {"n_samples": budget}, budget

    def fn(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            attr = algo.attribute(z_t, baselines=0.0, target=cls, feature_mask=mask, perturbations_per_eval=batch,
                                  **kwargs)
        return attr[0, 0].reshape(-1).numpy().astype(np.float64)  # the same value on every channel
    return fn, evals


def shapiq_fn(name, game, n, budget):
    """fn(seed) -> phi (n,) for a shapiq approximator of the Shapley value (first-order values)."""
    from shapiq import approximator

    cls = getattr(approximator, name)
    batching = {"batch_size": budget} if "batch_size" in inspect.signature(cls.approximate).parameters else {}
    # each approximator at its best setting: paired coalitions wherever it offers them
    paired = {"pairing_trick": True} if "pairing_trick" in inspect.signature(cls.__init__).parameters else {}

    def fn(seed):
        values = cls(n, random_state=seed, **paired).approximate(budget, game, **batching)
        return np.asarray([values[(i,)] for i in range(n)], np.float64)
    return fn, budget


def measure(fn, trials: int, reference: np.ndarray | None):
    """Warm-up call, then ``trials`` timed calls with seeds 1..trials: (median seconds, relative RMS error)."""
    fn(0)
    times, errors = [], []
    for seed in range(1, trials + 1):
        t0 = time.perf_counter()
        phi = fn(seed)
        times.append(time.perf_counter() - t0)
        if reference is not None:
            errors.append(np.linalg.norm(phi - reference) / np.linalg.norm(reference))
    return float(np.median(times)), (float(np.sqrt(np.mean(np.square(errors)))) if errors else None)


SHAPIQ = ("PermutationSamplingSV", "KernelSHAP", "kADDSHAP", "SVARM", "StratifiedSamplingSV", "UnbiasedKernelSHAP",
          "OwenSamplingSV")
PAIRS = {"permutation": [("captum", "ShapleyValueSampling"), ("shapiq", "PermutationSamplingSV")],
         "kernel": [("captum", "KernelShap"), ("shapiq", "KernelSHAP")],
         "leverage": [("shapiq", "KernelSHAP")],
         "svarm": [("shapiq", "SVARM")],
         "stratified_svarm": [("shapiq", "SVARM")]}


def run(args) -> tuple[dict, list[dict], dict]:
    import jax
    import jax.numpy as jnp
    import torch

    from fgvce_jax import models, shapley
    from fgvce_jax.errors import FgvceError

    model, net, x = build_models(args.arch, args.classes, args.image_size, args.seed)
    split_model, params = models.split(model, args.at)
    z = split_model.encode(params, x[:1])[0][0]  # (H, W, D)
    cls = int(jnp.argmax(split_model.head(params, z[None])[0]))
    h, w, d = z.shape
    n = h * w
    head = torch_head(net, args.at)
    z_t = torch.from_numpy(np.asarray(z).transpose(2, 0, 1)[None].copy())
    game = shapley.feature_game(split_model, params, z, None, cls, output="prob")
    generic = shapley.feature_game(split_model, params, z, None, cls, output="prob", fast=False)
    t_game = torch_game(head, z_t, cls)
    masks = np.random.default_rng(0).random((64, n)) < 0.5
    parity = float(np.max(np.abs(np.asarray(game(jnp.asarray(masks))) - t_game(masks))))
    v_full, v_empty = (float(game(jnp.full((1, n), present))[0]) for present in (True, False))
    print(f"game: {args.arch} at {args.at}, Z {h}x{w}x{d}, class {cls}, v(full) {v_full:.4f}, v(empty) {v_empty:.4f}; "
          f"JAX vs torch max |dv| on 64 coalitions {parity:.2e}",
          flush=True)

    t0 = time.perf_counter()
    half = args.reference_budget // 2
    ref_a, ref_b = (np.asarray(shapley.estimate(game, n, method="antithetic_cv", budget=half,
                                                key=jax.random.key(10_000 + i)).phi, np.float64) for i in range(2))
    reference = (ref_a + ref_b) / 2
    ref_noise = float(np.linalg.norm(ref_a - ref_b) / 2 / np.linalg.norm(reference))
    print(f"reference: antithetic_cv, {args.reference_budget} evaluations in {time.perf_counter() - t0:.1f} s, "
          f"estimated relative noise {ref_noise:.4f}; sum(phi) {reference.sum():.4f}", flush=True)

    rows = []

    def add(library, estimator, fn_evals, has_error=True):
        fn, evals = fn_evals
        try:
            seconds, error = measure(fn, args.trials, reference if has_error else None)
        except Exception as e:  # noqa: BLE001 -- a peer that fails is recorded, not fatal
            rows.append({"library": library, "estimator": estimator, "failed": f"{type(e).__name__}: {e}"[:300]})
            print(f"  {library:7s} {estimator:40s} failed: {rows[-1]['failed']}", flush=True)
            return
        rows.append({"library": library, "estimator": estimator, "evaluations": int(evals), "ms": 1e3 * seconds,
                     "evaluations_per_s": evals / seconds, "relative_error": error})
        err = "      -" if error is None else f"{error:7.4f}"
        print(f"  {library:7s} {estimator:40s} {evals:7d} evals {1e3 * seconds:9.1f} ms "
              f"{evals / seconds:12.0f} evals/s  error {err}", flush=True)

    budget = args.budget
    for name in shapley.names():  # every registered estimator but exact enumeration
        if name == "exact":
            continue
        try:
            fn_evals = ours(name, game, n, budget, (h, w))
        except FgvceError as e:  # an estimator that refuses this game size (stratified_kernel: n <= 32)
            rows.append({"library": "ours", "estimator": name, "failed": f"does not apply: {e}"[:300]})
            print(f"  ours    {name:40s} does not apply: {e}", flush=True)
            continue
        add("ours", name, fn_evals)
    if args.at == "layer4":
        add("ours", "permutation (generic head)", ours("permutation", generic, n, budget, (h, w)))
    add("ours", "local (k=3, outside absent)", ours("local", game, n, budget, (h, w)), has_error=False)
    add("ours", "local (k covers map, outside present)",
        ours("local", game, n, budget, (h, w), local_kernel=2 * max(h, w) - 1, outside="present"))
    for name in ("ShapleyValueSampling", "KernelShap"):
        add("captum", name, captum(name, head, z_t, cls, n, budget, args.torch_batch))
    for name in args.shapiq:
        add("shapiq", name, shapiq_fn(name, t_game, n, budget))

    game_info = {"arch": args.arch, "at": args.at, "grid": [h, w, d], "players": n, "class": cls,
                 "output": "prob", "baseline": "zero", "jax_torch_max_abs_diff": parity,
                 "reference": {"method": "antithetic_cv", "evaluations": args.reference_budget,
                               "relative_noise": ref_noise}}
    return game_info, rows, ratios(rows)


def ratios(rows: list[dict]) -> dict:
    """For each of our estimators with a peer counterpart: peer ms / our ms, and both errors."""
    by = {(r["library"], r["estimator"]): r for r in rows if "ms" in r}
    out = {}
    for ours_name, peers in PAIRS.items():
        mine = by.get(("ours", ours_name))
        for lib, name in peers:
            peer = by.get((lib, name))
            if mine and peer:
                out[f"{ours_name} vs {lib} {name}"] = {
                    "speedup": peer["ms"] / mine["ms"], "ours_error": mine["relative_error"],
                    "peer_error": peer["relative_error"]}
    return out


def plot(rows: list[dict], game: dict, path) -> None:
    """Time per explanation (log) against relative error, one labelled point per estimator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ours": "tab:blue", "captum": "tab:red", "shapiq": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r.get("relative_error") is None:
            continue
        ax.scatter(r["ms"], r["relative_error"], color=colours[r["library"]])
        ax.annotate(f"{r['library']} {r['estimator']}", (r["ms"], r["relative_error"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("ms per explanation (log)")
    ax.set_ylabel("relative error vs reference")
    ax.set_title(f"{game['arch']} {game['at']}, {game['players']} players, equal budget", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = common.parser(__doc__, "peers")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--at", default="layer4", choices=("layer4", "layer4.0"))
    p.add_argument("--budget", type=int, default=2500, help="game evaluations per estimate, the same for all")
    p.add_argument("--reference-budget", type=int, default=8_000_000)
    p.add_argument("--trials", type=int, default=20, help="timed runs (seeds) per estimator")
    p.add_argument("--torch-batch", type=int, default=256, help="Captum perturbations_per_eval")
    p.add_argument("--shapiq", nargs="*", default=list(SHAPIQ), help="shapiq approximators to run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.classes, args.image_size, args.budget, args.reference_budget, args.trials = (
            "resnet18", 10, 64, 200, 4000, 1)
        args.shapiq = ["PermutationSamplingSV", "KernelSHAP"]
    import torch

    env = common.environment()
    env["torch_threads"] = torch.get_num_threads()
    print(f"peers on {common.describe(env)}; torch on cpu with {env['torch_threads']} threads", flush=True)
    game, rows, pairs = run(args)
    summary = {}
    for r in rows:
        err = "" if r.get("relative_error") is None else f", rel. error {r['relative_error']:.4f}"
        summary[f"{r['library']} {r['estimator']}"] = (
            f"failed: {r['failed'][:80]}" if "failed" in r else
            f"{r['ms']:.3g} ms, {r['evaluations_per_s']:.3g} evals/s{err}")
    summary.update({f"speed-up, ours {k}": round(v["speedup"], 2) for k, v in pairs.items()})
    notes = [f"same game for all: {game['arch']} {game['at']} head, {game['players']} players, prob output, "
             f"budget {args.budget} evaluations; times are medians of {args.trials} runs after a warm-up call",
             "Captum and shapiq evaluate the torch head (CPU torch); ours evaluate the JAX head on the JAX device",
             "speedup = peer ms / our ms for the matched algorithm (permutation sampling, KernelSHAP)",
             "shapiq approximators whose approximate() takes batch_size get batch_size=budget (as many coalitions "
             "per game call as they allow); the others evaluate in their own batches",
             "shapiq approximators that offer pairing_trick run with it on (their best setting)"]
    doc = common.document("peers", env, vars(args), summary, {"game": game, "estimators": rows, "ratios": pairs},
                          notes)
    common.write_json_and_plot(args.out, doc, lambda png: plot(rows, game, png))


if __name__ == "__main__":
    main()
