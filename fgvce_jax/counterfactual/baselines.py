"""How each method of SPEC 5 maps onto the shared machinery.

| method        | query / reference Phi          | regions                  | loop                          |
|---------------|--------------------------------|--------------------------|-------------------------------|
| `fgvce`       | local Shapley                  | NMS partition            | top region, config selection  |
| `global`      | global permutation Shapley     | NMS partition            | as fgvce                      |
| `gradient`    | gradient x activation          | NMS partition            | as fgvce                      |
| `random`      | i.i.d. uniform(0, 1) (seeded)  | NMS partition            | as fgvce                      |
| `single-step` | local Shapley                  | NMS partition            | no early stop: all regions    |
| `cve`         | none                           | every cell (r = 1)       | best (cell, cell) pair, joint, lambda = 0 |
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fgvce_jax.counterfactual.config import CounterfactualConfig
from fgvce_jax.counterfactual.partition import Regions
from fgvce_jax.counterfactual.search import SearchOptions

SALIENCY_METHOD = {"fgvce": "local", "single-step": "local", "global": "global", "gradient": "gradient"}


def search_options(config: CounterfactualConfig) -> SearchOptions:
    """The loop's static options for ``config.method``."""
    if config.method == "cve":
        return SearchOptions(selection="joint", lam=0.0, stop=config.stop, t_max=config.t_max,
                             region_size=1, pairs=True, early_stop=True, chunk_size=config.chunk_size)
    return SearchOptions(selection=config.selection, lam=float(config.lam), stop=config.stop,
                         t_max=config.t_max, region_size=config.region_size, pairs=False,
                         early_stop=config.method != "single-step", chunk_size=config.chunk_size)


def random_phi(key: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Phi for the ``random`` baseline: (N, H, W) i.i.d. uniform on (0, 1], so NMS
    yields random regions in random order."""
    return 1.0 - jax.random.uniform(key, shape)


def cell_regions(n: int, grid: tuple[int, int]) -> Regions:
    """Every cell as its own valid one-cell region (``cve``): Regions with K = H * W."""
    cells = jnp.eye(grid[0] * grid[1], dtype=bool).reshape(-1, *grid)
    rows, cols = jnp.divmod(jnp.arange(grid[0] * grid[1], dtype=jnp.int32), grid[1])
    n_cells = cells.shape[0]
    return Regions(center=jnp.broadcast_to(jnp.stack([rows, cols], -1), (n, n_cells, 2)),
                   score=jnp.zeros((n, n_cells), jnp.float32), valid=jnp.ones((n, n_cells), bool),
                   cells=jnp.broadcast_to(cells, (n,) + cells.shape))
