"""``fgvce report DIR``: an HTML page (with PNGs next to it) of an explain output directory.

Example::

    fgvce report runs/digits/explanations            # -> runs/digits/explanations/report.html
"""
from __future__ import annotations

HELP = ("write an HTML report of an explain directory: per query the image, Phi, the counterfactual and its edits; "
        "warns about runs that did not finish")


def add_arguments(parser) -> None:
    parser.add_argument("dir", help="output directory of `fgvce explain` (or one method's sub-directory)")
    parser.add_argument("--html", default=None, help="where to write the page (default: DIR/report.html)")
    parser.add_argument("--max-queries", type=int, default=50, help="queries drawn per method (default 50)")


def run(args) -> int:
    from fgvce_jax.errors import FgvceError
    from fgvce_jax.report import write_report

    if args.max_queries < 0:
        raise FgvceError(f"--max-queries must be >= 0, got {args.max_queries}")
    path = write_report(args.dir, args.html, max_queries=args.max_queries)
    print(f"report: {path}")
    return 0
