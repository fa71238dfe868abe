"""Sharded, atomic, resumable result files.

An explain run writes its results into one directory::

    DIR/manifest.json          config, config hash, completed shards (written last)
    DIR/shard-00000.parquet    one row per query (scalars and per-edit lists)
    DIR/shard-00000.npz        the same rows' arrays (Phi maps, probabilities)
    DIR/cache-*.npz            intermediate results a resumed run reuses (keyed: see load_cache)
    DIR/.lock                  held (flock) by the run writing DIR, which names its PID in it

Every file is written to a temporary name in the same directory, flushed,
``fsync``'d and then ``os.replace``'d into place, so a reader never sees half
a file. A shard counts as done only once ``manifest.json`` lists it (or, in a
run of several processes, the ``manifest.process-<p>.json`` of the process that
wrote it: see :class:`ShardWriter`); files not listed (left by a run that was
killed between the rename and the manifest update) are ignored and overwritten
by the next run. Files are created with mode ``0o666 & ~umask`` (0644 under the
usual umask 022). One run at a time writes a directory: :class:`ShardWriter` holds
an exclusive ``flock`` on ``DIR/.lock`` while it is open. The exact file
layout is documented in ``docs/output_format.md``.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import socket
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Mapping

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fgvce_jax.errors import FgvceError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"


# --------------------------------------------------------------------------- atomic files
def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where it is there (``os.umask`` can only read it by
    setting it, for a moment, for every thread of the process)."""
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` via ``write(fileobj)`` so that it appears whole or not at all.

    The bytes go to a temporary file in the same directory which is fsync'd and
    renamed over ``path``; it gets the mode ``open`` would give (``0o666 & ~umask``),
    not ``mkstemp``'s 0600. If ``write`` raises, the temporary file is removed
    and ``path`` keeps its previous content (or stays absent).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def save_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically write a dict of arrays as an uncompressed ``.npz``."""
    atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an ``.npz`` written by :func:`save_arrays` into a dict (no pickles)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_cache(path: str | os.PathLike, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of the cache ``path`` if it was written (by :func:`save_arrays`) with ``"key" == key``.

    None if it is absent; also None, after a one-line notice on stderr, if it is unreadable (truncated,
    not an npz) or was written for another key: a cache is recomputed then, never trusted.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        arrays = load_arrays(path)
        if str(arrays.get("key")) != key:
            raise ValueError("written for other inputs or settings")
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        print(f"cache {path} is stale or damaged ({type(e).__name__}: {e}); recomputing it", file=sys.stderr)
        return None
    return arrays


# --------------------------------------------------------------------------- config
def config_hash(config: Mapping) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys), first 16 hex digits."""
    canon = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def fingerprint(tree) -> str:
    """First 16 hex digits of sha256 over the bytes of every array of the pytree ``tree`` (in tree order): which
    weights ran, or which features a reference had."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()[:16]


def config_diff(old: Mapping, new: Mapping, names: Mapping[str, str] | None = None) -> list[str]:
    """``["key: old -> new", ...]`` for every top-level key whose value differs; a key is shown as
    ``names[key]`` where given (e.g. the command-line flag that sets it)."""
    keys = sorted(set(old) | set(new))
    missing, names = "<unset>", names or {}
    return [f"{names.get(k, k)}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
            for k in keys if old.get(k, missing) != new.get(k, missing)]


def _normalise(config: Mapping) -> dict:
    """Round-trip through JSON so that tuples/lists and numpy scalars compare equal."""
    return json.loads(json.dumps(dict(config), sort_keys=True, default=str))


# --------------------------------------------------------------------------- writer
def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _lock(path: Path):
    """``path`` opened with its exclusive ``flock`` taken and our PID written into it.

    A second writer fails at once with an FgvceError naming the holder. The kernel releases the lock when the
    file is closed or its process dies, so a lock file left by a killed run blocks nothing. The holder removes
    the file when it is done (:meth:`ShardWriter.close`); a lock taken on a file removed meanwhile is taken
    again on the new one. None, after a notice, where the file system has no locks.
    """
    while True:
        f = open(path, "a+b", buffering=0)  # mode 0o666 & ~umask
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().decode(errors="replace").strip() or "a process that is starting"
            f.close()
            raise FgvceError(f"{path.parent} is being written by another fgvce run ({holder}); wait for it to "
                             "end or stop it, or choose another output directory") from None
        except OSError as e:
            f.close()
            print(f"notice: cannot lock {path} ({e}); make sure no other run writes {path.parent}", file=sys.stderr)
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
        f.close()
    f.truncate(0)
    f.write(f"PID {os.getpid()} on {socket.gethostname()}\n".encode())
    return f


class ShardWriter:
    """Writes result shards into ``directory``; reopening with the same config resumes.

    Args:
      directory: output directory (created if missing).
      config: JSON-serialisable dict that determines the results. It is stored
        in the manifest; reopening with a different one raises
        :class:`FgvceError` naming the differing keys, unless ``overwrite``.
      overwrite: discard an existing manifest, its shards and caches.
      notes: JSON-serialisable facts stored in the manifest's ``config`` but neither hashed nor compared
        (e.g. the checkpoint's path: moving it is not a different config); each opening stores its own.

    A manifest that lists no shards holds no results, so a different config takes its directory over
    (with a notice) without ``overwrite``.

    Process 0 holds an exclusive ``flock`` on ``DIR/.lock`` from its opening until :meth:`close` (or the
    end of a ``with`` block, or of the process), so a second writer of the directory fails at once.

    A shard is identified by its index and covers the half-open row range
    ``[start, stop)`` of the caller's query list; ``inputs`` (the caller's fingerprint of what its rows were
    computed from) is recorded with it. ``done`` tells which shards a
    previous run completed; the caller skips them (and :meth:`retain` forgets those whose inputs changed).

    Several processes (``processes`` > 1) share one directory: process 0 opens it first (checks the
    config, clears, removes strays) and the others after it. Each process records the shards it writes
    in its own ``manifest.process-<p>.json``; :meth:`merge` (process 0, once all are done) folds them into
    ``manifest.json``. A run killed in some process leaves its process manifest, and the next opening by
    process 0 merges it, so its shards are not computed again.
    """

    def __init__(self, directory: str | os.PathLike, config: Mapping, *, overwrite: bool = False,
                 process: int = 0, processes: int = 1, notes: Mapping | None = None,
                 names: Mapping[str, str] | None = None):
        self.process, self.processes = int(process), int(processes)
        self._written: set[int] = set()  # shards this process wrote in this run (several processes only)
        self._lock = None
        self.dir = Path(directory).absolute()
        if self.dir.exists() and not self.dir.is_dir():
            raise FgvceError(f"{self.dir} exists and is not a directory")
        self.config, self.notes = _normalise(config), _normalise(notes or {})
        self.names = dict(names or {})  # how config keys are shown in messages (config_diff)
        self.hash = config_hash(self.config)
        if self.process > 0:  # process 0 has opened (and created) it already, and holds the lock
            self._join()
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.dir / LOCK)
        try:
            self._open(overwrite)
        except BaseException:
            self.close()
            raise

    def _open(self, overwrite: bool) -> None:
        """Open as process 0 (holding the lock): check the config, clear, fold process manifests, remove strays."""
        manifest_path = self.dir / MANIFEST
        self.shards: dict[int, dict] = {}
        if manifest_path.exists():
            try:
                old = json.loads(manifest_path.read_text())
                old_config, old_hash, old_shards = old["config"], old["config_hash"], old["shards"]
            except (ValueError, KeyError, TypeError) as e:
                raise FgvceError(f"{manifest_path} is not a valid fgvce manifest ({e}); "
                                 "remove it or pass --overwrite") from None
            if overwrite:
                self._clear()
            elif old_hash != self.hash:
                compared = {k: v for k, v in old_config.items() if k not in self.notes}
                diff = "; ".join(config_diff(compared, self.config, self.names)) or "format differs"
                if old_shards or any(self.dir.glob("manifest.process-*.json")):
                    raise FgvceError(f"{self.dir} holds results of a different config ({diff}); "
                                     "pass --overwrite to replace them or choose another output directory")
                print(f"notice: {self.dir} holds no results of its earlier config ({diff}); reusing it",
                      file=sys.stderr)
                self._clear()
            else:
                self.shards = {int(s["index"]): s for s in old_shards}
        elif overwrite:
            self._clear()
        self._fold_process_manifests()
        self._drop_damaged()
        self._remove_strays()
        self._write_manifest()

    def _drop_damaged(self) -> None:
        """Forget (with a notice) every listed shard whose files are missing or differ from what was written:
        they are computed again, and the rest are kept."""
        for index, entry in sorted(self.shards.items()):
            problem = shard_problem(self.dir, entry)
            if problem:
                print(f"notice: {problem}; shard {index} will be computed again", file=sys.stderr)
                del self.shards[index]

    def close(self) -> None:
        """Release the directory's lock and remove its file (process 0): the run has ended, another may open it."""
        if self._lock is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._lock.name)  # while still locked: see _lock
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _join(self) -> None:
        """Open as process > 0: the manifest process 0 wrote must be there and hold our config."""
        try:
            old = json.loads((self.dir / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise FgvceError(f"process {self.process}: {self.dir / MANIFEST} is unreadable ({e}); process 0 "
                             "must open the directory first, on a file system all processes share") from None
        if old.get("config_hash") != self.hash:
            raise FgvceError(f"process {self.process}: {self.dir} holds another config than this process's; "
                             "every process must be given the same arguments")
        self.shards = {int(s["index"]): s for s in old["shards"]}

    def _process_manifest(self, process: int) -> Path:
        return self.dir / f"manifest.process-{process}.json"

    def _fold_process_manifests(self) -> None:
        """Add the shards of every ``manifest.process-*.json`` of our config to ours and remove those files
        (one of another config, left before an --overwrite, is only removed)."""
        for p in sorted(self.dir.glob("manifest.process-*.json")):
            try:
                part = json.loads(p.read_text())
                if part["config_hash"] == self.hash:
                    self.shards.update({int(s["index"]): s for s in part["shards"]})
            except (ValueError, KeyError, TypeError):
                print(f"{p} is damaged; its shards will be computed again", file=sys.stderr)

    def merge(self) -> None:
        """Process 0, after every process has finished: fold all process manifests into ``manifest.json``."""
        if self.process == 0 and self.processes > 1:
            self._fold_process_manifests()
            self._write_manifest()

    # -- state ------------------------------------------------------------------------
    @property
    def done(self) -> set[int]:
        """Indices of the shards that are complete on disk."""
        return set(self.shards)

    def done_rows(self) -> np.ndarray:
        """Sorted row indices (positions in the caller's query list) already written."""
        rows = [np.arange(s["start"], s["stop"]) for s in self.shards.values()]
        return np.sort(np.concatenate(rows)) if rows else np.zeros(0, np.int64)

    def retain(self, wanted: Mapping[int, tuple[int, int, str]]) -> list[int]:
        """Forget the listed shards whose ``(start, stop, inputs)`` is not ``wanted[index]``; their indices.

        They were computed for other queries (e.g. the trailing shard of a smaller --limit) and are to be
        written again. Process 0 first rewrites ``manifest.json`` without them, so that no listed shard has
        its files replaced; the caller makes the other processes wait for that. Every process calls it with
        the same ``wanted``.
        """
        stale = sorted(i for i, s in self.shards.items() if wanted.get(i) != (s["start"], s["stop"], s.get("inputs")))
        for i in stale:
            del self.shards[i]
        if stale and self.process == 0:
            self._write_manifest()
        return stale

    def cache_path(self, name: str) -> Path:
        """Path of an intermediate-result file that belongs to this directory's config."""
        return self.dir / f"cache-{name}.npz"

    # -- writing ----------------------------------------------------------------------
    def write_shard(self, index: int, start: int, stop: int, table: pa.Table,
                    arrays: Mapping[str, np.ndarray], inputs: str = "") -> None:
        """Atomically write shard ``index`` (rows ``[start, stop)``, computed from ``inputs``) and record it.

        ``table`` must have ``stop - start`` rows and every array a leading axis
        of that length. The Parquet file and the ``.npz`` are each renamed into
        place; the manifest is updated last, so the shard becomes visible only
        when both files are complete.
        """
        n = stop - start
        if table.num_rows != n or any(np.shape(a)[0] != n for a in arrays.values()):
            raise ValueError(f"shard {index}: expected {n} rows, got table {table.num_rows}, "
                             f"arrays { {k: np.shape(a) for k, a in arrays.items()} }")
        name = shard_name(index)
        atomic_write(self.dir / f"{name}.parquet", lambda f: pq.write_table(table, f))
        save_arrays(self.dir / f"{name}.npz", arrays)
        self.shards[index] = {"index": index, "start": int(start), "stop": int(stop), "name": name,
                              "inputs": inputs, "sha256": {ext: file_digest(self.dir / f"{name}.{ext}")
                                                           for ext in SHARD_FILES}}
        if self.processes > 1:
            self._written.add(index)
            self._write_manifest(self._process_manifest(self.process), self._written)
        else:
            self._write_manifest()

    def _write_manifest(self, path: Path | None = None, indices=None) -> None:
        """Write ``manifest.json`` (all our shards), or ``path`` with the shards ``indices``; process 0 then
        removes the process manifests it has folded in."""
        indices = sorted(self.shards if indices is None else indices)
        atomic_write_json(path or self.dir / MANIFEST, {
            "format": FORMAT_VERSION,
            "config": {**self.config, **self.notes},
            "config_hash": self.hash,
            "shards": [self.shards[i] for i in indices],
        })
        if path is None:
            for p in self.dir.glob("manifest.process-*.json"):
                p.unlink()

    def _clear(self) -> None:
        """Remove the manifest first (so no shard stays visible), then our files."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / MANIFEST)
        for pattern in ("shard-*.parquet", "shard-*.npz", "cache-*.npz", "manifest.process-*.json", "summary.json"):
            for p in self.dir.glob(pattern):
                p.unlink()
        self.shards = {}

    def _remove_strays(self) -> None:
        """Delete temp files and shard files the manifest does not list (killed runs)."""
        listed = {s["name"] for s in self.shards.values()}
        for p in list(self.dir.glob(".*.tmp")) + list(self.dir.glob("shard-*")):
            if p.name.startswith(".") or p.name.split(".")[0] not in listed:
                p.unlink()


# --------------------------------------------------------------------------- shard integrity
SHARD_FILES = ("parquet", "npz")


def file_digest(path: Path) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_problem(directory: Path, entry: Mapping) -> str | None:
    """What is wrong with a listed shard's files (missing, or not the bytes recorded when they were written),
    or None. Shards recorded before digests were kept are only checked for presence."""
    for ext in SHARD_FILES:
        path = Path(directory) / f"{entry['name']}.{ext}"
        if not path.is_file():
            return f"{path} is missing"
        want = entry.get("sha256", {}).get(ext)
        if want is not None and file_digest(path) != want:
            return f"{path} is damaged (its bytes differ from those written)"
    return None


# --------------------------------------------------------------------------- reader
def read_manifest(directory: str | os.PathLike) -> dict:
    """The parsed ``manifest.json`` of a result directory (FgvceError if absent)."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise FgvceError(f"{directory} has no {MANIFEST}: not an fgvce explain output directory")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise FgvceError(f"{path} is not valid JSON ({e})") from None


def read_results(directory: str | os.PathLike) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """Concatenate the completed shards of ``directory`` in shard order.

    Returns:
      table: one row per query (schema in ``docs/output_format.md``).
      arrays: name -> array with a leading axis of ``table.num_rows``.
    """
    directory = Path(directory)
    shards = read_manifest(directory)["shards"]
    tables, arrays = [], {}
    for s in sorted(shards, key=lambda s: s["index"]):
        problem = shard_problem(directory, s)
        if problem:
            raise FgvceError(f"{problem}; re-run `fgvce explain` with the same arguments to compute it again")
        tables.append(pq.read_table(directory / f"{s['name']}.parquet"))
        for k, v in load_arrays(directory / f"{s['name']}.npz").items():
            arrays.setdefault(k, []).append(v)
    if not tables:
        return pa.table({}), {}
    return (pa.concat_tables(tables),
            {k: np.concatenate(v) for k, v in arrays.items()})
