"""Accuracy of the rank control variate (issue 11): permutation / antithetic with and without it.

Two 196-player (14 x 14), 200-class GAP + linear + softmax ``prob`` games at 12,544 evaluations:
independent contributions (contrib ~ 0.1 N(0, 1), a random offset) and size-dominated (post-ReLU
features sharing one channel profile, zero baseline, centred bias). The reference is the mean of two
long ``antithetic`` runs; its relative noise (half their distance over the mean's norm) is reported.
Relative L2 error, RMS over keys. Accuracy only, no timings::

    python benchmarks/variance_reduction.py --quick --out /tmp/variance_reduction.json
"""
from __future__ import annotations

import common
import jax
import jax.numpy as jnp
import numpy as np

from fgvce_jax.shapley.estimate import plan, run_batch
from fgvce_jax.shapley.game import Game, LinearHead
from fgvce_jax.sharding import device_mesh

N, CLASSES = 196, 200
METHODS = ("permutation", "permutation_cv", "antithetic", "antithetic_cv")


def independent_game(key):
    """(contrib (N, C), offset (C,)): independent per-position contributions."""
    k1, k2 = jax.random.split(key)
    return 0.1 * jax.random.normal(k1, (N, CLASSES)), jax.random.normal(k2, (CLASSES,))


def size_dominated_game(key, d=256):
    """(contrib, offset) of Z W / HW with Z = relu(profile + 0.3 noise) (zero baseline) and a centred bias."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    z = jax.nn.relu(jax.random.normal(k1, (d,)) + 0.5 + 0.3 * jax.random.normal(k2, (N, d)))
    w = jax.random.normal(k3, (d, CLASSES)) * (3.0 / np.sqrt(d))
    b = jax.random.normal(k4, (CLASSES,))
    return z @ w / N, b - b.mean()


def as_game(contrib, offset) -> Game:
    """The ``prob`` game of the class with the largest full-coalition logit."""
    cls = jnp.argmax(offset + contrib.sum(0)).astype(jnp.int32)
    return Game(LinearHead("prob"), {"contrib": contrib, "offset": offset, "cls": cls})


def runs(game, method, budget, keys, mesh):
    """phi (len(keys), N) float64, one run per key in one batched call."""
    p = plan(method, N, budget, game.bytes_per_evaluation, len(keys), None, mesh)
    args = jax.tree.map(lambda a: jnp.broadcast_to(a, (len(keys), *jnp.shape(a))), game.args)
    return np.asarray(run_batch(p.est, game.fn, args, keys, n_units=p.n_units, u=p.u, n_chunks=p.n_chunks,
                                mesh=mesh, r=p.r), np.float64)


def main():
    args = common.parser(__doc__, "variance_reduction").parse_args()
    reference, reps, budget = (100_000, 4, 12_544) if args.quick else (4_000_000, 32, 12_544)
    mesh, env = device_mesh(), common.environment()
    summary, results = {}, {}
    for name, make in (("independent", independent_game), ("size_dominated", size_dominated_game)):
        game = as_game(*make(jax.random.key(0)))
        ref2 = runs(game, "antithetic", reference, jax.random.split(jax.random.key(99), 2), mesh)
        ref = ref2.mean(0)
        noise = np.linalg.norm(ref2[0] - ref2[1]) / 2 / np.linalg.norm(ref)
        errors = {}
        for method in METHODS:
            phi = runs(game, method, budget, jax.random.split(jax.random.key(1), reps), mesh)
            rel = np.linalg.norm(phi - ref, axis=1) / np.linalg.norm(ref)
            errors[method] = float(np.sqrt((rel ** 2).mean()))
            summary[f"{name} {method} rel err"] = round(errors[method], 4)
        summary[f"{name} reference noise"] = round(float(noise), 4)
        results[name] = {"errors": errors, "reference_noise": float(noise)}
        print(name, {k: round(v, 4) for k, v in errors.items()}, f"reference noise {noise:.4f}")
    settings = {**vars(args), "players": N, "classes": CLASSES, "budget": budget, "reference": reference,
                "keys": reps}
    doc = common.document("variance_reduction", env, settings, summary, results,
                          ["relative L2 error against a long antithetic run; accuracy only, no timings"])
    print(f"wrote {common.write_json(args.out, doc)}")


if __name__ == "__main__":
    main()
