"""Configuration of one counterfactual run (SPEC 5), validated on construction."""
from __future__ import annotations

import dataclasses
import math

from fgvce_jax.errors import FgvceError

METHODS = ("fgvce", "cve", "global", "gradient", "single-step", "random")
SELECTIONS = ("similarity", "joint")
STOPS = ("target", "flip")
REFERENCE_MODES = ("nearest", "random")
HEAD_DTYPES = ("float32", "bfloat16")
SCREEN_SAMPLES = 4  # the default first pass of screening: benchmarks/results/screening.json


# ``fgvce explain``'s flag for each field whose flag is not ``--`` + the field with dashes; fields without one
FLAGS = {"n_references": "--references", "candidates_per_reference": "--candidates", "screen_samples": "--screen"}
NO_FLAG = ("baseline", "output", "chunk_size")


def flag(field: str) -> str:
    """How messages name a setting: the command-line flag that sets it (``t_max`` -> ``--t-max``), or the field
    itself where no flag does."""
    return field if field in NO_FLAG else FLAGS.get(field, "--" + field.replace("_", "-"))


@dataclasses.dataclass(frozen=True)
class CounterfactualConfig:
    """Everything that decides an explanation, apart from the model and the data.

    Attributes:
      kernel, samples: local Shapley window size k and samples M per window (SPEC 3).
      region_size: r, the side of the r x r regions (SPEC 4).
      max_regions: K, the most regions taken from one query map.
      n_references: N, references drawn per query.
      reference_mode: ``"nearest"`` (cosine of pooled features) or ``"random"`` (seeded).
      candidates_per_reference: top regions (by score) of each reference kept as candidates.
      selection: ``"similarity"`` or ``"joint"`` (log p_y + lam * similarity).
      lam: the weight lambda of ``joint``.
      stop: ``"target"`` (prediction becomes y) or ``"flip"`` (prediction leaves y_hat).
      t_max: the most edits per query.
      method: ``"fgvce"`` or one of the baselines of SPEC 5.
      baseline, output: the game's absent-feature fill and output read (SPEC 2).
      seed: seeds the random reference mode and the ``random`` baseline.
      phi_tolerance: None, or sample each local-Shapley window until the standard error of its Phi is at
        most this (``saliency.compute_to_tolerance``), with ``samples`` as the cap per window.
      screen_samples: M0 (default SCREEN_SAMPLES), or None for no screening: local Phi takes M0 samples per
        window first, then ``samples`` only at the ``screen_margin x K x r^2`` windows of largest first-pass Phi
        (K = regions the search reads from a map; ``fgvce_jax.shapley.local_screening``), where that saves
        evaluations. ``phi_tolerance`` takes precedence: tolerance sampling is never screened.
      screen_margin: the factor above.
      head_dtype: ``"float32"``, or ``"bfloat16"`` to evaluate the head in bfloat16 for Phi (the saliency
        games' head evaluations; the search's stay float32). For GPUs and TPUs; see ``saliency``.
      chunk_size: head evaluations per batch when scoring candidates (None = sized from the memory budget,
        see ``explain.default_chunk_size``); never changes the result.
    """

    kernel: int = 3
    samples: int = 32
    region_size: int = 1
    max_regions: int = 8
    n_references: int = 10
    reference_mode: str = "nearest"
    candidates_per_reference: int = 4
    selection: str = "similarity"
    lam: float = 1.0
    stop: str = "target"
    t_max: int = 8
    method: str = "fgvce"
    baseline: str = "zero"
    output: str = "prob"
    seed: int = 0
    chunk_size: int | None = None
    phi_tolerance: float | None = None
    screen_samples: int | None = SCREEN_SAMPLES
    screen_margin: int = 3
    head_dtype: str = "float32"

    def __post_init__(self):
        for name, value, allowed in (("method", self.method, METHODS),
                                     ("selection", self.selection, SELECTIONS),
                                     ("stop", self.stop, STOPS),
                                     ("reference_mode", self.reference_mode, REFERENCE_MODES),
                                     ("head_dtype", self.head_dtype, HEAD_DTYPES)):
            if value not in allowed:
                raise FgvceError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        for name in ("kernel", "samples", "region_size", "max_regions", "n_references",
                     "candidates_per_reference", "t_max", "screen_margin"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FgvceError(f"{name} must be a positive integer; got {value!r}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam):
            raise FgvceError(f"lam (--lam) must be a finite number; got {self.lam!r}")
        if self.phi_tolerance is not None and (isinstance(self.phi_tolerance, bool) or not isinstance(
                self.phi_tolerance, (int, float)) or not 0 < self.phi_tolerance < math.inf):
            raise FgvceError(f"phi_tolerance (--phi-tolerance) must be a positive finite number; "
                             f"got {self.phi_tolerance!r}")
        if self.screen_samples is not None and (isinstance(self.screen_samples, bool) or not isinstance(
                self.screen_samples, int) or self.screen_samples < 2 or self.screen_samples % 2):
            raise FgvceError(f"screen_samples (--screen) must be an even integer of at least 2 (0 on the command "
                             f"line: off); got {self.screen_samples!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise FgvceError(f"chunk_size must be a positive integer or None; got {self.chunk_size!r}")
