"""``fgvce evaluate DIR``: the paper's metric tables for every method of an explain run.

Example::

    fgvce explain --model runs/digits/model --dataset digits --out runs/digits/explanations --method fgvce cve random
    fgvce evaluate runs/digits/explanations              # -> runs/digits/explanations/evaluation/
    fgvce evaluate runs/digits/explanations --steps 20 --no-gradcam --out /tmp/eval

Writes ``table.md``, ``table.csv``, ``metrics.json`` and ``curves.png``
(deletion / insertion curves). Metric definitions: ``docs/metrics.md``.
"""
from __future__ import annotations

HELP = "metric tables (validity, edits, deletion/insertion AUC, part metrics) for an explain output directory"


def add_arguments(parser) -> None:
    parser.add_argument("directory", metavar="DIR", help="output directory of `fgvce explain` (or one method's sub-directory)")
    parser.add_argument("--out", default=None, help="where to write the tables and plots (default: DIR/evaluation)")
    parser.add_argument("--steps", type=int, default=50, help="RISE deletion/insertion steps (default 50)")
    parser.add_argument("--chunk-size", type=int, default=64, help="curve images per model call (default 64; no effect on results)")
    parser.add_argument("--batch-size", type=int, default=16, help="query images loaded at once (default 16; no effect on results)")
    parser.add_argument("--no-rise", action="store_true", help="skip deletion/insertion (no model or images needed)")
    parser.add_argument("--no-gradcam", action="store_true", help="leave the Grad-CAM row out of the deletion/insertion comparison")
    parser.add_argument("--no-parts", action="store_true", help="skip the part metrics even if the dataset has parts")


def run(args) -> int:
    from fgvce_jax.errors import FgvceError
    from fgvce_jax.evaluate import evaluate_directory, to_markdown

    for name in ("steps", "chunk_size", "batch_size"):
        if getattr(args, name) < 1:
            raise FgvceError(f"--{name.replace('_', '-')} must be at least 1")
    rows, files = evaluate_directory(args.directory, args.out, steps=args.steps, chunk_size=args.chunk_size,
                                     batch_size=args.batch_size, use_rise=not args.no_rise,
                                     gradcam=not args.no_gradcam, parts=not args.no_parts)
    print(to_markdown(rows), end="")
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0
