"""``fgvce explain``: counterfactual explanations for every misclassified image of a split.

Example::

    fgvce explain --model runs/digits/model --dataset digits --split test --out runs/digits/explanations
    fgvce explain ... --method fgvce cve random      # one sub-directory per method

Killing it and running the same command again resumes, and a larger ``--limit``
extends the run; a different config in ``--out`` is refused unless ``--overwrite``.
A second run writing the same method directory at the same time fails at once.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

HELP = "explain the misclassified images of a dataset split (resumable, sharded output)"

def _config_defaults():
    from fgvce_jax.counterfactual.config import CounterfactualConfig

    return CounterfactualConfig()


def add_arguments(parser) -> None:
    """Options of ``fgvce explain``; method options default to ``CounterfactualConfig``'s."""
    from fgvce_jax.counterfactual.config import HEAD_DTYPES, METHODS, REFERENCE_MODES, SELECTIONS, STOPS

    d = _config_defaults()
    parser.add_argument("--model", required=True, help="checkpoint directory (from `fgvce train` or `fgvce convert`)")
    parser.add_argument("--dataset", required=True, help="digits | tfds:NAME | cub:DIR | folder:DIR")
    parser.add_argument("--split", default="test", help="split whose mistakes are explained (default: test)")
    parser.add_argument("--out", required=True, help="output directory (one sub-directory per method)")
    parser.add_argument("--reference-split", default="train", help="split the references come from (default: train)")
    parser.add_argument("--at", default=None,
                        help="split point of the model (default: the checkpoint's): ResNet layer4.0 | layer4 | "
                             "layer3, VGG features, ViT block0..block{L-1}")
    parser.add_argument("--method", nargs="+", default=[d.method], choices=METHODS,
                        help="one or more methods")
    parser.add_argument("--queries", nargs="+", default=None, metavar="ID",
                        help="explain these image ids instead of all misclassified ones")
    parser.add_argument("--limit", type=int, default=None,
                        help="explain at most this many queries (a larger one later reuses the results)")
    g = parser.add_argument_group("method options")
    g.add_argument("--kernel", type=int, default=d.kernel, help="local Shapley window k")
    g.add_argument("--samples", type=int, default=d.samples, help="Shapley samples per window M")
    g.add_argument("--region-size", type=int, default=d.region_size, help="region side r")
    g.add_argument("--max-regions", type=int, default=d.max_regions, help="regions per query K")
    g.add_argument("--references", type=int, default=d.n_references, help="references per query N")
    g.add_argument("--reference-mode", default=d.reference_mode, choices=REFERENCE_MODES,
                   help="references per query: the nearest by pooled features, or seeded random ones")
    g.add_argument("--candidates", type=int, default=d.candidates_per_reference,
                   help="candidate regions per reference")
    g.add_argument("--selection", default=d.selection, choices=SELECTIONS,
                   help="candidate choice: feature similarity, or joint = log p(true) + lam * similarity")
    g.add_argument("--lam", type=float, default=d.lam, help="lambda of --selection joint")
    g.add_argument("--stop", default=d.stop, choices=STOPS,
                   help="stop when the true class is predicted (target) or the prediction changes (flip)")
    g.add_argument("--t-max", type=int, default=d.t_max, help="most edits per query")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds every random choice of the run")
    g.add_argument("--phi-tolerance", type=float, default=d.phi_tolerance,
                   help="sample each Shapley window until its standard error is at most this, --samples at most "
                        "(default: off, exactly --samples per window)")
    g.add_argument("--screen", type=int, default=None, metavar="M0",
                   help=f"screen each Shapley map: M0 samples per window first, then --samples only at the windows "
                        f"its regions can come from, where that saves evaluations; 0: off (default: {d.screen_samples}, "
                        f"off under --phi-tolerance; agreement with unscreened maps: "
                        f"benchmarks/results/screening.json)")
    g.add_argument("--screen-margin", type=int, default=d.screen_margin,
                   help="with --screen, keep the full estimate at this many times the windows the search reads")
    g.add_argument("--head-dtype", default=d.head_dtype, choices=HEAD_DTYPES,
                   help="dtype of the head's evaluations for Phi: bfloat16 for GPU/TPU bf16 units "
                        "(its effect on Phi and edits: benchmarks/results/bf16_head.json)")
    r = parser.add_argument_group("run options (no effect on the results, except --shard-size)")
    r.add_argument("--batch-size", type=int, default=64, help="images per forward batch")
    r.add_argument("--shard-size", type=int, default=64, help="queries per result shard")
    r.add_argument("--overwrite", action="store_true", help="replace results of a different config in --out")
    m = parser.add_argument_group(
        "several processes (jax.distributed; no effect on the results)",
        "Start one process per host (or per accelerator group) with the same arguments and --out on a file "
        "system they all share; each computes its share of the batches, references and shards.")
    m.add_argument("--distributed", action="store_true",
                   help="join a jax.distributed run whose processes JAX detects (TPU pod slice, SLURM, Open MPI)")
    m.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0, for a run started by hand (needs the next two)")
    m.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    m.add_argument("--process-id", type=int, default=None, help="this process's rank, 0 .. --num-processes - 1")


