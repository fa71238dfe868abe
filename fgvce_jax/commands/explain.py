"""``fgvce explain``: counterfactual explanations for every misclassified image of a split.

Example::

    fgvce explain --model runs/digits/model --dataset digits --split test --out runs/digits/explanations
    fgvce explain ... --method fgvce cve random      # one sub-directory per method

Killing it and running the same command again resumes, and a larger ``--limit``
extends the run; a different config in ``--out`` is refused unless ``--overwrite``.
A second run writing the same method directory at the same time fails at once.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from fgvce_jax import data
from fgvce_jax.counterfactual.config import CounterfactualConfig, flag, param_flag

HELP = "explain the misclassified images of a dataset split (resumable, sharded output)"


def _config_fields():
    """The config fields that have an option (those with help metadata)."""
    return [f for f in dataclasses.fields(CounterfactualConfig) if "help" in f.metadata]


def _param_dest(method: str, name: str) -> str:
    return f"param__{method}__{name}"


def _add_field(group, option: str, dest: str, field, default) -> None:
    """One option for a dataclass field: type from its metadata or its default, choices and metavar from its
    metadata, the default shown in the help unless the help says it."""
    meta = field.metadata
    kind = meta.get("type", type(field.default))
    text = meta.get("help", "")
    if "default" not in text and field.default is not None:  # None: a required path, said so in its help
        text += f" (default: {field.default})"
    extra = {k: meta[k] for k in ("choices", "metavar") if k in meta}
    if "choices" not in extra:
        extra.setdefault("metavar", field.name.upper())
    if kind is bool:
        group.add_argument(option, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=text)
    else:
        group.add_argument(option, dest=dest, type=kind, default=default, help=text, **extra)

def add_arguments(parser) -> None:
    """Options of ``fgvce explain``. The method options are built from ``CounterfactualConfig``'s fields (their
    metadata gives help and choices, the field its default) and from each registered method's ``Params``
    (``--<method>-<name>``), so they never need copying by hand."""
    from fgvce_jax.counterfactual import methods

    parser.add_argument("--model", required=True, help="checkpoint directory (from `fgvce train` or `fgvce convert`)")
    parser.add_argument("--dataset", required=True, help=" | ".join(data.NAMES))
    parser.add_argument("--split", default="test", help="split whose mistakes are explained (default: test)")
    parser.add_argument("--out", required=True, help="output directory (one sub-directory per method)")
    parser.add_argument("--reference-split", default="train", help="split the references come from (default: train)")
    parser.add_argument("--at", default=None,
                        help="split point of the model (default: the checkpoint's): ResNet layer4.0 | layer4 | "
                             "layer3, VGG features, ViT block0..block{L-1}")
    parser.add_argument("--method", nargs="+", default=["fgvce"], choices=methods.names(),
                        help="one or more methods (default: fgvce; docs/methods.md)")
    parser.add_argument("--queries", nargs="+", default=None, metavar="ID",
                        help="explain these image ids instead of all misclassified ones")
    parser.add_argument("--limit", type=int, default=None,
                        help="explain at most this many queries (a larger one later reuses the results)")
    g = parser.add_argument_group("method options")
    for f in _config_fields():
        _add_field(g, flag(f.name), f.name, f, f.metadata.get("cli_default", f.default))
    for name in methods.names():
        fields = dataclasses.fields(methods.get(name).Params)
        if fields:
            m = parser.add_argument_group(f"options of --method {name}")
            for f in fields:
                _add_field(m, param_flag(name, f.name), _param_dest(name, f.name), f, f.default)
    r = parser.add_argument_group("run options (no effect on the results, except --shard-size)")
    r.add_argument("--batch-size", type=int, default=64, help="images per device in each forward batch")
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

    if args.screen_samples is None:
        return None if args.phi_tolerance is not None else SCREEN_SAMPLES
    if args.screen_samples and args.phi_tolerance is not None:
        raise FgvceError("--screen and --phi-tolerance cannot be combined (tolerance sampling is not screened)")
    return args.screen_samples or None


def configs_from_args(args) -> list:
    """One ``CounterfactualConfig`` per ``--method``, with that method's own options."""
    from fgvce_jax.counterfactual import methods

    shared = {f.name: getattr(args, f.name) for f in _config_fields()}
    shared["screen_samples"] = screen_from_args(args)
    out = []
    for m in dict.fromkeys(args.method):
        cls = methods.get(m).Params
        params = cls(**{f.name: getattr(args, _param_dest(m, f.name)) for f in dataclasses.fields(cls)})
        out.append(CounterfactualConfig(method=m, params=params, **shared))
    return out


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
