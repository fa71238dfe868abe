"""``fgvce train``: fine-tune a classifier on a dataset (resumable)."""
from __future__ import annotations

import argparse

from fgvce_jax import data
from fgvce_jax.train import OPTIMIZERS, SCHEDULES, TrainConfig, train

HELP = "train or fine-tune a classifier on a dataset; re-running the same command resumes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--arch", default=d.arch, help="model architecture")
    parser.add_argument("--init", default=None, help="start from this checkpoint (e.g. from `fgvce convert`); "
                        "its classifier layer is re-initialised if the number of classes differs")
    parser.add_argument("--dataset", default=d.dataset, help=" | ".join(data.NAMES))
    parser.add_argument("--out", required=True, help="output directory: the model, and train_state/ to resume from")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training split")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="SGD with momentum or AdamW")
    parser.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="after a linear warm-up")
    parser.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up length")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="decoupled weight decay")
    parser.add_argument("--image-size", type=int, default=None, help="input side (default: the dataset's)")
    parser.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=d.seed, help="seeds initialisation and data order")


def run(args: argparse.Namespace) -> int:
    config = TrainConfig(arch=args.arch, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, optimizer=args.optimizer, schedule=args.schedule,
                         warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay, seed=args.seed,
                         image_size=args.image_size, init=args.init, save_every=args.save_every)
    _, _, history = train(config, args.out)
    last = history[-1] if history else {}
    print(f"model written to {args.out} (test accuracy {last.get('test_accuracy', float('nan')):.3f})")
    return 0
