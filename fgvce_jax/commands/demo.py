"""``fgvce demo``: train the tiny ResNet, explain its mistakes, write the report.

Example::

    fgvce demo --out demo_out                    # digits: DIR/model, DIR/explanations/fgvce, DIR/report.html
    fgvce demo --dataset birds --out birds_out   # birds: every method, evaluated; DIR/tables.md, DIR/tables.json
    fgvce demo --method mirror --out mirror_out  # digits with Mirror-CFE: DIR/decoder, DIR/mirror_pairs.{png,json}

On ``digits`` the demo explains every mistake with FG-VCE. On ``birds`` (parts and known causes,
:mod:`fgvce_jax.data.birds`) it regenerates the paper's tables: it explains the first ``--limit`` mistakes
with every registered region-swap method (``fgvce_jax.counterfactual.methods.names("swap")``), runs ``fgvce evaluate`` (with
Grad-CAM) and cuts its rows into the main, ablation and localisation tables
(:data:`fgvce_jax.evaluate.PAPER_TABLES`), written to ``DIR/tables.md`` and ``DIR/tables.json``.

With ``--method mirror`` (digits) it also trains Mirror-CFE's decoder briefly (``DIR/decoder``, resumable),
explains every mistake with it, evaluates it (validity, D.Val, L1, LPIPS, FD-classifier) and explains the
paper's MNIST pairs 3<->8, 4<->9, 5<->6 (:mod:`fgvce_jax.mirror.pairs`: ``DIR/mirror_pairs.png`` and ``.json``).

Re-running reuses the trained model and the finished explanation shards.
"""
from __future__ import annotations

import time
from pathlib import Path

HELP = ("train a tiny model on digits (or birds), explain its misclassified test images and write the report "
        "(birds: with every method, evaluated, and the paper's tables)")

# Small budgets that keep the whole demo to a few minutes on 2 CPU cores.
DEMO_TRAIN = {"arch": "resnet_tiny", "dataset": "digits", "epochs": 3, "batch_size": 64, "lr": 0.05}
# 32 px (an 8 x 8 map at layer4, as digits; at 64 px the map is 16 x 16 and cve's pair search alone took over
# 20 min on 2 shared cores), 1200 training birds: test accuracy 0.458 on the 400 test birds (chance 1/16);
# tests/test_train_birds.py
BIRDS_TRAIN = {"arch": "resnet_tiny", "dataset": "birds", "epochs": 4, "batch_size": 32, "lr": 0.003,
               "optimizer": "adamw", "weight_decay": 1e-4, "image_size": 32}
RECIPES = {"digits": DEMO_TRAIN, "birds": BIRDS_TRAIN}  # --dataset -> training recipe
DEMO_EXPLAIN = {"kernel": 3, "samples": 8, "max_regions": 8, "n_references": 5, "t_max": 8}
DEMO_LIMIT = {"digits": None, "birds": 16}  # mistakes explained by default (None: all)
DEMO_RISE_STEPS = 20  # deletion / insertion steps of the birds evaluation
# g = GAP + fc at `layer4` (8 x 8 map for resnet_tiny): the game's linear fast path (SPEC 2)
# makes Phi cheap; `fgvce explain` defaults to the checkpoint's split, layer4.0.
DEMO_SPLIT = "layer4"
DEMO_DECODER_STEPS = 300  # Mirror-CFE's decoder on the digits (docs/mirror.md)


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    parser.add_argument("--dataset", choices=tuple(RECIPES), default="digits",
                        help="digits (default): FG-VCE on every mistake; birds: every method on --limit mistakes, "
                             "evaluated, with the paper's main, ablation and localisation tables")
    parser.add_argument("--method", choices=("fgvce", "mirror"), default="fgvce",
                        help="digits: fgvce (default), or mirror (Mirror-CFE: trains its decoder first, "
                             f"{DEMO_DECODER_STEPS} steps)")
    parser.add_argument("--decoder-steps", type=int, default=DEMO_DECODER_STEPS,
                        help=f"--method mirror: decoder training steps (default: {DEMO_DECODER_STEPS})")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs when no model is cached (default: digits "
                             f"{DEMO_TRAIN['epochs']}, birds {BIRDS_TRAIN['epochs']})")
    parser.add_argument("--limit", type=int, default=None,
                        help=f"explain at most this many mistakes (default: digits all, birds {DEMO_LIMIT['birds']})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace explanations of other settings in --out (an earlier version's); the model is kept")


