"""Cost of Mirror-CFE (issue 12): explanations/s with the path decode, and decoder training steps/s.

The classifier is ``resnet_tiny`` on the embedded digits (32 px), split at ``layer4``; its weights are random
(seeded): the cost of a forward pass, of the path and of the decoder does not depend on their values, and no
training run is needed first. Queries are the first test digits with s = the prediction and t = s + 1 mod 10.

- explanations/s: ``fgvce_jax.mirror.explain.explain`` on a batch of Q queries, each decoded at the K = 21
  points k = 0, 0.05, ..., 1 (the features and skips of the sources, the L-BFGS-refined path, the decoder at
  every k and the full classifier on every decoded image), timed after one warm-up call with the same
  shapes (compilation excluded); Q / best time. decodes/s = Q K / best time.
- training steps/s: ``fgvce_jax.mirror.train.train_decoder`` (G step + PatchGAN D step) on the digits train
  split, its own rate: the steps after the first (compiling) one over their wall time.

    python benchmarks/mirror_cost.py            # width 32 (the default decoder), a few minutes on 2 CPU cores
    python benchmarks/mirror_cost.py --quick    # width 8, tiny batches: a smoke run, not a measurement
"""
from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import common
from fgvce_jax import data, models
from fgvce_jax.mirror import decoder as dec
from fgvce_jax.mirror import explain as mx
from fgvce_jax.mirror import geometry as geo
from fgvce_jax.mirror import train as mt

NAME = "mirror_cost"


def main() -> None:
    p = common.parser(__doc__, NAME)
    p.add_argument("--queries", type=int, default=32, help="queries per explain call (Q)")
    p.add_argument("--width", type=int, default=dec.DecoderConfig().width, help="decoder width")
    p.add_argument("--train-steps", type=int, default=21, help="decoder training steps timed (the first compiles)")
    p.add_argument("--batch-size", type=int, default=mt.DecoderTrainConfig().batch_size)
    p.add_argument("--repeats", type=int, default=3, help="timed explain calls after the warm-up")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.queries, args.width, args.train_steps, args.batch_size, args.repeats = 4, 8, 3, 8, 1
    env = common.environment()
    print(common.describe(env))

    model = models.create("resnet_tiny", 10, seed=args.seed)
    split_model, params = models.split(model, at="layer4")
    train_set, test_set = data.load("digits", "train"), data.load("digits", "test")
    config = mt.DecoderTrainConfig(steps=args.train_steps, batch_size=args.batch_size, seed=args.seed,
                                   decoder=dec.DecoderConfig(width=args.width), save_every=args.train_steps)
    with tempfile.TemporaryDirectory() as tmp:
        _, summary = mt.train_decoder(split_model, params, train_set, config, tmp)
        decoder = mx.load_decoder(tmp, split_model, params)
    train_rate = summary["steps_per_s"]
    print(f"decoder training: {train_rate:.3f} steps/s (batch {args.batch_size}, width {args.width}, "
          f"{args.train_steps} steps, the first compiling)")

    x = jnp.asarray(test_set.images(np.arange(args.queries)))
    s = np.asarray(jax.jit(split_model.logits)(params, x).argmax(-1))
    t = (s + 1) % 10
    K = len(geo.DEFAULT_KS)
    explanation, timing = common.time_call(lambda: mx.explain(split_model, params, decoder, x, s, t),
                                           repeats=args.repeats)
    rate = args.queries / timing.best
    print(f"explain: {rate:.2f} explanations/s ({args.queries} queries x {K} k-points in {timing.best:.3f} s "
          f"best of {args.repeats}; {rate * K:.1f} decodes/s)")

    summary_row = {"explanations per s (path decode included)": rate, "decodes per s": rate * K,
                   "decoder training steps per s": train_rate}
    settings = {**{k: v for k, v in vars(args).items() if k != "out"}, "k_points": K,
                "classifier": "resnet_tiny (random weights), layer4", "dataset": "digits (32 px)"}
    results = {"explain": {**timing.as_dict(), "queries": args.queries, "k_points": K,
                           "explanations_per_s": rate, "flipped_share": float(explanation.success.mean())},
               "train": {"steps": summary["steps"], "steps_per_s": train_rate, "batch_size": args.batch_size,
                         "width": args.width}}
    notes = ["Random classifier weights: the timings do not depend on them; flipped_share is not a quality "
             "figure (an untrained decoder for a random classifier).",
             "explain is timed after a warm-up call with the same shapes (compilation excluded); training's rate "
             "leaves out its first step (compilation).",
             f"Host load average at the start: {env['load_average_1min']}."]
    print(f"wrote {common.write_json(args.out, common.document(NAME, env, settings, summary_row, results, notes))}")


if __name__ == "__main__":
    main()
