"""``fgvce convert``: a torchvision ``.pth`` state_dict -> an fgvce model checkpoint.

    fgvce convert --arch resnet50 --weights resnet50.pth --out /abs/ckpt/resnet50 \\
        [--num-classes 200] [--class-names classes.txt]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fgvce_jax.errors import FgvceError

HELP = "convert torchvision weights (.pth) into a checkpoint that fgvce_jax.models.load reads"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fgvce_jax.models import ARCHS

    parser.add_argument("--arch", required=True, choices=ARCHS, help="architecture of the weights")
    parser.add_argument("--weights", required=True, help="torchvision state_dict file (.pth)")
    parser.add_argument("--out", required=True, help="checkpoint directory to create")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of classes (default: read from the classifier weights)")
    parser.add_argument("--class-names", default=None, help="text file with one class name per line")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def _class_names(path: str | None) -> list[str] | None:
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise FgvceError(f"class names file not found: {path}")
    return [line.strip() for line in file.read_text().splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    import converters
    from fgvce_jax.models import checkpoint

    names = _class_names(args.class_names)  # read before the slow conversion, to fail early
    model = converters.convert(args.arch, args.weights, num_classes=args.num_classes)
    info = checkpoint.ModelInfo.for_model(model, class_names=names)
    out = checkpoint.save(args.out, model, info, overwrite=args.overwrite)
    print(f"wrote {model.arch} ({model.num_classes} classes, input {info.image_size}px) to {out}")
    return 0
