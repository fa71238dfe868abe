"""Helpers shared by the benchmarks: where they ran, how they time, how they write results.

Every benchmark prints and records the devices it ran on and the library
versions, times calls after a warm-up with ``jax.block_until_ready``, and
writes one JSON document atomically to ``benchmarks/results/<name>.json``
with the top-level keys ``benchmark, date, environment, settings, summary,
results, notes``. ``summary`` is a flat ``{label: number or string}`` dict of
the key figures; ``benchmarks/make_table.py`` turns it into the README table.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "captum", "shapiq")


def versions(packages=PACKAGES) -> dict[str, str]:
    """Installed version of each package (absent ones are left out), plus Python's."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def environment() -> dict[str, Any]:
    """Where this process runs: JAX backend and devices, versions, host CPU count and load, XLA_FLAGS."""
    import jax

    devices = jax.devices()
    return {"backend": jax.default_backend(), "device_kind": devices[0].device_kind,
            "device_count": len(devices), "devices": [str(d) for d in devices],
            "host": platform.machine(), "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "versions": versions()}


def describe(env: dict[str, Any]) -> str:
    """One line for the log: backend, devices and the main versions."""
    v = env["versions"]
    shown = ", ".join(f"{k} {v[k]}" for k in ("jax", "flax", "torch", "captum", "shapiq") if k in v)
    return (f"{env['backend']} x{env['device_count']} ({env['device_kind']}; {env['devices'][0]}...), "
            f"{env['cpu_count']} host CPUs; {shown}")


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the timed calls (after the warm-up ones)."""

    times: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def as_dict(self) -> dict[str, Any]:
        return {"best_s": self.best, "median_s": self.median, "repeats": len(self.times)}


def time_call(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3) -> tuple[Any, Timing]:
    """(last result, Timing) of ``fn()``: ``warmup`` untimed calls (compilation), then ``repeats`` timed ones.

    Each call's result is passed through ``jax.block_until_ready`` so that
    asynchronous dispatch does not hide the work.
    """
    import jax

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, Timing(tuple(times))


def _plain(x):
    """JSON fallback for numpy scalars and arrays, paths and dataclasses."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    return str(x)


def write_json(path: str | os.PathLike, document: dict[str, Any]) -> Path:
    """Write ``document`` to ``path`` atomically (temp file, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(document, indent=2, default=_plain, allow_nan=True) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_and_plot(out: str | os.PathLike, document: dict[str, Any], draw: Callable[[Path], None]) -> None:
    """Write ``document`` to ``out`` (atomically) and ``draw(png)`` beside it (``out`` with ``.png``), saying where."""
    print(f"wrote {write_json(out, document)}")
    png = Path(out).with_suffix(".png")
    draw(png)
    print(f"wrote {png}")


def document(name: str, env: dict[str, Any], settings: dict[str, Any], summary: dict[str, Any],
             results: Any, notes: list[str]) -> dict[str, Any]:
    """The JSON document every benchmark writes (see the module docstring)."""
    return {"benchmark": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "environment": env, "settings": settings, "summary": summary, "results": results, "notes": notes}


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has: ``--quick`` and ``--out``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a tiny configuration that finishes in seconds (smoke tests); not a measurement")
    p.add_argument("--out", default=str(RESULTS / f"{name}.json"), help="where to write the JSON results")
    return p


def on_accelerator() -> bool:
    """True when JAX's default backend is a GPU or TPU (benchmarks then default to full-size workloads)."""
    import jax

    return jax.default_backend() != "cpu"
