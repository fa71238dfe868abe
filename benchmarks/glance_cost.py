"""Cost of the GLANCE-style method (issue 13): surrogate and generator training steps/s, explanations/s.

resnet_tiny with random weights at 28 px (morpho-digits' size), split at layer4 (GAP + linear head, D = 128),
10 classes; F = 6 context features and K = 4 free concepts (P = 10), the defaults of ``fgvce train-surrogate``:

- surrogate: ``surrogate.train_step`` (Adam on the four losses) on batches of 128 synthetic latents;
- generator: one step of the distillation (``distil._distil_step``: D's step with R1, then G's step with the
  adversarial loss and the latent-matching losses through the frozen classifier and surrogate), the default
  ``DistilConfig`` (batch 16);
- explanations: ``explain.explain`` (importances and the greedy set, max_set 3) on a batch of queries, and
  ``explain.strips`` (P x 5 rendered frames per query through the untrained generator and the classifier).
  explanations/s counts both: a query's explanation with its strips.

Timings exclude compilation (a warm-up call first), best of the repeats; the compile + first call is
reported apart as ``cold``. Weights are random: the cost does not depend on them.

    python benchmarks/glance_cost.py            # about 3 minutes on 2 CPU cores (mostly compilation)
    python benchmarks/glance_cost.py --quick    # a smoke run: tiny batches, one repeat
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import common
from fgvce_jax import models
from fgvce_jax.glance import distil, explain, gan, surrogate
from fgvce_jax.glance.causal import Graph
from fgvce_jax.models.split import split

F, K, SIZE = 6, 4, 28


def timed(fn, repeats):
    """({"cold_s", "best_s", "median_s", "repeats"}, last result) of fn(), the first call timed as cold."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    cold = time.perf_counter() - t0
    out, t = common.time_call(fn, warmup=0, repeats=repeats)
    return {"cold_s": cold, **t.as_dict()}, out


def bench_surrogate(h, head, batch, repeats):
    config = surrogate.SurrogateConfig(n_free=K, batch_size=batch)
    model = surrogate.Surrogate(h.shape[1], F, K, config.hidden, key=jax.random.key(0))
    optimizer = nnx.Optimizer(model, optax.adam(config.lr), wrt=nnx.Param)
    weights = {k: 1.0 for k in ("rec", "kl", "align", "decor")}
    u = jnp.asarray(np.random.default_rng(1).normal(size=(batch, F)), jnp.float32)
    hb = jnp.asarray(h[:batch])
    t, _ = timed(lambda: surrogate.train_step(model, optimizer, head, hb, u, weights)["total"], repeats)
    return {**t, "batch": batch, "steps_per_s": 1 / t["best_s"]}, model


def bench_generator(split_model, params, model, real, config, repeats):
    c = np.asarray(model.encode(jnp.asarray(split_model.encode(params, jnp.asarray(real))[0].mean((1, 2)))))
    g_config, d_config, gan_config = config.networks(F + K, SIZE, 3)
    setup, state = gan.init(g_config, d_config, gan_config, jax.random.key(0))
    s_graph, s_state = nnx.split(model)
    step = distil._distil_step(setup.g_graph, setup.d_graph, gan_config, split_model, s_graph, 1.0, 1.0)
    mean, std = jnp.full(3, 0.5), jnp.full(3, 0.25)
    aux = (params, s_state, mean, std)
    b = config.batch_size
    batch = (jnp.clip(jnp.asarray(real[:b]) * 0.25 + 0.5, 0, 1) * 2 - 1, jnp.asarray(c[:b]))
    holder = [state]

    def one():
        holder[0], m = step(holder[0], *batch, jax.random.key(len(holder)), aux)
        return m["g_loss"]

    t, _ = timed(one, repeats)
    g = distil.Distilled(setup.g_graph, holder[0].g, g_config, np.asarray(mean), np.asarray(std), [])
    return {**t, "batch": b, "steps_per_s": 1 / t["best_s"], "g_params": sum(x.size for x in jax.tree.leaves(state.g)),
            "d_params": sum(x.size for x in jax.tree.leaves(state.d))}, g


