"""Counterfactual methods, one file each (SPEC 5), registered by name: :mod:`.registry`.

| method        | file               | query / reference Phi          | regions             | loop                          |
|---------------|--------------------|--------------------------------|---------------------|-------------------------------|
| `fgvce`       | `fgvce.py`         | local Shapley                  | NMS partition       | top region, config selection  |
| `cve`         | `cve.py`           | none                           | every cell (r = 1)  | best (cell, cell) pair, joint, lambda = 0 |
| `global`      | `global_shapley.py`| global permutation Shapley     | NMS partition       | as fgvce                      |
| `gradient`    | `gradient.py`      | gradient x activation          | NMS partition       | as fgvce                      |
| `single-step` | `single_step.py`   | local Shapley                  | NMS partition       | no early stop: all regions    |
| `random`      | `random_maps.py`   | i.i.d. uniform(0, 1], one key per image | NMS partition | as fgvce                 |

Rendering methods (``RenderingMethod``: they explain with a trained model of their own, not by region swaps):

| method        | file               | needs                          | explanation                                    |
|---------------|--------------------|--------------------------------|------------------------------------------------|
| `mirror`      | `mirror.py`        | a decoder (`fgvce train-decoder`) | the decoded path to the reflection across the s/t boundary |
| `glance`      | `glance.py`        | a surrogate, graph, generator (`fgvce train-surrogate`) | concept importances, the smallest intervention set, rendered strips |
"""
# The import order is the registration order, which is the order of tables and reports: FG-VCE first, then
# the baselines as in the table above. Keep it; do not sort these lines.
from fgvce_jax.counterfactual.methods import fgvce  # isort: skip
from fgvce_jax.counterfactual.methods import cve  # isort: skip
from fgvce_jax.counterfactual.methods import global_shapley  # isort: skip
from fgvce_jax.counterfactual.methods import gradient  # isort: skip
from fgvce_jax.counterfactual.methods import single_step  # isort: skip
from fgvce_jax.counterfactual.methods import random_maps  # isort: skip
from fgvce_jax.counterfactual.methods import mirror  # isort: skip
from fgvce_jax.counterfactual.methods import glance  # isort: skip
from fgvce_jax.counterfactual.methods.registry import (Figure, Method, NoParams, Rendered, RenderingMethod, get,
                                                       names, of, register, unregister)

__all__ = ["Figure", "Method", "NoParams", "Rendered", "RenderingMethod", "cve", "fgvce", "get", "global_shapley", "glance", "gradient", "mirror", "names", "of",
           "random_maps", "register", "single_step", "unregister"]
