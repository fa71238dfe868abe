"""Mirror-CFE's ablation over seeds (issue 12): does the full decoder, with the class-activation-map prior (CSP)
and the triangulation loss, flip more mirror images than the ablation without both?

The classifier is ``resnet_tiny`` trained as the slow acceptance test trains it (2 epochs on the digits, batch
64, lr 0.05; deterministic), split at ``layer4``. Every decoder has the acceptance test's configuration (width
16, batch 16, Adam lr 1e-3, the default loss weights) and differs only in its arm and seed:

- ``full``: CSP and triangulation (the method);
- ``ablation``: neither (``DecoderConfig(prior=False)``, ``LossConfig(triangulation=False)``);
- ``triangulation_only`` and ``prior_only``: one of the two;
- ``full_w_tri_W``: the full decoder with the triangulation weight W instead of the default.

Each decoder is measured by ``fgvce_jax.mirror.pairs.decoder_figures`` on every test digit the classifier
assigns to 3, 8, 4, 9, 5 or 6, with t the paper's partner (3<->8, 4<->9, 5<->6): validity at k = 1 (the share of
mirror images assigned to t), success and mean k_first, the rising share of p_t(k), L1, LPIPS, D.Val,
FD-classifier and the reconstruction L1. The training is deterministic per seed, so a rerun gives the same
figures (without XLA_FLAGS; forcing host devices changes XLA's CPU reductions and so the runs).

The grid: ``full`` and ``ablation`` at every seed and every step count; the other arms at ``--component-seeds``
and the first step count. The JSON is rewritten after every run (``complete`` is false until the last).

    python benchmarks/mirror_ablation.py          # the study of docs/mirror.md: about 45 minutes on 2 idle cores
    python benchmarks/mirror_ablation.py --quick  # 1 seed, 3 steps, width 8: a smoke run, not a measurement
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

import common
from fgvce_jax import data, models
from fgvce_jax.mirror import decoder as dec
from fgvce_jax.mirror import explain as mx
from fgvce_jax.mirror import pairs
from fgvce_jax.mirror import train as mt
from fgvce_jax.train import TrainConfig, train

NAME = "mirror_ablation"


def arm_config(arm: str, base: mt.DecoderTrainConfig, seed: int, steps: int) -> mt.DecoderTrainConfig:
    """The training configuration of one arm (see the module docstring) at ``seed`` and ``steps``."""
    prior = arm in ("full", "prior_only") or arm.startswith("full_w_tri_")
    tri = arm in ("full", "triangulation_only") or arm.startswith("full_w_tri_")
    loss = dataclasses.replace(base.loss, triangulation=tri)
    if arm.startswith("full_w_tri_"):
        loss = dataclasses.replace(loss, w_tri=float(arm.removeprefix("full_w_tri_")))
    return dataclasses.replace(base, seed=seed, steps=steps, save_every=steps, loss=loss,
                               decoder=dataclasses.replace(base.decoder, prior=prior))


def grid(seeds, steps, component_seeds, w_tris) -> list[tuple[str, int, int]]:
    """(arm, seed, steps) of every run, in the order they run."""
    runs = [(arm, seed, n) for n in steps for seed in seeds for arm in ("full", "ablation")]
    others = ["triangulation_only", "prior_only", *(f"full_w_tri_{w:g}" for w in w_tris)]
    return runs + [(arm, seed, steps[0]) for seed in component_seeds for arm in others]


def summarise(rows: list[dict]) -> dict:
    """Mean validity at k = 1 per (arm, steps), and the full decoder's mean lead over the ablation per steps
    (over the seeds both have)."""
    out = {}
    for arm, n in sorted({(r["arm"], r["steps"]) for r in rows}, key=lambda a: (a[1], a[0])):
        v = [r["validity_k1"] for r in rows if r["arm"] == arm and r["steps"] == n]
        out[f"{arm}, {n} steps: mean validity at k = 1 ({len(v)} seeds)"] = float(np.mean(v))
    for n in sorted({r["steps"] for r in rows}):
        by = {(r["arm"], r["seed"]): r["validity_k1"] for r in rows if r["steps"] == n}
        both = [s for a, s in by if a == "full" and ("ablation", s) in by]
        if both:
            out[f"{n} steps: full minus ablation, mean over {len(both)} seeds"] = float(
                np.mean([by[("full", s)] - by[("ablation", s)] for s in both]))
    return out


def main() -> None:
    p = common.parser(__doc__, NAME)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="decoder seeds of full and ablation")
    p.add_argument("--steps", type=int, nargs="+", default=[600, 2000], help="decoder training steps")
    p.add_argument("--component-seeds", type=int, nargs="*", default=[0, 1],
                   help="seeds of the one-component arms and the other triangulation weights")
    p.add_argument("--w-tri", type=float, nargs="*", default=[20.0, 50.0], help="other triangulation weights")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--classifier-epochs", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.component_seeds, args.w_tri = [0], [3], [0], [20.0]
        args.width, args.batch_size, args.classifier_epochs = 8, 8, 1
    env = common.environment()
    print(common.describe(env))

    train_set, test_set = data.load("digits", "train"), data.load("digits", "test")
    base = mt.DecoderTrainConfig(batch_size=args.batch_size, decoder=dec.DecoderConfig(width=args.width),
                                 loss=mt.LossConfig(lr=args.lr))
    settings = {**{k: v for k, v in vars(args).items() if k != "out"}, "dataset": "digits (32 px)",
                "classifier": f"resnet_tiny, {args.classifier_epochs} epochs (batch 64, lr 0.05), layer4",
                "decoder": dataclasses.asdict(base)}
    notes = ["Validity at k = 1 is over every pair query, flipped or not; the acceptance test's bar is "
             "full >= ablation + 0.2.",
             f"Host load average at the start: {env['load_average_1min']}."]
    runs = grid(args.seeds, args.steps, args.component_seeds, args.w_tri)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model, _, history = train(TrainConfig(epochs=args.classifier_epochs, batch_size=64, lr=0.05),
                                  Path(tmp) / "classifier", train_set=train_set, test_set=test_set)
        split_model, params = models.split(model, at="layer4")
        settings["classifier_test_accuracy"] = history[-1]["test_accuracy"]
        for i, (arm, seed, steps) in enumerate(runs):
            out = Path(tmp) / f"{arm}-{seed}-{steps}"
            start = time.perf_counter()
            mt.train_decoder(split_model, params, train_set, arm_config(arm, base, seed, steps), out)
            seconds = time.perf_counter() - start
            figures = pairs.decoder_figures(split_model, params, mx.load_decoder(out, split_model, params),
                                            test_set)
            rows.append({"arm": arm, "seed": seed, "steps": steps, "train_s": seconds, **figures})
            print(f"[{i + 1}/{len(runs)}] {arm}, seed {seed}, {steps} steps: validity at k = 1 "
                  f"{figures['validity_k1']:.3f} of {figures['queries']}, reconstruction L1 {figures['rec_l1']:.3f}"
                  f" ({seconds:.0f} s training)", flush=True)
            doc = common.document(NAME, env, settings, summarise(rows),
                                  {"complete": i + 1 == len(runs), "runs": rows}, notes)
            common.write_json(args.out, doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
