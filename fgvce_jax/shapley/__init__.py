"""Shapley values of games over feature maps (SPEC 2-3).

``estimate`` dispatches to the estimators registered by name (``exact``,
``permutation``, ``antithetic``, ``permutation_cv``, ``antithetic_cv``, ``kernel``, ``leverage``, ``svarm``,
``stratified_svarm``, ``stratified_kernel``); ``local`` is the saliency partition estimator; ``feature_game`` builds the game of
one image.
"""
from fgvce_jax.shapley import (antithetic, antithetic_cv, exact, kernel, leverage,  # noqa: F401  (registered)
                               permutation, permutation_cv, stratified_kernel, stratified_svarm, svarm)
from fgvce_jax.shapley.estimate import ShapleyResult, estimate
from fgvce_jax.shapley.game import Game, as_game, feature_game
from fgvce_jax.shapley.local import local
from fgvce_jax.shapley.registry import Estimator, names, register

__all__ = ["Estimator", "Game", "ShapleyResult", "as_game", "estimate", "feature_game", "local", "names",
           "register"]
