"""Splitting an explain run across the processes of ``jax.distributed`` (several hosts, or several processes
on one host).

Each process computes on its own devices only (a 1-D mesh of ``jax.local_devices()``) and takes every P-th
item of a work list: item j belongs to process ``j % P`` (:func:`owners`). Work items are whole forward
batches, whole references and whole query shards, cut exactly as a single process cuts them, so every
result is computed on the same inputs with the same PRNG key as in a one-process run; only where it is
computed changes. What every process needs (predictions, reference Phi) is gathered with
:func:`gather_rows`; the output files are written as described in :mod:`fgvce_jax.store`.

With one process every function here is the identity or a no-op, and nothing is communicated.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from fgvce_jax.errors import FgvceError


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join a ``jax.distributed`` run before any other JAX call.

    With ``coordinator`` ("host:port" of process 0) the count and this process's id must be given; without
    it JAX detects them from the cluster (TPU pod slices, SLURM, Open MPI). On the CPU backend the
    collectives run over gloo.
    """
    if coordinator is not None and (num_processes is None or process_id is None):
        raise FgvceError("--coordinator needs --num-processes and --process-id")
    if num_processes is not None and not (isinstance(num_processes, int) and num_processes >= 1):
        raise FgvceError(f"--num-processes must be a positive integer; got {num_processes!r}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise FgvceError(f"--process-id must be in [0, {num_processes}); got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    except (RuntimeError, ValueError) as e:
        raise FgvceError(f"could not join the distributed run: {str(e).splitlines()[0]}") from None


def index() -> int:
    """This process's rank p in [0, P)."""
    return jax.process_index()


def count() -> int:
    """The number of processes P."""
    return jax.process_count()


def owners(n: int) -> np.ndarray:
    """(n,) process of each of n items, round-robin: item i belongs to process ``i % P``."""
    return np.arange(n) % count()


def mine(items) -> list:
    """The items of this process (in order) under :func:`owners`."""
    items = list(items)
    return [x for x, p in zip(items, owners(len(items))) if p == index()]


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier ``name`` (no-op for one process)."""
    if count() > 1:
        multihost_utils.sync_global_devices(name)


def gather_rows(arrays: dict[str, np.ndarray], owner: np.ndarray, shapes: dict[str, tuple] | None = None
                ) -> dict[str, np.ndarray]:
    """Assemble rows computed by different processes into whole arrays on every process.

    Args:
      arrays: name -> (n_p, ...) this process's rows, in item order.
      owner: (N,) the process of each row (:func:`owners`); n_p = its count of this process.
      shapes: name -> (row shape, dtype), needed only where this process has no rows.
    Returns: name -> (N, ...), row i from process owner[i].
    """
    if count() == 1:
        return arrays
    counts = np.bincount(owner, minlength=count())
    m = max(1, int(counts.max()))
    padded = {}
    for k in sorted(shapes or arrays):
        a = arrays.get(k)
        if a is None or len(a) == 0:
            row, dtype = shapes[k] if shapes else (a.shape[1:], a.dtype)
            a = np.zeros((0, *row), dtype)
        padded[k] = np.concatenate([a, np.zeros((m - len(a), *a.shape[1:]), a.dtype)])
    stacked = multihost_utils.process_allgather(padded, tiled=False)  # name -> (P, m, ...)
    out = {}
    for k, v in stacked.items():
        v = np.asarray(v)
        full = np.empty((len(owner), *v.shape[2:]), v.dtype)
        for p in range(count()):
            full[owner == p] = v[p, :counts[p]]
        out[k] = full
    return out


def total(x: int) -> int:
    """Sum of the integer ``x`` over all processes."""
    if count() == 1:
        return int(x)
    return int(gather_rows({"x": np.asarray([x], np.int64)}, np.arange(count()))["x"].sum())


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (so that all take the same branch)."""
    if count() == 1:
        return bool(flag)
    return bool(gather_rows({"f": np.asarray([flag], np.int8)}, np.arange(count()))["f"].all())
