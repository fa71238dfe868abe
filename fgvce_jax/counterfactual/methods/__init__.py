"""Counterfactual methods, one file each (SPEC 5), registered by name: :mod:`.registry`.

| method        | file               | query / reference Phi          | regions             | loop                          |
|---------------|--------------------|--------------------------------|---------------------|-------------------------------|
| `fgvce`       | `fgvce.py`         | local Shapley                  | NMS partition       | top region, config selection  |
| `cve`         | `cve.py`           | none                           | every cell (r = 1)  | best (cell, cell) pair, joint, lambda = 0 |
| `global`      | `global_shapley.py`| global permutation Shapley     | NMS partition       | as fgvce                      |
| `gradient`    | `gradient.py`      | gradient x activation          | NMS partition       | as fgvce                      |
| `single-step` | `single_step.py`   | local Shapley                  | NMS partition       | no early stop: all regions    |
| `random`      | `random_maps.py`   | i.i.d. uniform(0, 1], one key per image | NMS partition | as fgvce                 |
"""
from fgvce_jax.counterfactual.methods import cve, fgvce, global_shapley, gradient, random_maps, single_step
from fgvce_jax.counterfactual.methods.registry import Method, NoParams, get, names, of, register, unregister

__all__ = ["Method", "NoParams", "cve", "fgvce", "get", "global_shapley", "gradient", "names", "of",
           "random_maps", "register", "single_step", "unregister"]
