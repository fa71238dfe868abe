"""Did an explain run finish? One answer for ``fgvce report`` and ``fgvce evaluate``.

A run directory (``OUT/<method>``, see ``docs/output_format.md``) is complete when

- the shards ``manifest.json`` lists cover the rows ``[0, n)`` contiguously,
- no ``manifest.process-*.json`` is left (a killed run of several processes), and
- ``summary.json`` exists (the pipeline writes it only after the last shard).

The number n of queries the run meant to explain is not stored as such; it is taken from
``summary.json`` (``queries``) when present, else from the config when it names the query ids
(``min(len(queries), limit)``: every given id is explained or the run is refused), else unknown.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Mapping

from fgvce_jax import store

SUMMARY = "summary.json"


@dataclasses.dataclass(frozen=True)
class Completeness:
    """``queries`` (k): rows of the listed shards; ``intended`` (n): queries the run meant, None if unknown."""

    queries: int
    intended: int | None
    partial: bool

    def line(self) -> str:
        """``complete: k queries``, ``partial: k of n queries`` or ``partial: k queries, run not finished``."""
        if not self.partial:
            return f"complete: {queries_text(self.queries)}"
        if self.intended is not None and self.queries < self.intended:
            return f"partial: {self.queries} of {queries_text(self.intended)}"
        return f"partial: {queries_text(self.queries)}, run not finished"


def queries_text(n: int) -> str:
    """``1 query``, ``n queries``."""
    return f"{n} quer{'y' if n == 1 else 'ies'}"


def _contiguous_end(shards: list[dict]) -> int | None:
    """The end of ``[0, end)`` when the shards' ``[start, stop)`` ranges tile it exactly, else None."""
    end = 0
    for s in sorted(shards, key=lambda s: s["start"]):
        if s["start"] != end:
            return None
        end = s["stop"]
    return end


def _intended(config: Mapping, summary: dict | None) -> int | None:
    if summary is not None:
        return int(summary["queries"])
    ids, limit = config.get("queries"), config.get("limit")
    if ids is None:
        return None
    return len(ids) if limit is None else min(len(ids), int(limit))


def read_summary(run_dir) -> dict | None:
    """The ``summary.json`` of a run directory; None when absent or unreadable (the run did not finish)."""
    try:
        return json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None


def completeness(run_dir) -> Completeness:
    """The completeness of one run directory (see the module docstring)."""
    run_dir = Path(run_dir)
    manifest = store.read_manifest(run_dir)
    shards = manifest["shards"]
    summary = read_summary(run_dir)
    n = _intended(manifest.get("config", {}), summary)
    end = _contiguous_end(shards)
    partial = (summary is None or end is None or (n is not None and end != n)
               or any(run_dir.glob("manifest.process-*.json")))
    return Completeness(sum(s["stop"] - s["start"] for s in shards), n, partial)


def warn_partial(runs: Mapping[str, Path], what: str) -> dict[str, Completeness]:
    """Completeness of every ``method -> run directory``; one stderr line per partial run, e.g.
    ``warning: fgvce (OUT/fgvce): partial: 3 of 8 queries; the report covers these only``."""
    found = {m: completeness(d) for m, d in runs.items()}
    for method, c in found.items():
        if c.partial:
            print(f"warning: {method} ({runs[method]}): {c.line()}; {what} covers these only", file=sys.stderr)
    return found
