"""The counterfactual-method registry: a method is one class in one file, registered by name.

A method says what the shared engine (:func:`fgvce_jax.counterfactual.explain`, the while-loop of
:mod:`fgvce_jax.counterfactual.search` and the pipeline) does for it:

- ``Params``: a frozen dataclass of its own parameters, with defaults and a ``validate`` hook. Fields the
  methods share (``t_max``, ``stop``, the saliency settings...) live in
  :class:`~fgvce_jax.counterfactual.config.CounterfactualConfig`; ``fgvce explain`` builds an option
  ``--<method>-<field>`` for each field of ``Params`` (help text from ``field(metadata={"help": ...})``).
- ``uses``: the shared fields that decide its results. Only those are stored with its results, so a method
  is never re-run for a setting it ignores; ``fixed`` are the shared fields it sets itself (``cve``'s
  region size 1), stored with their real values.
- what it needs: ``saliency`` (the :func:`fgvce_jax.saliency.compute` method of its query and reference Phi,
  None for none), or ``own_phi`` (maps it draws itself, ``random``).
- how it edits: ``query_regions`` (the query regions the loop may replace, in order) and
  ``reference_candidates`` (each reference's candidate regions); ``pairs`` (pick the best (region,
  candidate) pair each step instead of the top region's best candidate) and ``early_stop``.
- what it writes: ``per_query`` returns method-specific per-query arrays, stored next to the common columns
  (``fgvce_jax.results``).

Methods that render their counterfactuals with a learned model (a decoder or a generator) instead of swapping
regions subclass :class:`RenderingMethod`: they declare the artefact they need (``needs``, a path among their
``Params``), load it once per run (``prepare``), explain a batch of queries themselves (``explain_batch``) and
give their own evaluate metrics (``metrics``) and report figures (``figures``); the pipeline still owns the
queries, the shards, the keys and the stored schema (``fgvce_jax.results``).

Registering is ``@register("name")`` on a :class:`Method` subclass; the package ``__init__`` imports the
built-in ones. See ``docs/methods.md``, where ``cve`` is the worked example.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fgvce_jax.counterfactual.partition import Regions, partition
from fgvce_jax.counterfactual.references import top_regions
from fgvce_jax.counterfactual.search import SearchOptions
from fgvce_jax.errors import FgvceError

# Shared config fields every method's results depend on (its references, the loop's stop, the seed).
COMMON_USES = ("n_references", "reference_mode", "stop", "t_max", "seed")
# The settings of a saliency Phi: the game's absent fill and output read (SPEC 2) and the head's dtype;
# the samples of a Shapley one (``global``: its budget is 2 H W samples); the rest of local Shapley's.
SALIENCY_USES = ("baseline", "output", "head_dtype")
LOCAL_USES = ("kernel", "samples", "outside", "stratified", "phi_tolerance", "screen_samples", "screen_margin")
# How its regions are cut and chosen from Phi.
REGION_USES = ("region_size", "max_regions", "candidates_per_reference", "selection", "lam")


@dataclasses.dataclass(frozen=True)
class NoParams:
    """The parameters of a method that has none of its own."""

    def validate(self) -> None:
        """FgvceError for a bad value (none here)."""


class Method:
    """A counterfactual method; an instance holds its validated ``Params``. ``flow`` says who explains: the
    shared region-swap engine (``"swap"``, this class's hooks) or the method itself (``"render"``,
    :class:`RenderingMethod`).

    Subclasses set the class attributes and override the hooks whose default does not fit. Every hook is
    a function of its arguments only (no state), so it can run inside the engine's compiled code.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    saliency: ClassVar[str | None] = "local"
    uses: ClassVar[tuple[str, ...]] = COMMON_USES + REGION_USES + SALIENCY_USES + LOCAL_USES
    fixed: ClassVar[dict[str, Any]] = {}
    pairs: ClassVar[bool] = False
    early_stop: ClassVar[bool] = True
    flow: ClassVar[str] = "swap"

    def __init__(self, params=None):
        params = self.Params() if params is None else params
        if not isinstance(params, self.Params):
            raise FgvceError(f"method {self.name!r} takes {self.Params.__name__} parameters, "
                             f"got {type(params).__name__}")
        params.validate()
        self.params = params

    # -- what it needs ------------------------------------------------------------------------------------
    def own_phi(self, keys: jax.Array, grid: tuple[int, int]) -> jax.Array | None:
        """Phi (N, H, W) the method draws itself from one key per image (``keys`` (N,)), or None (default):
        its Phi is ``saliency``'s, or it has none."""
        return None

    # -- how it edits -------------------------------------------------------------------------------------
    def search_options(self, config) -> SearchOptions:
        """The loop's static options from the (resolved) shared config."""
        return SearchOptions(selection=config.selection, lam=float(config.lam), stop=config.stop,
                             t_max=config.t_max, region_size=config.region_size, pairs=self.pairs,
                             early_stop=self.early_stop, chunk_size=config.chunk_size)

    def query_regions(self, config, phi: jax.Array) -> Regions:
        """The query regions (Q, K) from the queries' Phi (Q, H, W) on their predicted class (NaN where the
        method has no saliency), best first. Default: the NMS partition of SPEC 4."""
        return partition(phi, region_size=config.region_size, max_regions=config.max_regions)

    def reference_candidates(self, config, phi: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(center (R, M, 2) int32, valid (R, M) bool): each reference's candidate regions from its Phi
        (R, H, W) on its own class. Default: its top ``candidates_per_reference`` NMS regions."""
        regions = partition(phi, region_size=config.region_size,
                            max_regions=max(config.max_regions, config.candidates_per_reference))
        return top_regions(regions, config.candidates_per_reference)

    # -- what it writes -----------------------------------------------------------------------------------
    def per_query(self, config, phi: np.ndarray, regions: Regions) -> dict[str, np.ndarray]:
        """Method-specific per-query arrays (leading axis Q) stored with its results: 1-D ones become
        Parquet columns too. Default: none."""
        return {}


class Rendered(NamedTuple):
    """What a :class:`RenderingMethod` returns for Q queries.

    success (Q,) bool: the counterfactual is classified as the target; reason (Q,) str: why not (or
    ``"flipped"``); n_edits (Q,) int: the method's edits (its docs say what one is); columns: name -> (Q,)
    numbers (Parquet columns) or (Q, T) (Parquet lists); arrays: name -> (Q, ...) arrays kept in the npz
    companion only (images, curves).
    """

    success: np.ndarray
    reason: np.ndarray
    n_edits: np.ndarray
    columns: dict
    arrays: dict


class Figure(NamedTuple):
    """One report figure of a query: ``image`` (H, W, 3) uint8, or (F, H, W, 3) uint8 frames of an animation
    (written as a GIF); ``caption`` says what it shows."""

    caption: str
    image: np.ndarray


class RenderingMethod(Method):
    """A method that explains a query itself with a learned model (decoder, generator) instead of the
    region-swap engine. Its results depend on its ``Params`` (which name the artefact) and the seed.

    Subclasses set ``needs`` (what ``prepare`` loads, for messages: ``"decoder"``, ``"surrogate"``) and
    ``metric_columns`` (the evaluate metrics it reports: key -> header, arrows for the better direction) and
    implement the four hooks.
    """

    flow = "render"
    saliency = None
    uses = ("seed",)
    needs: ClassVar[str] = ""
    metric_columns: ClassVar[dict[str, str]] = {}

    def prepare(self, split_model, params, dataset) -> Any:
        """Load what the method needs for this classifier, once per run; a one-line FgvceError when it is
        missing, was made for other classifier weights, or the classifier does not fit the method."""
        raise NotImplementedError

    def artefact(self) -> dict:
        """A content fingerprint of the artefact its ``Params`` name, stored with its results, so that results of
        an artefact retrained in the same place are not reused. Default: none."""
        return {}

    def explain_batch(self, prepared, split_model, params, images: np.ndarray, true: np.ndarray,
                      pred: np.ndarray, keys: jax.Array) -> Rendered:
        """Explain Q queries: images (Q, S, S, 3) normalised as the classifier reads them, true and predicted
        classes (Q,), one typed key per query (``fgvce_jax.keys``). Row i depends on row i's inputs only."""
        raise NotImplementedError

    def metrics(self, split_model, params, dataset, stored) -> dict[str, float]:
        """Its evaluate metrics (keys of ``metric_columns``) from a stored run
        (:class:`fgvce_jax.results.StoredRendered`) on the query ``dataset``."""
        raise NotImplementedError

    def overview(self) -> list[Figure]:
        """Figures of the whole run, drawn once above its queries in the report (a global model's graph).
        Default: none."""
        return []

    def figures(self, row: dict, arrays: dict, query_image: np.ndarray) -> list[Figure]:
        """The report's figures of one query: its Parquet ``row``, its rows of the npz ``arrays`` and the query's
        display image (S, S, 3) in [0, 1]."""
        raise NotImplementedError


_METHODS: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: make a :class:`Method` subclass available as ``method=name``."""
    def deco(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"counterfactual method {name!r} is already registered")
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register({name!r}) expects a Method subclass, got {cls!r}")
        if not (dataclasses.is_dataclass(cls.Params) and cls.Params.__dataclass_params__.frozen):
            raise TypeError(f"{cls.__name__}.Params must be a frozen dataclass")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return deco


def unregister(name: str) -> None:
    """Remove a registered method (for methods registered by tests)."""
    _METHODS.pop(name, None)


def get(name: str) -> type[Method]:
    """The method class registered as ``name``; unknown names are an FgvceError listing the choices."""
    try:
        return _METHODS[name]
    except KeyError:
        raise FgvceError(f"unknown counterfactual method {name!r}; choose one of {', '.join(names())}") from None


def names(flow: str | None = None) -> tuple[str, ...]:
    """The registered method names, in registration order (the order of tables and reports); only those of one
    ``flow`` (``"swap"``: the region-swap engine's, ``"render"``: rendering methods) when given."""
    return tuple(n for n, cls in _METHODS.items() if flow in (None, cls.flow))


def of(config) -> Method:
    """The method of a :class:`~fgvce_jax.counterfactual.config.CounterfactualConfig`, with its parameters."""
    return get(config.method)(config.params)


def cell_regions(n: int, grid: tuple[int, int]) -> Regions:
    """Every cell as its own valid one-cell region: Regions with K = H * W, in raster order."""
    cells = jnp.eye(grid[0] * grid[1], dtype=bool).reshape(-1, *grid)
    rows, cols = jnp.divmod(jnp.arange(grid[0] * grid[1], dtype=jnp.int32), grid[1])
    n_cells = cells.shape[0]
    return Regions(center=jnp.broadcast_to(jnp.stack([rows, cols], -1), (n, n_cells, 2)),
                   score=jnp.zeros((n, n_cells), jnp.float32), valid=jnp.ones((n, n_cells), bool),
                   cells=jnp.broadcast_to(cells, (n,) + cells.shape))