def screen_from_args(args) -> int | None:
    """``screen_samples`` from ``--screen``: given (0 = None, off), or the default, which is off under
    ``--phi-tolerance`` (tolerance sampling is not screened); both given is an FgvceError."""
    from fgvce_jax.counterfactual.config import SCREEN_SAMPLES
    from fgvce_jax.errors import FgvceError

    if args.screen is None:
        return None if args.phi_tolerance is not None else SCREEN_SAMPLES
    if args.screen and args.phi_tolerance is not None:
        raise FgvceError("--screen and --phi-tolerance cannot be combined (tolerance sampling is not screened)")
    return args.screen or None


def configs_from_args(args) -> list:
    """One ``CounterfactualConfig`` per ``--method``."""
    from fgvce_jax.counterfactual.config import CounterfactualConfig

    base = CounterfactualConfig(
        kernel=args.kernel, samples=args.samples, region_size=args.region_size, max_regions=args.max_regions,
        n_references=args.references, reference_mode=args.reference_mode,
        candidates_per_reference=args.candidates, selection=args.selection, lam=args.lam, stop=args.stop,
        t_max=args.t_max, seed=args.seed, phi_tolerance=args.phi_tolerance, screen_samples=screen_from_args(args),
        screen_margin=args.screen_margin, head_dtype=args.head_dtype)
    return [dataclasses.replace(base, method=m) for m in dict.fromkeys(args.method)]


def confusions_line(directory, most: int = 10) -> str:
    """One line: the explained confusions (true -> predicted) with their counts, most frequent first."""
    from collections import Counter

    from fgvce_jax import store

    table, _ = store.read_results(directory)
    if not table.num_rows:
        return "no queries were explained"
    pairs = Counter(zip(table.column("true_name").to_pylist(), table.column("pred_name").to_pylist()))
    shown = ", ".join(f"{t} -> {p}: {n}" for (t, p), n in pairs.most_common(most))
    more = f", and {len(pairs) - most} more" if len(pairs) > most else ""
    return f"confusions explained (true -> predicted: queries): {shown}{more}"


def run(args) -> int:
    from fgvce_jax import multihost
    from fgvce_jax.pipeline import explain_split

    if args.distributed or args.coordinator or args.num_processes is not None or args.process_id is not None:
        multihost.initialize(args.coordinator, args.num_processes, args.process_id)
    configs = configs_from_args(args)
    explain_split(args.model, args.dataset, args.split, args.out, configs,
                  reference_split=args.reference_split, queries=args.queries, limit=args.limit,
                  at=args.at, batch_size=args.batch_size, shard_size=args.shard_size, overwrite=args.overwrite)
    if multihost.index() == 0:
        print(confusions_line(Path(args.out) / configs[0].method))
        print(f"results in {args.out} (read them with `fgvce report {args.out}`)")
    return 0