def _model(out: Path, recipe: dict) -> Path:
    """``out/model``: reused when it loads, else trained with ``recipe`` (resuming an interrupted training)."""
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
    print(f"training {recipe['arch']} on {recipe['dataset']} for {recipe['epochs']} epochs -> {path}")
    _, _, history = train(TrainConfig(**recipe), path)
    print(f"test accuracy {history[-1]['test_accuracy']:.3f}")
    return path


def _tables(out: Path) -> Path:
    """Evaluate ``out/explanations`` (``out/explanations/evaluation``) and write the paper's tables to
    ``out/tables.md`` and ``out/tables.json``; returns the Markdown path."""
    from fgvce_jax import store
    from fgvce_jax.evaluate import evaluate_directory, json_rows, paper_tables, tables_markdown

    rows, _ = evaluate_directory(out / "explanations", steps=DEMO_RISE_STEPS)
    tables = paper_tables(rows)
    text = tables_markdown(tables)
    store.atomic_write(out / "tables.md", lambda f: f.write(text.encode()))
    store.atomic_write_json(out / "tables.json", {name: json_rows(table) for name, table in tables.items()})
    print(text)
    return out / "tables.md"


def _mirror(model: Path, out: Path, steps: int):
    """Train (or resume) the demo's decoder into ``out/decoder``; returns the mirror config, and a function that
    explains the MNIST pairs and writes ``out/mirror_pairs.{json,png}``."""
    from fgvce_jax import data, models
    from fgvce_jax.counterfactual import CounterfactualConfig
    from fgvce_jax.counterfactual.methods.mirror import MirrorParams
    from fgvce_jax.mirror import pairs
    from fgvce_jax.mirror.explain import load_decoder
    from fgvce_jax.mirror.train import DecoderTrainConfig, train_decoder

    split_model, params = models.split(models.load(model)[0], at=DEMO_SPLIT)
    print(f"training Mirror-CFE's decoder ({steps} steps) -> {out / 'decoder'}")
    train_decoder(split_model, params, data.load("digits", "train"), DecoderTrainConfig(steps=steps), out / "decoder")

    def write_pairs():
        decoder = load_decoder(out / "decoder", split_model, params)
        result = pairs.explain_pairs(split_model, params, decoder, data.load("digits", "test"))
        print("pairs (source -> target: validity): " + ", ".join(
            f"{name}: {r['validity']:.2f}" for name, r in result.items() if r["queries"]))
        return pairs.write_pairs(result, out / "mirror_pairs")[1]

    return CounterfactualConfig(method="mirror", params=MirrorParams(decoder=str(out / "decoder"))), write_pairs


def run(args) -> int:
    from fgvce_jax.counterfactual import CounterfactualConfig, methods
    from fgvce_jax.errors import FgvceError
    from fgvce_jax.pipeline import explain_split
    from fgvce_jax.report import write_report

    t0 = time.perf_counter()
    out = Path(args.out).absolute()
    if args.method == "mirror" and args.dataset != "digits":
        raise FgvceError("the demo runs --method mirror on --dataset digits only")
    recipe = RECIPES[args.dataset]
    model = _model(out, {**recipe, "epochs": recipe["epochs"] if args.epochs is None else args.epochs})
    birds = args.dataset == "birds"
    configs = [CounterfactualConfig(**DEMO_EXPLAIN, method=m) for m in (methods.names("swap") if birds else ("fgvce",))]
    if args.method == "mirror":
        config, write_pairs = _mirror(model, out, args.decoder_steps)
        configs = [config]
    explain_split(model, args.dataset, "test", out / "explanations", configs, reference_split="train",
                  limit=args.limit or DEMO_LIMIT[args.dataset], at=DEMO_SPLIT, batch_size=32, shard_size=32,
                  overwrite=args.overwrite)
    if birds:
        print(f"tables in {_tables(out)}")
    if args.method == "mirror":
        from fgvce_jax.evaluate import evaluate_directory, to_markdown

        print(to_markdown(evaluate_directory(out / "explanations", use_rise=False, parts=False)[0]), end="")
        print(f"pairs in {write_pairs()}")
    page = write_report(out / "explanations", out / "report.html")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; open {page}")
    return 0
