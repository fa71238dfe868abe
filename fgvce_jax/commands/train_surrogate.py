"""``fgvce train-surrogate``: the GLANCE-style global model of a classifier (docs/glance.md): the concept
surrogate on the training split's pooled latents, the causal graph, then the generator distilled from the
classifier and the surrogate (docs/glance_generator.md; ``--generator-steps 0`` skips it).

Example (morphometrics as the context features; y_hat = log-odds of an even digit)::

    fgvce train-surrogate --model runs/morpho --dataset morpho-digits-shortcut --out runs/morpho/glance \\
        --prediction-classes 0 2 4 6 8

Re-running the same command resumes the surrogate's and the generator's training; OUT then holds
``surrogate_state/``, ``graph.json``, ``graph.png``, ``global.json`` and ``generator_state/``
(``glance.fit.load`` reads them back).
"""
from __future__ import annotations

import argparse

from fgvce_jax.glance.distil import DistilConfig
from fgvce_jax.glance.surrogate import SurrogateConfig

HELP = ("train the GLANCE-style concept surrogate of a classifier, its causal graph and its generator; "
        "re-running resumes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d, dg = SurrogateConfig(), DistilConfig()
    parser.add_argument("--model", required=True, help="model checkpoint directory")
    parser.add_argument("--dataset", required=True, help="dataset name; its train split is used")
    parser.add_argument("--out", required=True, help="output directory: surrogate_state/, graph.json, graph.png, global.json, generator_state/")
    parser.add_argument("--context", default=None,
                        help="CSV of context features keyed by image id (default: the measured morphometrics)")
    parser.add_argument("--prediction-classes", type=int, nargs="+", required=True,
                        help="the prediction node is the log-odds that the classifier says one of these classes")
    parser.add_argument("--split", default="layer4", help="split point with a GAP + linear head")
    parser.add_argument("--n-free", type=int, default=d.n_free, help="free concepts K")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="surrogate training epochs")
    parser.add_argument("--method", choices=("pc", "ges"), default="pc", help="causal discovery")
    parser.add_argument("--alpha", type=float, default=0.01, help="PC's Fisher-z test level")
    parser.add_argument("--generator-steps", type=int, default=dg.steps,
                        help="training steps of the generator (0: no generator)")
    parser.add_argument("--generator-batch", type=int, default=dg.batch_size, help="generator batch size")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the surrogate's and the generator's initialisation and batches")


def run(args: argparse.Namespace) -> int:
    import jax

    from fgvce_jax import data, models
    from fgvce_jax.errors import FgvceError
    from fgvce_jax.glance import fit

    if args.generator_steps < 0:
        raise FgvceError(f"--generator-steps must be >= 0, got {args.generator_steps}")
    model, info = models.load(args.model)
    split_model, params = models.split(model, args.split)
    train_set = data.load(args.dataset, "train", image_size=info.image_size)
    u, names = fit.context_features(train_set, args.context)
    config = SurrogateConfig(n_free=args.n_free, epochs=args.epochs)
    g = fit.fit_global(split_model, params, train_set, u, names, args.out, key=jax.random.key(args.seed),
                       prediction_classes=args.prediction_classes, config=config, method=args.method,
                       alpha=args.alpha)
    into = [e["from"] for e in g.graph.to_json()["directed"] if e["to"] == fit.SINK]
    print(f"surrogate and graph written to {args.out}; parents of {fit.SINK}: {', '.join(into) or 'none'}")
    if args.generator_steps:
        gen = DistilConfig(steps=args.generator_steps, batch_size=args.generator_batch)
        distilled = fit.fit_generator(split_model, params, train_set, g, args.out,
                                      key=jax.random.fold_in(jax.random.key(args.seed), 1), config=gen)
        print(f"generator written to {args.out}: {args.generator_steps} steps, last latent-matching loss "
              f"{distilled.history[-1]['g_extra']:.4f}")
    return 0
