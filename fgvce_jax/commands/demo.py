"""``fgvce demo``: train the tiny ResNet on digits, explain its mistakes, write the report.

Example::

    fgvce demo --out demo_out      # DIR/model, DIR/explanations/fgvce, DIR/report.html

Re-running reuses the trained model and the finished explanation shards.
"""
from __future__ import annotations

import time
from pathlib import Path

HELP = "train a tiny model on digits, explain every misclassified test digit and write the report"

# Small budgets that keep the whole demo to a few minutes on 2 CPU cores.
DEMO_TRAIN = {"arch": "resnet_tiny", "dataset": "digits", "epochs": 3, "batch_size": 64, "lr": 0.05}
DEMO_EXPLAIN = {"kernel": 3, "samples": 8, "max_regions": 8, "n_references": 5, "t_max": 8}
# g = GAP + fc at `layer4` (8 x 8 map for resnet_tiny): the game's linear fast path (SPEC 2)
# makes Phi cheap; `fgvce explain` defaults to the checkpoint's split, layer4.0.
DEMO_SPLIT = "layer4"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    parser.add_argument("--epochs", type=int, default=DEMO_TRAIN["epochs"],
                        help=f"training epochs when no model is cached (default {DEMO_TRAIN['epochs']})")
    parser.add_argument("--limit", type=int, default=None, help="explain at most this many mistakes (default: all)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace explanations of other settings in --out (an earlier version's); the model is kept")


def _model(out: Path, epochs: int) -> Path:
    """``out/model``: reused when it loads, else trained (resuming an interrupted training)."""
    from fgvce_jax import models
    from fgvce_jax.errors import FgvceError
    from fgvce_jax.train import TrainConfig, train

    path = out / "model"
    try:
        models.load(path)
        print(f"reusing the model in {path}")
        return path
    except FgvceError:  # absent or unfinished: (re)train below, resuming its train_state
        pass
    print(f"training resnet_tiny on digits for {epochs} epochs -> {path}")
    _, _, history = train(TrainConfig(**{**DEMO_TRAIN, "epochs": epochs}), path)
    print(f"test accuracy {history[-1]['test_accuracy']:.3f}")
    return path


def run(args) -> int:
    from fgvce_jax.counterfactual import CounterfactualConfig
    from fgvce_jax.pipeline import explain_split
    from fgvce_jax.report import write_report

    t0 = time.perf_counter()
    out = Path(args.out).absolute()
    model = _model(out, args.epochs)
    explain_split(model, "digits", "test", out / "explanations", CounterfactualConfig(**DEMO_EXPLAIN),
                  reference_split="train", limit=args.limit, at=DEMO_SPLIT, batch_size=32, shard_size=32,
                  overwrite=args.overwrite)
    page = write_report(out / "explanations", out / "report.html")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; open {page}")
    return 0
