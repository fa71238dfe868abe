"""The one owner of devices: the 1-D mesh, the memory budget, chunk sizing and padding to the mesh.

Work is split over a 1-D device mesh; each device walks its share in chunks
whose size comes from a memory budget (``chunk_size`` overrides it). Batches
are padded to the mesh (or to whole chunks) with :func:`pad_to`, and the padding
is dropped or masked out by the caller.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fgvce_jax.errors import FgvceError

CPU_MEMORY_BUDGET = 256 * 2**20  # bytes of live evaluation data per chunk on a CPU device


def device_mesh(mesh: Mesh | None = None) -> Mesh:
    """``mesh`` if given (it must be 1-D), else a 1-D mesh over this process's devices with axis "d".

    Under ``jax.distributed`` each process computes on its own devices; :mod:`fgvce_jax.multihost` splits
    the work between processes."""
    if mesh is None:
        return jax.make_mesh((jax.local_device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.local_devices())
    if len(mesh.axis_names) != 1:
        raise FgvceError(f"the Shapley engine needs a 1-D device mesh, got axes {mesh.axis_names}")
    return mesh


def memory_budget() -> int:
    """Bytes of evaluation data one chunk may hold: 1/8 of an accelerator's memory, or 256 MiB on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return int(limit) // 8 if limit else CPU_MEMORY_BUDGET


def evaluations_per_chunk(bytes_per_evaluation: int, chunk_size: int | None) -> int:
    """Game evaluations per chunk on one device: ``chunk_size`` if given, else budget / bytes per evaluation."""
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise FgvceError(f"chunk_size must be a positive number of evaluations, got {chunk_size}")
        return int(chunk_size)
    return max(1, memory_budget() // max(1, int(bytes_per_evaluation)))


MIN_CHUNKS = 8  # small jobs are cut into this many chunks, whatever the device count


def layout(n_items: int, items_per_chunk: int, n_devices: int) -> tuple[int, int]:
    """(items per chunk U, chunks per device) so that n_devices * chunks * U >= n_items.

    U depends on the job and the memory budget only, never on the device count, so every device
    evaluates the game on the same batch shapes as a single device would: XLA may round a batch's
    rows differently for another batch size, and this keeps 1 and D devices bit-identical. A job
    smaller than MIN_CHUNKS full chunks is cut into MIN_CHUNKS smaller ones instead of being padded.
    """
    u = max(1, min(items_per_chunk, math.ceil(n_items / MIN_CHUNKS)))
    return u, math.ceil(math.ceil(n_items / u) / n_devices)


def padded_length(n: int, multiple: int) -> int:
    """n rounded up to a multiple of ``multiple`` (>= 1)."""
    return -(-int(n) // int(multiple)) * int(multiple)


def pad_to(tree, n: int):
    """Every array of ``tree`` with its leading axis padded to length ``n`` by repeating its last row (numpy
    arrays stay numpy, others become jax arrays); a leaf already of length ``n`` is returned as it is. Callers
    drop the padding rows, which never change the others (each row is computed on its own)."""
    def pad(a):
        if len(a) == n:
            return a
        if len(a) > n or not len(a):
            raise ValueError(f"cannot pad {len(a)} rows to {n}")
        xp = np if isinstance(a, np.ndarray) else jnp
        return xp.concatenate([a, xp.repeat(a[-1:], n - len(a), axis=0)])
    return jax.tree.map(pad, tree)
