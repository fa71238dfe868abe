"""``fgvce train-decoder``: train Mirror-CFE's decoder for a classifier (frozen), resumable.

Example (the classifier from ``fgvce train --arch resnet_tiny --dataset digits --out runs/digits``)::

    fgvce train-decoder --model runs/digits --dataset digits --out runs/digits-decoder --steps 300

Killing it and running the same command again resumes from ``OUT/decoder_state``; the result is the same as
an uninterrupted run. The decoder goes to ``OUT/decoder`` with ``OUT/decoder.json`` (its configuration and
the fingerprint of the classifier weights it was trained for).
"""
from __future__ import annotations

import argparse

HELP = "train Mirror-CFE's feature-to-image decoder for a classifier (ResNet split at layer4); re-running resumes"
SPLIT = "layer4"  # Mirror-CFE needs g = GAP + linear


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fgvce_jax.mirror.decoder import DecoderConfig
    from fgvce_jax.mirror.train import DecoderTrainConfig, LossConfig

    d, dd, dl = DecoderTrainConfig(), DecoderConfig(), LossConfig()
    parser.add_argument("--model", required=True, help="classifier checkpoint directory (a ResNet)")
    parser.add_argument("--dataset", required=True, help="the classifier's dataset; its train split is used")
    parser.add_argument("--out", required=True, help="output directory: decoder/, decoder.json and decoder_state/")
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    parser.add_argument("--seed", type=int, default=d.seed, help="seeds initialisation, data order, t and k draws")
    parser.add_argument("--lr", type=float, default=dl.lr, help="Adam learning rate (decoder and discriminator)")
    parser.add_argument("--width", type=int, default=dd.width, help="decoder channel width")
    parser.add_argument("--no-triangulation", action="store_true", help="ablation: drop the triangulation loss")
    parser.add_argument("--no-prior", action="store_true", help="ablation: the editor edits the skips everywhere")
    parser.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps")


def run(args: argparse.Namespace) -> int:
    from fgvce_jax import data, models
    from fgvce_jax.errors import FgvceError
    from fgvce_jax.mirror.decoder import DecoderConfig
    from fgvce_jax.mirror.train import DecoderTrainConfig, LossConfig, train_decoder

    model, info = models.load(args.model)
    if SPLIT not in model.split_points:
        raise FgvceError(f"Mirror-CFE needs a GAP + linear head at split {SPLIT!r}; {info.arch} has no such "
                         "split (use a ResNet)")
    split_model, params = models.split(model, at=SPLIT)
    train_set = data.load(args.dataset, "train", image_size=info.image_size)
    config = DecoderTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                decoder=DecoderConfig(width=args.width, prior=not args.no_prior),
                                loss=LossConfig(lr=args.lr, triangulation=not args.no_triangulation),
                                save_every=args.save_every)
    _, summary = train_decoder(split_model, params, train_set, config, args.out)
    last = summary["last"]
    print(f"decoder written to {args.out} after {summary['steps']} steps ({summary['steps_per_s']:.2f} steps/s "
          f"this run; last batch: reconstruction L1 {last.get('rec', float('nan')):.3f}, "
          f"classification KL {last.get('cls', float('nan')):.3f})")
    return 0
