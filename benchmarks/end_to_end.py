"""End-to-end cost of explaining a whole split with the pipeline, broken down by pass.

Two workloads, each run through ``fgvce_jax.pipeline.explain_split`` itself:

- ``digits``: the demo (tiny ResNet trained on scikit-learn's digits with the
  demo's own settings, or the checkpoint cached under ``--cache``); every
  misclassified test digit is explained with the demo's counterfactual config.
- ``cub``: a CUB-sized synthetic workload: a random-weight ResNet-50 with 200
  classes at 448 px (14 x 14 x 2048 feature maps; ``--arch``, ``--image-size``
  change it) on ``--images`` random smooth
  images written as a ``folder:`` dataset. A random network gives every image
  the same class, so its fc layer is calibrated on the images (bias centred on
  their mean pooled feature, weights scaled to a logit spread of 2); every
  second image is then labelled with the prediction of another image, which
  makes it a misclassified query whose true class has correctly classified
  references (the other images).

The pass times come from the pipeline's own functions, wrapped with a clock
while ``explain_split`` runs (:class:`PassClock`): ``features`` (pass 1
predictions and the feature maps of queries and references), ``selection``
(queries and references), ``shapley`` (Phi of references and queries),
``search`` (the batched counterfactual loop) and ``writing`` (result tables and
shards); ``other`` is the rest of the wall time (loading the model and data).
Each workload runs ``--repeats`` times into fresh output directories: the first
run includes compilation (``cold``), later ones reuse the compiled functions
(``warm``, the headline figure).

    python benchmarks/end_to_end.py                      # both workloads, a few minutes on 2 CPU cores
    python benchmarks/end_to_end.py --workloads cub --images 256 --at layer4.0 --samples 32   # on a GPU
    python benchmarks/end_to_end.py --quick --out /tmp/e2e.json                              # smoke test

Defaults depend on the backend: on CPU the digits workload explains the first 8
mistakes and the CUB workload uses 16 images and the ``layer4`` head (GAP + fc,
the linear fast path); on a GPU/TPU every mistake, 256 images and the paper's
``layer4.0`` head. ``--quick`` swaps in a random tiny ResNet for both
workloads and minimal budgets: it checks that the script runs, it measures nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import numpy as np

import common

from fgvce_jax.counterfactual import methods

PASSES = ("features", "selection", "shapley", "search", "writing")
CUB_CLASSES = 200
LOGIT_SPREAD = 2.0


class PassClock:
    """Seconds spent in each pass of ``explain_split``, measured by wrapping the pipeline's functions.

    Use as a context manager around one ``explain_split`` call; only the
    outermost wrapped call is counted, so nested calls are not counted twice.
    The wrapped functions return numpy arrays (or write files), so their wall
    time includes the device work.
    """

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth = 0
        self._stack = contextlib.ExitStack()

    def _wrap(self, pass_name: str, fn):
        def timed(*args, **kwargs):
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds[pass_name] += time.perf_counter() - t0
        return timed

    def __enter__(self):
        from fgvce_jax import counterfactual, pipeline, store

        targets = [(pipeline, "predict_split", "features"), (pipeline, "_features", "features"),
                   (pipeline, "select_queries", "selection"), (pipeline, "select_references", "selection"),
                   (pipeline, "phi_and_samples", "shapley"), (counterfactual, "explain", "search"),
                   (pipeline, "results_table", "writing"), (store.ShardWriter, "write_shard", "writing")]
        for owner, name, pass_name in targets:
            self._stack.enter_context(mock.patch.object(owner, name, self._wrap(pass_name, getattr(owner, name))))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False


def timed_runs(run_into, repeats: int) -> list[dict]:
    """``run_into(out_dir) -> n_queries`` ``repeats`` times into fresh directories; per-run wall time and passes."""
    runs = []
    for r in range(repeats):
        with tempfile.TemporaryDirectory(prefix="fgvce-e2e-") as tmp, PassClock() as clock:
            t0 = time.perf_counter()
            n = run_into(Path(tmp) / "out")
            total = time.perf_counter() - t0
        passes = {p: clock.seconds.get(p, 0.0) for p in PASSES}
        passes["other"] = max(0.0, total - sum(passes.values()))
        runs.append({"run": "cold" if r == 0 else "warm", "queries": n, "seconds": total,
                     "explanations_per_s": n / total if total else float("nan"), "pass_seconds": passes,
                     "pass_share": {p: s / total for p, s in passes.items()}})
        print(f"  {runs[-1]['run']}: {n} explanations in {total:.1f} s = {runs[-1]['explanations_per_s']:.3f}/s; "
              + ", ".join(f"{p} {s:.1f} s" for p, s in passes.items()), flush=True)
    return runs


# --------------------------------------------------------------------------- digits
def digits_model(cache: Path, epochs: int, image_size: int | None = None) -> Path:
    """The demo's tiny ResNet on digits, cached in ``cache``.

    Trained with the demo's settings (at ``image_size``, default the dataset's 32 px), or random with its fc
    calibrated (:func:`calibrate_fc`) if ``epochs`` = 0.
    """
    from fgvce_jax import data, models
    from fgvce_jax.commands.demo import DEMO_TRAIN
    from fgvce_jax.errors import FgvceError
    from fgvce_jax.train import TrainConfig, train

    path = (cache / f"digits-resnet_tiny-e{epochs}{'' if image_size is None else f'-{image_size}px'}").absolute()
    try:
        models.load(path)
        return path
    except FgvceError:
        pass
    if epochs == 0:
        if image_size is not None:
            raise ValueError("the calibrated random digits model is made at the dataset's own size only")
        train_set = data.load("digits", "train")
        model, _ = calibrated_random_model("resnet_tiny", 10, lambda i, j: train_set.images(np.arange(i, j)),
                                           256, seed=0)
        pre = train_set.preprocessing  # the fc is calibrated on inputs made with the dataset's own preprocessing
        info = models.ModelInfo.for_model(model, class_names=train_set.class_names)
        models.save(path, model, dataclasses.replace(info, image_size=pre.image_size, resize_size=pre.resize_size,
                                                     mean=pre.mean, std=pre.std))
    else:
        t0 = time.perf_counter()
        train(TrainConfig(**{**DEMO_TRAIN, "epochs": epochs, "image_size": image_size}), path)
        print(f"  trained resnet_tiny for {epochs} epochs in {time.perf_counter() - t0:.0f} s -> {path}")
    return path


def digits_workload(args) -> dict:
    from fgvce_jax.commands.demo import DEMO_EXPLAIN
    from fgvce_jax.counterfactual import CounterfactualConfig
    from fgvce_jax.pipeline import explain_split

    model_dir = digits_model(Path(args.cache), args.epochs)
    config = CounterfactualConfig(**{**DEMO_EXPLAIN, "method": args.method,
                                     **({"samples": args.samples, "n_references": args.references}
                                        if args.quick else {})})

    def run_into(out):
        summary, = explain_split(model_dir, "digits", "test", out, config, reference_split="train",
                                 limit=args.limit, batch_size=32, shard_size=32)
        return summary.queries

    print(f"digits: resnet_tiny ({args.epochs} epochs), demo explain config {DEMO_EXPLAIN}", flush=True)
    return {"workload": "digits", "method": args.method, "arch": "resnet_tiny", "image_size": 32, "epochs": args.epochs,
            "limit": args.limit, "config": dataclasses.asdict(config), "runs": timed_runs(run_into, args.repeats)}


# --------------------------------------------------------------------------- CUB-sized synthetic
def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size, 3): bilinear upsampled 8 x 8 colour noise, a different contrast per image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        low = rng.normal(128, rng.uniform(20, 60), size=(8, 8, 3)).clip(0, 255).astype(np.uint8)
        out[i] = np.asarray(Image.fromarray(low).resize((size, size), Image.BILINEAR))
    return out


def query_labels(preds: np.ndarray) -> np.ndarray:
    """Labels (N,) that make every second image a misclassified query with a reference of its true class.

    Images at even positions keep their prediction as label (correctly
    classified: references). An image at an odd position is labelled with the
    prediction of the nearest earlier even-position image predicted differently
    (it stays correct when there is none). So every query's true class is the
    class of at least one reference.
    """
    labels = preds.copy()
    for i in range(1, len(preds), 2):
        other = [j for j in range(i - 1, -1, -2) if preds[j] != preds[i]]
        if other:
            labels[i] = preds[other[0]]
    return labels


def calibrate_fc(model, pooled: np.ndarray) -> None:
    """Centre the fc bias on the images' mean pooled feature and scale its weights to logit std LOGIT_SPREAD."""
    import jax.numpy as jnp

    W, b = np.asarray(model.fc.kernel[...]), np.asarray(model.fc.bias[...])
    centred = (pooled - pooled.mean(0)) @ W
    scale = LOGIT_SPREAD / max(float(centred.std()), 1e-12)
    model.fc.kernel[...] = jnp.asarray(W * scale)
    model.fc.bias[...] = jnp.asarray((b - pooled.mean(0) @ W) * scale)


