"""The engine on an opaque game (issue 16): ``shapley.estimate`` against the same game evaluated bare.

The game is a plain callable, so the engine knows nothing of its structure: a 14 x 14 x 2048 feature
map (random), masked by the coalition, average-pooled, a 200-class fc and softmax; v = p of class 3.
For each estimator the engine's time for one request (``budget`` evaluations, compiled, best of
``--repeats``) is compared with the bare limit: the same game, jitted, on exactly the masks that the
estimator draws (the same keys), in chunks of 64 .. all evaluations through ``lax.map``, the best
chunking. Goal: engine <= 1.2 x bare.

Run:  python benchmarks/opaque_game.py           (about a minute on a 2-core CPU)
      python benchmarks/opaque_game.py --quick   (small map, smoke test)
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

import common
from fgvce_jax.sharding import device_mesh

engine = importlib.import_module("fgvce_jax.shapley.estimate")  # the module (the package exports the function)
METHODS = ("permutation", "antithetic", "kernel", "leverage", "stratified_svarm")
GOAL = 1.2


def make_game(h: int, d: int, classes: int, seed: int = 0):
    """v(masks bool[B, h*h]) = softmax(mean_p(m_p z_p) W)[3] for random z (h*h, d), W (d, classes)."""
    kz, kw = jax.random.split(jax.random.key(seed))
    z = jax.random.normal(kz, (h * h, d))
    w = jax.random.normal(kw, (d, classes)) / jnp.sqrt(d)

    def game(masks):
        pooled = (masks[..., None] * z).mean(1)
        return jax.nn.softmax(pooled @ w, -1)[:, 3]
    return game


def drawn_masks(method: str, n: int, budget: int, key) -> jax.Array:
    """bool (evaluations, n): every mask the engine evaluates for this request (draws and anchors)."""
    p = engine.plan(method, n, budget, 4096, 1, None, device_mesh())
    est = p.est
    draws = est.draws(key, jnp.arange(p.n_units))
    masks = jax.vmap(est.masks)(draws).reshape(-1, n)
    anchors = jnp.asarray(est.anchors(), bool).reshape(-1, n)
    return jnp.concatenate([masks, anchors])


def bare_seconds(game, masks: jax.Array, chunk: int, repeats: int) -> float:
    """Best time of the jitted game over ``masks`` in ``lax.map`` chunks of ``chunk`` rows (padded)."""
    rows = -(-masks.shape[0] // chunk) * chunk
    padded = jnp.concatenate([masks, masks[: rows - masks.shape[0]]]).reshape(-1, chunk, masks.shape[1])
    run = jax.jit(lambda m: jax.lax.map(game, m))
    return common.time_call(lambda: run(padded).block_until_ready(), warmup=1, repeats=repeats)[1].best


def main():
    p = common.parser(__doc__, "opaque_game")
    p.add_argument("--budget", type=int, default=4925, help="evaluations per request")
    p.add_argument("--repeats", type=int, default=5, help="timed calls; the best counts")
    args = p.parse_args()
    h, d, classes = (6, 64, 10) if args.quick else (14, 2048, 200)
    budget = 300 if args.quick else args.budget
    env = common.environment()
    print(f"opaque_game on {common.describe(env)}")
    game, n, key = make_game(h, d, classes), h * h, jax.random.key(0)
    results = {}
    for method in METHODS:
        def request():
            return engine.estimate(game, n, method=method, budget=budget, key=key).phi.block_until_ready()
        t_engine = common.time_call(request, warmup=1, repeats=args.repeats)[1].best
        masks = drawn_masks(method, n, budget, key)
        chunks = sorted({c for c in (64, 128, 256, 512, 1024, 2048) if c < len(masks)} | {len(masks)})
        bare = {c: bare_seconds(game, masks, c, args.repeats) for c in chunks}
        best = min(bare, key=bare.get)
        results[method] = {"evaluations": int(len(masks)), "engine_s": t_engine, "bare_s_by_chunk": bare,
                           "bare_best_chunk": best, "bare_best_s": bare[best], "engine_over_bare": t_engine / bare[best]}
        print(f"  {method:17s} {len(masks)} evaluations: engine {1e3 * t_engine:7.1f} ms, bare best "
              f"{1e3 * bare[best]:7.1f} ms (chunks of {best}): {t_engine / bare[best]:.2f}x")
    summary = {f"{m}: engine / bare (goal <= {GOAL})": r["engine_over_bare"] for m, r in results.items()}
    settings = {"grid": [h, h, d], "classes": classes, "budget": budget, "repeats": args.repeats, "quick": args.quick}
    notes = ["engine = shapley.estimate on the plain callable, compiled, best of the repeats; bare = the "
             "same callable jitted over exactly the masks the estimator draws (same keys, anchors included), "
             "lax.map over chunks, the best chunk size."]
    doc = common.document("opaque_game", env, settings, summary, results, notes)
    print(f"wrote {common.write_json(args.out, doc)}")


if __name__ == "__main__":
    main()
