"""explain() on a real model (resnet_tiny at layer4.0) with Phi from fgvce_jax.saliency:
replaying the reported edits on the feature map reproduces the reported probabilities."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax import models
from fgvce_jax.counterfactual import CounterfactualConfig, FeatureBatch, explain


@pytest.fixture(scope="module")
def tiny():
    split_model, params = models.split(models.create("resnet_tiny", 4, seed=0))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(24, 32, 32, 3)).astype(np.float32)
    z, ctx = jax.jit(split_model.encode)(params, jnp.asarray(images))
    # A random model predicts one class for all noise images; a per-image channel gain
    # on the (post-ReLU) maps spreads the predictions.
    z = z * rng.lognormal(size=(24, 1, 1, z.shape[-1])).astype(np.float32)
    preds = np.asarray(jax.jit(split_model.head)(params, z, ctx).argmax(-1))
    y = np.bincount(preds).argmax()
    ref, query = np.flatnonzero(preds == y), np.flatnonzero(preds != y)[:3]
    assert ref.size >= 2 and query.size >= 1, "the random model must predict at least two classes"

    def fb(idx):
        return FeatureBatch(z[idx], jax.tree.map(lambda a: a[idx], ctx), np.full(idx.size, y), preds[idx],
                            z[idx].mean((1, 2)))

    return split_model, params, fb(query), fb(ref)


@pytest.mark.parametrize("method", ["fgvce", "gradient"])
def test_edits_replay_on_real_head(tiny, method):
    split_model, params, queries, refs = tiny
    cfg = CounterfactualConfig(samples=2, region_size=2, max_regions=4, n_references=2,
                               candidates_per_reference=2, t_max=4, method=method, selection="joint")
    ex = explain(split_model, params, queries, refs, cfg, key=jax.random.key(0))
    assert ex.query_phi.shape == queries.z.shape[:3] and np.all(np.isfinite(ex.query_phi))
    assert np.any(ex.n_edits > 0)
    r = ex.region_size
    for qi in range(len(queries.labels)):
        z = np.array(queries.z[qi])
        assert ex.probs_before[qi].argmax() == queries.preds[qi]
        for t in range(ex.n_edits[qi]):
            ref_z, (ci, cj), (qi0, qj0) = np.asarray(refs.z[ex.ref_row[qi, t]]), ex.ref_region[qi, t], ex.query_region[qi, t]
            for i, j in zip(*np.nonzero(ex.edit_mask[qi, t])):
                assert abs(i - qi0) <= r and abs(j - qj0) <= r
                z[i, j] = ref_z[ci + i - qi0, cj + j - qj0]
            ctx = jax.tree.map(lambda a: a[qi:qi + 1], queries.ctx)
            probs = jax.nn.softmax(split_model.head(params, jnp.asarray(z[None]), ctx))[0]
            np.testing.assert_allclose(ex.probs[qi, t], probs, atol=1e-5)
        assert bool(ex.success[qi]) == (ex.n_edits[qi] > 0 and ex.probs[qi, ex.n_edits[qi] - 1].argmax() == queries.labels[qi])