def calibrated_random_model(arch: str, num_classes: int, inputs, n: int, seed: int):
    """(model, predictions (n,)) of a random-weight ResNet whose fc is calibrated on ``inputs(i, j)`` (images i..j).

    A random network maps every image to nearly the same pooled feature and so
    the same class; :func:`calibrate_fc` spreads the predictions over classes.
    """
    import jax

    from fgvce_jax import models

    model = models.create(arch, num_classes, seed=seed)
    split_model, params = models.split(model, "layer4")
    pooled_fn = jax.jit(lambda p, x: split_model.encode(p, x)[0].mean((1, 2)))
    pooled = np.concatenate([np.asarray(pooled_fn(params, inputs(i, min(i + 8, n)))) for i in range(0, n, 8)])
    calibrate_fc(model, pooled)
    W, b = (np.asarray(a) for a in (model.fc.kernel[...], model.fc.bias[...]))
    return model, (pooled @ W + b).argmax(-1)


def cub_synthetic(cache: Path, arch: str, image_size: int, n_images: int, seed: int) -> tuple[Path, Path, dict]:
    """(model dir, folder dataset dir, facts) of the synthetic CUB workload, built once per setting."""
    from PIL import Image

    from fgvce_jax import models, store
    from fgvce_jax.data.dataset import Preprocessing
    from fgvce_jax.errors import FgvceError
    from fgvce_jax.models.preprocess import eval_transform

    root = (cache / f"cub-synthetic-{arch}-{image_size}px-n{n_images}-seed{seed}").absolute()
    model_dir, data_dir, facts_file = root / "model", root / "data", root / "facts.json"
    if facts_file.exists():
        return model_dir, data_dir, json.loads(facts_file.read_text())
    names = [f"class_{c:03d}" for c in range(CUB_CLASSES)]
    pre = Preprocessing.imagenet(image_size)
    images = smooth_images(n_images, pre.resize_size, seed)
    model, preds = calibrated_random_model(
        arch, CUB_CLASSES, lambda i, j: eval_transform(list(images[i:j]), pre.resize_size, pre.image_size,
                                                             pre.mean, pre.std), n_images, seed)
    if len(np.unique(preds)) < 2:
        raise FgvceError("the calibrated random model predicts one class for every image; use more --images")
    labels = query_labels(preds)
    for split in ("train", "test"):
        for name in names:
            (data_dir / split / name).mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(data_dir / "test" / names[y] / f"img_{i:04d}.png")
    info = models.ModelInfo(arch=arch, num_classes=CUB_CLASSES, class_names=names, image_size=pre.image_size,
                            resize_size=pre.resize_size, default_split="layer4.0")
    models.save(model_dir, model, info, overwrite=True)
    facts = {"images": n_images, "queries": int(np.sum(labels != preds)),
             "predicted_classes": int(len(np.unique(preds))), "seed": seed}
    store.atomic_write_json(facts_file, facts)
    return model_dir, data_dir, facts


