"""Configuration of one counterfactual run (SPEC 5), validated on construction.

The fields are shared by the methods (``fgvce_jax.counterfactual.methods``); each method says which of them
decide its results (``Method.uses``) and keeps its own parameters in ``params``. ``fgvce explain`` builds its
options from the fields' metadata (``help``, ``choices``), so a new field needs no hand-written option.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from fgvce_jax.counterfactual import methods
from fgvce_jax.errors import FgvceError
from fgvce_jax.saliency import HEAD_DTYPES
from fgvce_jax.shapley.local import OUTSIDE

SELECTIONS = ("similarity", "joint")
STOPS = ("target", "flip")
REFERENCE_MODES = ("nearest", "random")
SCREEN_SAMPLES = 4  # the default first pass of screening: benchmarks/results/screening.json


# ``fgvce explain``'s flag for each field whose flag is not ``--`` + the field with dashes; fields without one
FLAGS = {"n_references": "--references", "candidates_per_reference": "--candidates", "screen_samples": "--screen"}
NO_FLAG = ("baseline", "output", "chunk_size")


def flag(field: str) -> str:
    """How messages name a setting: the command-line flag that sets it (``t_max`` -> ``--t-max``; a method
    parameter ``params.<name>`` of method m -> ``--m-<name>``, see :func:`param_flag`), or the field itself
    where no flag does."""
    return field if field in NO_FLAG else FLAGS.get(field, "--" + field.replace("_", "-"))


def _named(field: str) -> str:
    """A setting as messages name it: the field and, where a flag sets it, the flag (``t_max (--t-max)``)."""
    return field if flag(field) == field else f"{field} ({flag(field)})"


def param_flag(method: str, name: str) -> str:
    """The flag of method ``method``'s own parameter ``name``: ``--<method>-<name with dashes>``."""
    return f"--{method}-{name.replace('_', '-')}"


