"""Shapley values of games over feature maps (SPEC 2-3).

``estimate`` dispatches to the estimators registered by name (``exact``,
``permutation``, ``antithetic``, ``kernel``, ``permutation_cv``, ``antithetic_cv``);
``local`` is the saliency
partition estimator; ``feature_game`` builds the game of one image.
"""
from fgvce_jax.shapley import antithetic, antithetic_cv, exact, kernel, permutation, permutation_cv  # noqa: F401
from fgvce_jax.shapley.estimate import ShapleyResult, estimate
from fgvce_jax.shapley.game import Game, as_game, feature_game
from fgvce_jax.shapley.local import local
from fgvce_jax.shapley.registry import Estimator, names, register

__all__ = ["Estimator", "Game", "ShapleyResult", "as_game", "estimate", "feature_game", "local", "names",
           "register"]