def cub_workload(args) -> dict:
    from fgvce_jax.counterfactual import CounterfactualConfig
    from fgvce_jax.pipeline import explain_split

    t0 = time.perf_counter()
    model_dir, data_dir, facts = cub_synthetic(Path(args.cache), args.arch, args.image_size, args.images, args.seed)
    print(f"cub: synthetic data ready in {time.perf_counter() - t0:.0f} s: {facts}", flush=True)
    config = CounterfactualConfig(method=args.method, kernel=3, samples=args.samples, max_regions=8,
                                  n_references=args.references, t_max=8)

    def run_into(out):
        summary, = explain_split(model_dir, f"folder:{data_dir}", "test", out, config, reference_split="test",
                                 at=args.at, batch_size=args.batch_size, shard_size=args.shard_size)
        return summary.queries

    print(f"cub: {args.arch} {args.image_size} px, {CUB_CLASSES} classes, {args.images} images, at {args.at}, "
          f"samples {args.samples}", flush=True)
    return {"workload": "cub-synthetic", "method": args.method, "arch": args.arch, "image_size": args.image_size, "classes": CUB_CLASSES,
            "images": args.images, "at": args.at, "data": facts,
            "config": dataclasses.asdict(config), "runs": timed_runs(run_into, args.repeats)}


