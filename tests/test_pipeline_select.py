"""Pass 2 of the pipeline: query and reference selection against brute force."""
import types

import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax import pipeline
from fgvce_jax.counterfactual.references import select_references as engine_pick
from fgvce_jax.errors import FgvceError


def _dataset(labels):
    return types.SimpleNamespace(name="toy", split="test", labels=np.asarray(labels),
                                 ids=np.asarray([f"img{i}" for i in range(len(labels))]))


def test_select_queries_misclassified_in_order_with_limit_and_ids():
    ds = _dataset([0, 1, 2, 0, 1, 2])
    pred = np.array([0, 2, 2, 1, 0, 2])
    np.testing.assert_array_equal(pipeline.select_queries(ds, pred, None, None), [1, 3, 4])
    np.testing.assert_array_equal(pipeline.select_queries(ds, pred, None, 2), [1, 3])
    np.testing.assert_array_equal(pipeline.select_queries(ds, pred, ["img4", "img1"], None), [4, 1])
    with pytest.raises(FgvceError, match="unknown query id.*nope"):
        pipeline.select_queries(ds, pred, ["img1", "nope"], None)
    with pytest.raises(FgvceError, match="classifies correctly.*img0"):
        pipeline.select_queries(ds, pred, ["img0"], None)


def _brute_nearest(q_true, q_pooled, label, pred, pooled, n):
    """Union over queries of the n eligible references with the largest cosine (loops, numpy)."""
    chosen = set()
    for y, v in zip(q_true, q_pooled):
        eligible = [r for r in range(len(label)) if label[r] == pred[r] == y]
        cos = {r: float(v @ pooled[r] / (np.linalg.norm(v) * np.linalg.norm(pooled[r]))) for r in eligible}
        chosen |= set(sorted(eligible, key=lambda r: -cos[r])[:n])
    return sorted(chosen)


@pytest.mark.parametrize("n", [1, 3, 50])
def test_nearest_references_union_matches_brute_force_and_engine(n):
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, 60)
    pred = np.where(rng.random(60) < 0.8, label, (label + 1) % 4)
    pooled = rng.normal(size=(60, 5)).astype(np.float32)
    q_true = np.array([0, 2, 2, 3])
    q_pooled = rng.normal(size=(4, 5)).astype(np.float32)
    ref_pred = {"label": label, "pred": pred, "pooled": pooled}
    subset = pipeline.select_references(q_true, q_pooled, ref_pred, None, n, "nearest")
    assert subset.tolist() == _brute_nearest(q_true, q_pooled, label, pred, pooled, n)
    # The engine picks the same references from the subset as from the full split.
    args = dict(n=n, mode="nearest")
    full, full_ok = engine_pick(jnp.asarray(q_pooled), jnp.asarray(q_true), jnp.asarray(pooled),
                                jnp.asarray(label), jnp.asarray(pred), **args)
    sub, sub_ok = engine_pick(jnp.asarray(q_pooled), jnp.asarray(q_true), jnp.asarray(pooled[subset]),
                              jnp.asarray(label[subset]), jnp.asarray(pred[subset]), **args)
    np.testing.assert_array_equal(full_ok, sub_ok)
    np.testing.assert_array_equal(np.where(full_ok, full, -1), np.where(sub_ok, subset[np.maximum(sub, 0)], -1))


def _brute_random(q_true, label, pred, draws, n):
    """Union over queries of the n eligible references of highest draw (loops)."""
    chosen = set()
    for y in q_true:
        eligible = [r for r in range(len(label)) if label[r] == pred[r] == y]
        chosen |= set(sorted(eligible, key=lambda r: (-draws[r], r))[:n])
    return sorted(chosen)


@pytest.mark.parametrize("n", [1, 2, 50])
def test_random_references_are_each_references_own_draw_whatever_the_split_holds(n):
    """--reference-mode random: a reference's rank is a draw from its own key, so the union kept for the engine
    matches brute force, and a query's references are the same from a split with more images."""
    label = np.array([0, 0, 1, 1, 2, 2, 0, 1, 1])
    pred = np.array([0, 1, 1, 1, 2, 0, 0, 1, 2])
    ids = np.asarray([f"r{i}" for i in range(9)])
    config = types.SimpleNamespace(reference_mode="random", seed=3)
    draws = pipeline.reference_draws(config, "train", ids)
    assert draws.shape == (9,) and len(set(draws.tolist())) == 9 and ((draws >= 0) & (draws < 1)).all()
    np.testing.assert_array_equal(pipeline.reference_draws(config, "train", ids[::-1]), draws[::-1])  # by id
    assert not np.array_equal(pipeline.reference_draws(types.SimpleNamespace(reference_mode="random", seed=4),
                                                       "train", ids), draws)
    assert pipeline.reference_draws(types.SimpleNamespace(reference_mode="nearest", seed=3), "train", ids) is None
    ref_pred = {"label": label, "pred": pred, "pooled": np.ones((9, 2))}
    q_true = np.array([0, 1])
    subset = pipeline.select_references(q_true, np.ones((2, 2)), ref_pred, draws, n, "random")
    assert subset.tolist() == _brute_random(q_true, label, pred, draws, n)
    assert set(subset) <= {0, 2, 3, 6, 7}  # correct references of the queries' classes only
    keep = np.array([0, 2, 3, 5, 6, 7])  # a smaller split: the queries' references are the same
    small = pipeline.select_references(q_true, np.ones((2, 2)), {k: v[keep] for k, v in ref_pred.items()},
                                       pipeline.reference_draws(config, "train", ids[keep]), n, "random")
    assert keep[small].tolist() == subset.tolist()