def _opt(default, help: str, **cli):
    """A config field with its command-line help (and ``choices``, ``type``, ``metavar`` where needed)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclasses.dataclass(frozen=True)
class CounterfactualConfig:
    """Everything that decides an explanation, apart from the model and the data.

    Attributes:
      kernel, samples: local Shapley window size k and samples M per window (SPEC 3).
      outside: the players outside each local Shapley window: ``"absent"`` (the baseline) or ``"present"`` (the
        query's own features).
      stratified: stratify the sizes of each window's draws (``shapley.local``: unbiased, never more variance,
        the size-driven part of the marginal removed); not with ``phi_tolerance``.
      region_size: r, the side of the r x r regions (SPEC 4).
      max_regions: K, the most regions taken from one query map.
      n_references: N, references drawn per query.
      reference_mode: ``"nearest"`` (cosine of pooled features) or ``"random"`` (seeded).
      candidates_per_reference: top regions (by score) of each reference kept as candidates.
      selection: ``"similarity"`` or ``"joint"`` (log p_y + lam * similarity).
      lam: the weight lambda of ``joint``.
      stop: ``"target"`` (prediction becomes y) or ``"flip"`` (prediction leaves y_hat).
      t_max: the most edits per query.
      method: a registered method (``fgvce_jax.counterfactual.methods``): ``"fgvce"`` or a baseline of SPEC 5.
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
      params: the method's own parameters (an instance of its ``Params``; None = its defaults).
    """

    kernel: int = _opt(3, "local Shapley window k")
    samples: int = _opt(32, "Shapley samples per window M")
    outside: str = _opt("absent", "the players outside each local Shapley window: absent (the baseline) or present "
                        "(the image's own features)", choices=OUTSIDE)
    stratified: bool = _opt(False, "stratify the sizes of each Shapley window's draws: the same evaluations, less "
                                   "variance on a deep head (docs/shapley.md, 'Stratified sizes')")
    region_size: int = _opt(1, "region side r")
    max_regions: int = _opt(8, "regions per query K")
    n_references: int = _opt(10, "references per query N")
    reference_mode: str = _opt("nearest", "references per query: the nearest by pooled features, or seeded "
                               "random ones", choices=REFERENCE_MODES)
    candidates_per_reference: int = _opt(4, "candidate regions per reference")
    # joint with lambda 0.1 since the settings study (docs/fidelity.md): validity 0.38 -> 0.61 and 4.7 -> 3.8 edits
    # on 64 birds mistakes, 0.69 -> 0.75 and 3.8 -> 2.8 on the digits, Phi unchanged
    selection: str = _opt("joint", "candidate choice: joint = log p(true) + lam * similarity, or feature "
                          "similarity alone", choices=SELECTIONS)
    lam: float = _opt(0.1, "lambda of --selection joint")
    stop: str = _opt("target", "stop when the true class is predicted (target) or the prediction changes (flip)",
                     choices=STOPS)
    t_max: int = _opt(8, "most edits per query")
    method: str = "fgvce"
    baseline: str = "zero"
    output: str = "prob"
    seed: int = _opt(0, "seeds every random choice of the run")
    chunk_size: int | None = None
    phi_tolerance: float | None = _opt(
        None, "sample each Shapley window until its standard error is at most this, --samples at most "
              "(default: off, exactly --samples per window)", type=float)
    screen_samples: int | None = _opt(
        SCREEN_SAMPLES, f"screen each Shapley map: M0 samples per window first, then --samples only at the windows "
                        f"its regions can come from, where that saves evaluations; 0: off (default: {SCREEN_SAMPLES}, "
                        f"off under --phi-tolerance; agreement with unscreened maps: "
                        f"benchmarks/results/screening.json)", type=int, metavar="M0", cli_default=None)
    screen_margin: int = _opt(3, "with --screen, keep the full estimate at this many times the windows the search "
                                 "reads")
    head_dtype: str = _opt("float32", "dtype of the head's evaluations for Phi: bfloat16 for GPU/TPU bf16 units "
                                      "(its effect on Phi and edits: benchmarks/results/bf16_head.json)",
                           choices=HEAD_DTYPES)
    params: Any = None

    def __post_init__(self):
        method = methods.get(self.method)  # FgvceError for an unknown one
        if type(self.params) is methods.NoParams:  # e.g. dataclasses.replace(config, method=...): holds nothing
            object.__setattr__(self, "params", None)
        object.__setattr__(self, "params", method(self.params).params)  # defaults filled in, validated
        for name, value, allowed in (("selection", self.selection, SELECTIONS),
                                     ("stop", self.stop, STOPS),
                                     ("reference_mode", self.reference_mode, REFERENCE_MODES),
                                     ("head_dtype", self.head_dtype, HEAD_DTYPES),
                                     ("outside", self.outside, OUTSIDE)):
            if value not in allowed:
                raise FgvceError(f"{_named(name)} must be one of {', '.join(allowed)}; got {value!r}")
        for name in ("kernel", "samples", "region_size", "max_regions", "n_references",
                     "candidates_per_reference", "t_max", "screen_margin"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FgvceError(f"{_named(name)} must be a positive integer; got {value!r}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam):
            raise FgvceError(f"lam (--lam) must be a finite number; got {self.lam!r}")
        if not isinstance(self.stratified, bool):
            raise FgvceError(f"{_named('stratified')} must be True or False; got {self.stratified!r}")
        if self.stratified and self.phi_tolerance is not None:
            raise FgvceError("--stratified and --phi-tolerance do not combine: tolerance sampling draws each "
                             "window's samples in rounds, not in size strata; choose one")
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


def resolved(config: CounterfactualConfig) -> CounterfactualConfig:
    """``config`` with the shared fields its method fixes set to the values it runs with (``cve``: region
    size 1, joint selection, lambda 0)."""
    return dataclasses.replace(config, **methods.get(config.method).fixed)


def screened(config: CounterfactualConfig) -> bool:
    """Whether ``config``'s Phi maps are screened: local Shapley with ``screen_samples`` and no ``phi_tolerance``
    (whether a map's screen saves evaluations is decided per map size, ``local_screening.saves``)."""
    return (methods.get(config.method).saliency == "local" and config.screen_samples is not None
            and config.phi_tolerance is None)


def settings(config: CounterfactualConfig) -> dict:
    """What decides ``config``'s results, as stored with them: the method, the shared fields it uses (those it
    fixes with the values it runs with), its ``flow`` unless it is the swap engine's, and its own parameters as
    ``params.<name>``. An absent ``outside``, unstratified draws, an unset ``phi_tolerance``,
    a float32 ``head_dtype`` and screening where it does not apply are left out (directories written before
    they existed still match); chunking never changes a result and is never stored."""
    method, c = methods.get(config.method), resolved(config)
    keys = dict.fromkeys((*method.uses, *method.fixed))
    off = {"phi_tolerance": None, "head_dtype": "float32", "outside": "absent", "stratified": False}
    out = {"method": c.method, **{k: getattr(c, k) for k in keys if not (k in off and getattr(c, k) == off[k])}}
    if method.flow != "swap":  # who explained: readers tell a rendering method's rows from the swap engine's
        out["flow"] = method.flow
    if not screened(c):
        for k in ("screen_samples", "screen_margin"):
            out.pop(k, None)
    out.update({f"params.{f.name}": getattr(c.params, f.name) for f in dataclasses.fields(c.params)})
    return out


def setting_flag(config: CounterfactualConfig, key: str) -> str:
    """The flag of a key of :func:`settings` (``params.<name>`` -> :func:`param_flag`)."""
    return param_flag(config.method, key[len("params."):]) if key.startswith("params.") else flag(key)
