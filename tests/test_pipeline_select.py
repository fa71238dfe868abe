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
    subset = pipeline.select_references(q_true, q_pooled, ref_pred, n, "nearest")
    assert subset.tolist() == _brute_nearest(q_true, q_pooled, label, pred, pooled, n)
    # The engine picks the same references from the subset as from the full split.
    args = dict(n=n, mode="nearest", key=None)
    full, full_ok = engine_pick(jnp.asarray(q_pooled), jnp.asarray(q_true), jnp.asarray(pooled),
                                jnp.asarray(label), jnp.asarray(pred), **args)
    sub, sub_ok = engine_pick(jnp.asarray(q_pooled), jnp.asarray(q_true), jnp.asarray(pooled[subset]),
                              jnp.asarray(label[subset]), jnp.asarray(pred[subset]), **args)
    np.testing.assert_array_equal(full_ok, sub_ok)
    np.testing.assert_array_equal(np.where(full_ok, full, -1), np.where(sub_ok, subset[np.maximum(sub, 0)], -1))


def test_random_mode_keeps_every_eligible_reference_of_the_query_classes():
    label = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    ref_pred = {"label": label, "pred": pred, "pooled": np.ones((6, 2))}
    assert pipeline.select_references(np.array([0, 1]), np.ones((2, 2)), ref_pred, 1, "random").tolist() == [0, 2, 3]
