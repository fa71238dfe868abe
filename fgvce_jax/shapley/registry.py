"""The estimator registry: an estimator is one class registered by name.

An estimator describes a Shapley approximation as a sum over independent
*units* (a coalition, a permutation, a pair of coalitions...). Unit ``i``
draws its masks from ``jax.random.fold_in(key, i)`` alone, so the result does
not depend on how units are grouped into chunks or spread over devices. The
engine (:mod:`fgvce_jax.shapley.estimate`) evaluates the game on every unit's
masks, sums the per-chunk statistics, and hands the total to ``finalize``.

To add an estimator, subclass :class:`Estimator` in a new module, decorate it
with ``@register("name")`` and import the module in ``shapley/__init__.py``;
see ``docs/shapley.md``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import numpy as np

from fgvce_jax.errors import FgvceError

_ESTIMATORS: dict[str, type[Estimator]] = {}


@dataclasses.dataclass(frozen=True)
class Estimator:
    """A Shapley estimator for ``n`` players (hashable: a static jit argument).

    Subclasses implement ``evals_per_unit``, ``masks``, ``stats`` and
    ``finalize``; ``anchors`` are masks evaluated once (e.g. the empty and full
    coalitions for KernelSHAP).
    """

    n: int
    name: ClassVar[str] = ""
    min_units: ClassVar[int] = 1

    def evals_per_unit(self) -> int:
        """m, the number of masks (game evaluations) one unit uses."""
        raise NotImplementedError

    def anchors(self) -> np.ndarray:
        """bool (a, n): masks evaluated once per game, outside the units."""
        return np.zeros((0, self.n), bool)

    def n_units(self, budget: int) -> int:
        """How many units fit in ``budget`` evaluations; below the minimum is an FgvceError."""
        a, m = len(self.anchors()), self.evals_per_unit()
        units = (int(budget) - a) // m
        if units < self.min_units:
            raise FgvceError(
                f"{self.name} needs a budget of at least {a + m * self.min_units} evaluations "
                f"for {self.n} players, got {budget}")
        return units

    def masks(self, key: jax.Array, index: jax.Array) -> jax.Array:
        """One unit's coalitions bool (m, n), from its own key (``fold_in(key, index)``) and index."""
        raise NotImplementedError

    def stats(self, masks: jax.Array, values: jax.Array, valid: jax.Array) -> Any:
        """Sum over a chunk of units of their statistics (a pytree).

        masks bool (U, m, n), values float (U, m), valid bool (U,) (False for padding).
        """
        raise NotImplementedError

    def finalize(self, total: Any, n_units: int, anchor_values: jax.Array) -> jax.Array:
        """phi (n,) from the statistics summed over all units and the anchors' values (a,)."""
        raise NotImplementedError


def register(name: str):
    """Class decorator: make an :class:`Estimator` subclass available to ``estimate(method=name)``."""
    def deco(cls: type[Estimator]) -> type[Estimator]:
        if name in _ESTIMATORS:
            raise ValueError(f"estimator {name!r} is already registered")
        if not (isinstance(cls, type) and issubclass(cls, Estimator)):
            raise TypeError(f"@register({name!r}) expects an Estimator subclass, got {cls!r}")
        cls.name = name
        _ESTIMATORS[name] = cls
        return cls
    return deco


def get(name: str) -> type[Estimator]:
    """The estimator class registered as ``name``; unknown names are an FgvceError listing the choices."""
    try:
        return _ESTIMATORS[name]
    except KeyError:
        raise FgvceError(f"unknown Shapley method {name!r}; choose one of {', '.join(names())}") from None


def names() -> tuple[str, ...]:
    """The registered estimator names, in registration order."""
    return tuple(_ESTIMATORS)
