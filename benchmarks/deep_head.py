"""Local Shapley on a deep head (issue 16): ResNet-50 split ``layer4.0``, evaluations/s by path.

For 7 x 7 and 14 x 14 maps (224 and 448 px inputs), 1 and 3 maps per call, the same local request
(k = 3, M samples per window, outside = absent, zero baseline, prob output) is timed through
``run_batch`` (parameters shared, per-image arguments batched) with

- ``generic``: ``GenericHead``, the head on where(m, Z, B) at every position;
- ``prefix``: ``ConvHead`` evaluated on full maps (the first block's point-wise 1x1 conv, BN and ReLU
  mixed from once-computed prefix(Z), prefix(B));
- ``crop+prefix``: ``ConvHead`` on the windows' receptive fields (``shapley/crop.py``), the default;

against the bare jitted head on the same masks (where(m, Z, 0) -> head -> softmax), chunked like the
engine. A rate is full-map-equivalent evaluations per second: 2 H W M per map.

Run:  python benchmarks/deep_head.py            (full ResNet-50 widths; minutes on a 2-core CPU)
      python benchmarks/deep_head.py --quick    (narrow widths, small grids, a smoke test)
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

import common
from fgvce_jax.keys import row_keys
from fgvce_jax import saliency
from fgvce_jax.models.resnet import Bottleneck, ResNet
from fgvce_jax.models.split import split
from fgvce_jax.shapley.local import item_masks, plan, run_batch
from fgvce_jax.shapley.game import ConvHead, GenericHead
from fgvce_jax.sharding import device_mesh

KERNEL = 3


@dataclasses.dataclass(frozen=True)
class FullMaps:
    """A ConvHead that hides its crop path: the prefix path on full maps only."""

    head: ConvHead

    def __call__(self, args, masks):
        return self.head(args, masks)


def variants(sm, params, z, classes):
    """{name: (fn, per-image args, shared)} for the three paths on maps z (N, H, W, D)."""
    fn, args, shared, _ = saliency.batch_games(sm, params, z, None, classes, "zero", "prob")
    assert isinstance(fn, ConvHead)
    generic = {"z": z, "ctx": {}, "cls": classes, "base": jnp.zeros_like(z)}
    return {"generic": (GenericHead(sm, "prob", False), generic, shared), "prefix": (FullMaps(fn), args, shared),
            "crop+prefix": (fn, args, shared)}


@functools.partial(jax.jit, static_argnames=("sm", "u"))
def bare_head(sm, params, z, masks, u):
    """The head alone on where(m, Z, 0) for masks (N, E, H, W), in chunks of u evaluations -> (N, E)."""
    def one(zi, mi):
        chunks = mi.reshape(-1, u, *mi.shape[1:])
        return jax.lax.map(lambda m: jax.nn.softmax(sm.head(params, jnp.where(m[..., None], zi, 0.0), {}))[:, 0],
                           chunks).reshape(-1)
    return jax.vmap(one)(z, masks)


def local_masks(key, grid, draws, n):
    """local's masks for every (window, draw) item: (n, 4 HW draws, H, W), paired, outside absent."""
    hw = grid[0] * grid[1]
    items = jnp.arange(hw * draws)
    make = jax.vmap(lambda i: item_masks(jax.random.fold_in(key, i), i // draws, grid, KERNEL, "absent", True))
    return jnp.broadcast_to(make(items).reshape(1, -1, *grid), (n, 4 * hw * draws, *grid))


def bench(sm, params, d, hw, n, samples, repeats):
    """Rates of the three paths and of the bare head for n maps of hw x hw x d."""
    z = jax.nn.relu(jax.random.normal(jax.random.key(1), (n, hw, hw, d)))
    classes = jnp.arange(n, dtype=jnp.int32)
    keys = row_keys(jax.random.key(2), n)
    mesh = device_mesh()
    draws = samples // 2
    evals = n * 2 * hw * hw * samples
    out = {"grid": [hw, hw, d], "maps": n, "evaluations": evals}
    for name, (fn, args, shared) in variants(sm, params, z, classes).items():
        p = plan((hw, hw), KERNEL, draws, "absent", True, n, 4 * hw * hw * d * 8, None, mesh)
        run = functools.partial(run_batch, fn, args, keys, p, mesh=mesh, shared=shared)
        _, t = common.time_call(run, repeats=repeats)
        out[name] = {"s": t.best, "evals_per_s": evals / t.best, "units_per_chunk": p.u}
    masks = local_masks(jax.random.key(3), (hw, hw), draws, n)
    u = 4 * out["generic"]["units_per_chunk"]
    u = max(k for k in range(1, min(u, masks.shape[1]) + 1) if masks.shape[1] % k == 0)
    _, t = common.time_call(lambda: bare_head(sm, params, z, masks, u=u), repeats=repeats)
    out["bare_head"] = {"s": t.best, "evals_per_s": evals / t.best, "chunk": u}
    for name in ("generic", "prefix", "crop+prefix"):
        out[name]["of_bare"] = out[name]["evals_per_s"] / out["bare_head"]["evals_per_s"]
    return out


def main() -> None:
    args = common.parser(__doc__, "deep_head").parse_args()
    widths = (8, 8, 16, 32) if args.quick else (64, 128, 256, 512)
    grids, maps = ((5, 9), (1, 2)) if args.quick else ((7, 14), (1, 3))
    samples, repeats = 2, (1 if args.quick else 2)
    sm, params = split(ResNet(Bottleneck, (3, 4, 6, 3), 200, arch="resnet50", widths=widths, rngs=nnx.Rngs(0)),
                       "layer4.0")
    env = common.environment()
    print(common.describe(env))
    results, summary = [], {}
    for hw in grids:
        for n in maps:
            r = bench(sm, params, 4 * widths[3], hw, n, samples, repeats)
            results.append(r)
            print(r)
            for name in ("generic", "prefix", "crop+prefix", "bare_head"):
                summary[f"{hw}x{hw}, {n} maps: {name} evaluations/s"] = r[name]["evals_per_s"]
            summary[f"{hw}x{hw}, {n} maps: crop+prefix x generic"] = (r["crop+prefix"]["evals_per_s"]
                                                                    / r["generic"]["evals_per_s"])
    settings = {"quick": args.quick, "widths": widths, "grids": grids, "maps_per_call": maps, "kernel": KERNEL,
                "samples": samples, "repeats": repeats, "split": "layer4.0", "classes": 200}
    notes = ["random weights; rates are full-map-equivalent evaluations per second (2 H W M per map), best of "
             "the repeats after one warm-up call; the crop path always mixes the first block's prefix, so "
             "'crop' alone is not a separate path", "bare head: where(m, Z, 0) -> head -> softmax, jitted, "
             "chunked like the generic path's items"]
    path = common.write_json(args.out, common.document("deep_head", env, settings, summary, results, notes))
    print("wrote", path)


if __name__ == "__main__":
    main()
