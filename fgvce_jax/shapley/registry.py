"""The estimator registry: an estimator is one class registered by name.

An estimator describes a Shapley approximation as a sum over independent
*units* (a coalition, a permutation, a pair of coalitions...). Unit ``i``
draws from ``jax.random.fold_in(key, i)`` alone, and its statistics depend on
that draw and the game's values on its masks alone, so the result does not
depend on how units are grouped into chunks or spread over devices. The engine
(:mod:`fgvce_jax.shapley.estimate`) sums the per-unit float statistics in one
fixed pairwise order (bit-identical for any chunk size and device count), sums
the integer statistics (exact in any order), and hands both to ``finalize``.

To add an estimator, subclass :class:`Estimator` in a new module, decorate it
with ``@register("name")`` and import the module in ``shapley/__init__.py``;
see ``docs/shapley.md``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from fgvce_jax.errors import FgvceError

_ESTIMATORS: dict[str, type[Estimator]] = {}


@dataclasses.dataclass(frozen=True)
class Estimator:
    """A Shapley estimator for ``n`` players (hashable: a static jit argument).

    Subclasses implement ``evals_per_unit``, ``draw``, ``masks``, ``unit_stats`` and ``finalize``
    (or ``evaluate`` in place of ``draw`` and ``masks``, with ``stat_shapes``). Optional: ``anchors`` (masks evaluated once per game, e.g. the empty and full coalitions for
    KernelSHAP), ``counts`` (integer statistics), ``affine_values`` (a fast path for affine games),
    ``n_units`` / ``min_units`` (the budget rule), ``for_budget`` (settings chosen from the budget, e.g.
    how many coalition sizes KernelSHAP enumerates). Everything is traced: no Python control flow on values.
    """

    n: int
    name: ClassVar[str] = ""
    min_units: ClassVar[int] = 1

    @classmethod
    def for_budget(cls, n: int, budget: int) -> "Estimator":
        """The estimator for n players that a request of ``budget`` evaluations runs. Default: ``cls(n)``;
        an estimator whose settings depend on the budget (its anchors, say) chooses them here, so that the
        estimator stays a hashable value of (n, settings)."""
        return cls(n)

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

    def draw_bytes(self) -> int:
        """Working memory of one unit's draw, for sizing blocks. Default 4 n^2: a random order or subset
        drawn by ranking n uniforms compares all pairs (``permutation.uniform_ranks``)."""
        return 4 * self.n * self.n

    def draw(self, key: jax.Array, index: jax.Array) -> Any:
        """One unit's random choice (any pytree of arrays, e.g. a permutation's ranks), from its own key
        (``fold_in(key, index)``) and index only."""
        raise NotImplementedError

    def draws(self, key: jax.Array, index: jax.Array) -> Any:
        """The draws of units ``index`` (U,) of a request with PRNG key ``key``, stacked on a leading U axis.
        Default: unit i's :meth:`draw` from ``fold_in(key, i)``. An estimator whose units share randomness
        drawn from the request's key (a random bijection that samples without replacement, say) overrides
        this; unit i must still depend on ``key`` and ``i`` alone."""
        return jax.vmap(lambda i: self.draw(jax.random.fold_in(key, i), i))(index)

    def evaluate(self, fn: Callable, args: Any, key: jax.Array, index: jax.Array,
                 select: jax.Array | None) -> tuple[Any, jax.Array] | None:
        """(draws, results) of units ``index`` (E,) of one game ``fn(args, .)``, for an estimator whose units
        are not plain masks: it draws and evaluates them itself, and ``unit_stats`` receives each unit's row of
        ``results`` (E, ...) in place of its values. ``select`` (S,) int32 is the request's per-game selection
        (None when it has none; e.g. the windows a screened local request estimates). None (the default): the
        engine draws with :meth:`draws` and evaluates :meth:`masks` (or :meth:`affine_values`)."""
        return None

    def stat_shapes(self) -> Any:
        """The shapes of one unit's statistics (a pytree of ``jax.ShapeDtypeStruct``), for sizing the kept
        block sums. Default: traced from :meth:`draw` and :meth:`unit_stats` on values (m,)."""
        m = self.evals_per_unit()
        return jax.eval_shape(lambda: self.unit_stats(
            jax.tree.map(lambda a: a[0], self.draws(jax.random.key(0), jnp.zeros(1, jnp.int32))),
            jnp.zeros((m,), jnp.float32)))

    def masks(self, draw: Any) -> jax.Array:
        """The unit's coalitions bool (m, n)."""
        raise NotImplementedError

    def unit_stats(self, draw: Any, values: jax.Array) -> Any:
        """One unit's float statistics (a pytree of float32 arrays) from its draw and values (m,).

        The engine sums them over units in a fixed order, so they must not be sums over units themselves.
        """
        raise NotImplementedError

    def counts(self, draws: Any, valid: jax.Array) -> Any:
        """Integer statistics (a pytree of int32 arrays) summed over a block of units: ``draws`` carry a
        leading block axis, ``valid`` bool (U,) is False for padding (which must count zero).
        Integer sums are exact in any order. Default: none."""
        return {}

    def affine_values(self, draw: Any, offset: jax.Array, contrib: jax.Array,
                      readout: Callable[[jax.Array], jax.Array]) -> jax.Array | None:
        """The unit's values (m,) for an affine game ``v(m) = readout(offset + m @ contrib)`` (offset (C,),
        contrib (n, C), readout (B, C) -> (B,)), built without the (m, n) x (n, C) product; None (the
        default) = no fast path, the engine evaluates ``masks(draw)``. Must equal the generic values to
        float rounding."""
        return None

    def finalize(self, total: Any, counts: Any, n_units: int, anchor_values: jax.Array) -> jax.Array:
        """phi (n,) from the unit statistics summed over all units, the summed counts and the anchors'
        values (a,)."""
        raise NotImplementedError


def efficient(phi: jax.Array, gap: jax.Array) -> jax.Array:
    """The additive projection onto efficiency: phi (n,), gap = v(N) - v(empty) ->
    phi + (gap - sum_i phi_i) / n, the nearest vector (in L2) whose entries sum to ``gap``. It subtracts the
    same constant from every player, so an unbiased phi stays unbiased (E sum phi = gap)."""
    return phi + (gap - phi.sum()) / phi.shape[0]


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
        raise FgvceError(f"unknown Shapley method {name!r}; choose one of {', '.join(names())} or auto") from None


def names() -> tuple[str, ...]:
    """The registered estimator names, in registration order."""
    return tuple(_ESTIMATORS)