def bench_explanations(split_model, params, model, head, g, h, n, repeats):
    p = F + K
    effects = explain.concept_effects(Graph(tuple(map(str, range(p + 1))), (), (), np.zeros((p + 1, p + 1)),
                                            np.ones(p + 1)), np.ones(p))
    y = np.arange(n) % 10
    t_explain, _ = timed(lambda: explain.explain(model, head, effects, h[:n], y)["importance"], repeats)
    t_strips, out = timed(lambda: explain.strips(model, head, effects, g, split_model, params, h[:n], y,
                                                 jax.random.key(0))["images"], repeats)
    per_query = (t_explain["best_s"] + t_strips["best_s"]) / n
    return {"queries": n, "explain": {**t_explain, "queries_per_s": n / t_explain["best_s"]},
            "strips": {**t_strips, "queries_per_s": n / t_strips["best_s"], "frames_per_query": p * len(explain.DELTAS),
                       "images_shape": list(out.shape)},
            "explanations_per_s": 1 / per_query}


def main() -> None:
    args = common.parser(__doc__, "glance_cost").parse_args()
    repeats = 1 if args.quick else 3
    config = distil.DistilConfig(batch_size=4) if args.quick else distil.DistilConfig()
    s_batch, n_queries = (16, 2) if args.quick else (128, 8)
    env = common.environment()
    print(f"glance_cost on {common.describe(env)}", flush=True)
    split_model, params = split(models.create("resnet_tiny", 10), "layer4")
    head = split_model.linear_head(params)
    real = np.random.default_rng(0).normal(size=(max(s_batch, config.batch_size, n_queries), SIZE, SIZE, 3))
    real = real.astype(np.float32)
    h = np.asarray(surrogate.pooled_latents(split_model, params, lambda idx: real[idx], len(real)))
    results = {}
    results["surrogate"], model = bench_surrogate(h, head, s_batch, repeats)
    print(f"surrogate: {results['surrogate']['steps_per_s']:.1f} steps/s (batch {s_batch}; "
          f"cold {results['surrogate']['cold_s']:.1f} s)", flush=True)
    results["generator"], g = bench_generator(split_model, params, model, real, config, repeats)
    print(f"generator: {results['generator']['steps_per_s']:.2f} steps/s (batch {config.batch_size}; "
          f"cold {results['generator']['cold_s']:.1f} s)", flush=True)
    results["explanations"] = bench_explanations(split_model, params, model, head, g, h, n_queries, repeats)
    e = results["explanations"]
    print(f"explanations: explain {e['explain']['queries_per_s']:.1f} queries/s, strips "
          f"{e['strips']['queries_per_s']:.2f} queries/s ({e['strips']['frames_per_query']} frames each); "
          f"{e['explanations_per_s']:.2f} explanations/s with strips", flush=True)
    summary = {"surrogate training steps/s": results["surrogate"]["steps_per_s"],
               "generator training steps/s": results["generator"]["steps_per_s"],
               "explanations/s (explain only)": e["explain"]["queries_per_s"],
               "explanations/s (explain + strips)": e["explanations_per_s"]}
    settings = {"quick": args.quick, "arch": "resnet_tiny", "split": "layer4", "image_size": SIZE, "F": F, "K": K,
                "surrogate_batch": s_batch, "generator": {k: v for k, v in vars(config).items()},
                "queries": n_queries, "deltas": list(explain.DELTAS), "repeats": repeats}
    notes = ["random weights; best of the repeats after the cold (compile + first) call",
             "explanations/s with strips = queries / (explain time + strips time) on one batch of queries"]
    path = common.write_json(args.out, common.document("glance_cost", env, settings, summary, results, notes))
    print("wrote", path)


if __name__ == "__main__":
    main()