def summarise(results: list[dict]) -> dict:
    """Key figures for the README table: explanations/s (warm run when there is one) and the pass shares."""
    summary = {}
    for r in results:
        run = r["runs"][-1]
        name = r["workload"] + (f" ({r['images']} img, {r['at']})" if "at" in r else "") + (
            f" [{r['method']}]" if r.get("method", "fgvce") != "fgvce" else "")
        summary[f"{name}: explanations/s ({run['run']})"] = round(run["explanations_per_s"], 4)
        summary[f"{name}: queries"] = run["queries"]
        shares = ", ".join(f"{p} {100 * s:.0f}%" for p, s in run["pass_share"].items())
        summary[f"{name}: time by pass"] = shares
    return summary


def plot(results: list[dict], path) -> None:
    """Horizontal stacked bars: seconds per pass for each workload's runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{r['workload']} ({run['run']}, {run['queries']} q)", run["pass_seconds"])
            for r in results for run in r["runs"]]
    fig, ax = plt.subplots(figsize=(8, 1 + 0.5 * len(bars)))
    for i, (_, passes) in enumerate(bars):
        left = 0.0
        for j, p in enumerate((*PASSES, "other")):
            ax.barh(i, passes[p], left=left, color=f"C{j}", label=p if i == 0 else None)
            left += passes[p]
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_xlabel("seconds")
    ax.legend(fontsize=7, ncol=6, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    accel = common.on_accelerator()
    p = common.parser(__doc__, "end_to_end")
    p.add_argument("--workloads", nargs="+", choices=("digits", "cub"), default=["digits", "cub"])
    p.add_argument("--method", default="fgvce", choices=methods.names(),
                   help="the counterfactual method to time (any registered one; default fgvce)")
    p.add_argument("--cache", default=str(Path(__file__).resolve().parents[1] / "runs" / "benchmarks"),
                   help="where the trained digits model and the synthetic CUB data are kept between runs")
    p.add_argument("--epochs", type=int, default=None, help="digits: demo training epochs (0 = random weights)")
    p.add_argument("--limit", type=int, default=None, help="digits: explain at most this many mistakes "
                                                                  "(default: all on GPU/TPU, 8 on CPU)")
    p.add_argument("--images", type=int, default=None, help="cub: synthetic images (default 256 GPU/TPU, 16 CPU)")
    p.add_argument("--arch", default="resnet50", help="cub: the random-weight model")
    p.add_argument("--image-size", type=int, default=448, help="cub: input side (the map is 1/32 of it)")
    p.add_argument("--at", default=None, help="cub: split point (default layer4.0 GPU/TPU, layer4 CPU)")
    p.add_argument("--samples", type=int, default=None, help="cub: local Shapley samples per window")
    p.add_argument("--references", type=int, default=None, help="cub: references per query (N)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None, help="runs per workload (the first includes compilation)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from fgvce_jax.commands.demo import DEMO_TRAIN
    from fgvce_jax.errors import FgvceError

    quick = dict(epochs=0, limit=2, images=6, at="layer4", samples=2, references=2, batch_size=8, repeats=1,
                 arch="resnet_tiny", image_size=32)
    full = dict(epochs=DEMO_TRAIN["epochs"], limit=None if accel else 8, images=256 if accel else 16,
                at="layer4.0" if accel else "layer4", samples=32 if accel else 8, references=5, repeats=2)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None or (args.quick and k in quick):
            setattr(args, k, v)
    if args.images < 2 or args.repeats < 1:
        raise SystemExit("--images must be >= 2 and --repeats >= 1")

    env = common.environment()
    print(f"end_to_end on {common.describe(env)}", flush=True)
    runners = {"digits": digits_workload, "cub": cub_workload}
    try:
        results = [runners[w](args) for w in args.workloads]
    except FgvceError as e:
        raise SystemExit(f"end_to_end: {e}") from None
    notes = ["explanations/s = explained queries / wall time of the whole explain_split call (all passes, "
             "model and data loading included); 'warm' runs reuse compiled functions, 'cold' include compilation",
             "cub-synthetic: random-weight ResNet-50 with its fc calibrated on the synthetic images (centred bias, "
             "logit std 2); the images are random smooth patterns, so success rates mean nothing, only cost"]
    if not accel:
        notes.append("CPU run: the CUB-sized workload is cut down (few images, layer4 head); "
                     "run on a GPU for the full one (see benchmarks/README.md)")
    doc = common.document("end_to_end", env, {**vars(args), "quick": args.quick}, summarise(results), results, notes)
    common.write_json_and_plot(args.out, doc, lambda png: plot(results, png))


if __name__ == "__main__":
    main()
