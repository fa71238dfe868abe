"""The ``glance`` method (GLANCE-style twin surrogate, issue 13) through the pipeline, evaluate, report and the CLI.

A random-weight resnet_tiny on ``morpho-digits`` split at layer4, a surrogate fitted for 2 epochs on 64 training
images (the morphometrics as context) and a generator distilled for 2 steps: cheap, and enough to check that what
is stored is what the surrogate and the classifier say, recomputed here from the stored numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax import cli, data, evaluate, models, pipeline, report, results
from fgvce_jax.counterfactual import CounterfactualConfig, methods
from fgvce_jax.counterfactual.methods.glance import GlanceParams
from fgvce_jax.errors import FgvceError
from fgvce_jax.glance import distil, explain, fit, surrogate

DATASET = "morpho-digits-shortcut"
TINY_G = distil.DistilConfig(steps=2, batch_size=8, w_dim=8, mapping_layers=1, channel_base=32, channel_max=8,
                             save_every=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(model dir, surrogate dir, explain out dir, (split_model, params)) of 4 mistakes explained by ``glance``."""
    root = tmp_path_factory.mktemp("glance")
    model = models.create("resnet_tiny", 10, seed=0)
    test = data.load(DATASET, "test")
    pre = test.preprocessing
    info = models.ModelInfo(model.arch, 10, tuple(test.class_names), pre.image_size, pre.resize_size,
                            tuple(pre.mean), tuple(pre.std))
    model_dir = models.save(root / "model", model, info)
    split_model, params = models.split(model, at="layer4")
    train = data.load(DATASET, "train").subset(np.arange(64))
    u, names = fit.context_features(train)
    g = fit.fit_global(split_model, params, train, u, names, root / "surrogate", key=jax.random.key(0),
                       prediction_classes=(0, 2, 4, 6, 8),
                       config=surrogate.SurrogateConfig(n_free=2, hidden=32, epochs=2, batch_size=32))
    fit.fit_generator(split_model, params, train, g, root / "surrogate", key=jax.random.key(1), config=TINY_G)
    config = CounterfactualConfig(method="glance", params=GlanceParams(surrogate=str(root / "surrogate")))
    pipeline.explain_split(model_dir, DATASET, "test", root / "out", config, limit=4, shard_size=4, at="layer4")
    return model_dir, root / "surrogate", root / "out", (split_model, params), config


def test_glance_stores_what_its_surrogate_and_the_classifier_say(run, tmp_path):
    model_dir, sur_dir, out, (split_model, params), config = run
    stored, cfg = results.load_run(out / "glance")
    assert len(stored.success) == 4 and cfg["flow"] == "render" and cfg["params.max_set"] == 3
    loaded = fit.load(sur_dir, split_model, params)
    model, head, a = loaded.fitted.model, loaded.head, stored.arrays
    x = data.load(DATASET, "test").images(stored.query_split_index)
    h = np.asarray(split_model.encode(params, jnp.asarray(x))[0].mean((1, 2)))
    np.testing.assert_allclose(a["concepts"], model.encode(jnp.asarray(h)), rtol=1e-4, atol=1e-5)
    # success recomputed from the stored set: the surrogate's prediction after the shifts is the true class
    for q in range(4):
        shift = sum((step * loaded.effects[j] for j, step in zip(a["intervention_set"][q], a["intervention_steps"][q])
                     if j >= 0), np.zeros(loaded.effects.shape[1]))
        logits = surrogate.head_logits(head, model.decode(jnp.asarray(a["concepts"][q] + shift)[None]))
        assert bool(np.argmax(logits) == stored.true[q]) == bool(stored.success[q])
        assert stored.n_edits[q] == (a["intervention_set"][q] >= 0).sum()
    np.testing.assert_array_equal(a["top_concept"], np.abs(a["importance"]).argmax(1))
    p, m = loaded.effects.shape[0], len(explain.DELTAS)
    assert a["strips"].shape == (4, p, m, 28, 28, 3) and a["strips"].dtype == np.uint8
    # p(true) of each stored frame by the full classifier, up to the frames' 8-bit rounding
    mean, std = np.asarray(cfg["preprocessing"]["mean"]), np.asarray(cfg["preprocessing"]["std"])
    frames = (a["strips"].reshape(-1, 28, 28, 3) / 255.0 - mean) / std
    p_true = np.asarray(jax.nn.softmax(split_model.logits(params, jnp.asarray(frames, jnp.float32))))
    p_true = np.take_along_axis(p_true.reshape(4, p, m, -1), stored.true[:, None, None, None], -1)[..., 0]
    np.testing.assert_allclose(a["strip_p_y"], p_true, atol=0.05)
    # each query's strips come from its own key: another shard size gives the same arrays
    pipeline.explain_split(model_dir, DATASET, "test", tmp_path / "s1", config, limit=4, shard_size=3, at="layer4")
    other, _ = results.load_run(tmp_path / "s1" / "glance")
    for k in ("strips", "strip_p_y", "importance", "intervention_set", "success"):
        np.testing.assert_array_equal(other.arrays[k], a[k])


def test_glance_metrics_in_evaluate_and_the_graph_and_strips_in_the_report(run):
    _, _, out, _, _ = run
    rows, _ = evaluate.evaluate_directory(out, use_rise=False, parts=False)
    (row,) = rows
    stored, _ = results.load_run(out / "glance")
    assert row["method"] == "glance" and row["validity"] == pytest.approx(stored.success.mean())
    assert 0 <= row["surrogate_agreement"] <= 1 and 0 <= row["generator_agreement"] <= 1
    assert np.isfinite(row["concept_r2"]) and row["fd_classifier"] > 0
    assert row["shd"] in (0, 1, 2, 3, 4, 5, 6) and 0 <= row["slant_first"] <= 1
    assert "SHD to the true graph ↓" in (out / "evaluation" / "table.md").read_text()
    page = report.write_report(out, max_queries=2).read_text()
    assert "id='m-glance'" in page and page.count("<figcaption>the causal graph") == 1
    assert page.count("<figcaption>interventions do(c_j") == 2


def test_glance_refuses_bad_input_in_one_line(run, tmp_path, capsys):
    model_dir, sur_dir, _, _, _ = run
    with pytest.raises(FgvceError, match="needs a fitted surrogate: pass --glance-surrogate"):
        CounterfactualConfig(method="glance")
    with pytest.raises(FgvceError, match="--glance-max-set must be a positive integer"):
        GlanceParams(surrogate="x", max_set=0).validate()
    other = models.create("resnet_tiny", 10, seed=7)
    other_dir = models.save(tmp_path / "other", other, models.load(model_dir)[1])
    with pytest.raises(FgvceError, match="another classifier|other weights|other classifier") as err:
        pipeline.explain_split(other_dir, DATASET, "test", tmp_path / "o", CounterfactualConfig(
            method="glance", params=GlanceParams(str(sur_dir))), limit=2, at="layer4")
    assert "\n" not in str(err.value)
    with pytest.raises(FgvceError, match="GAP \\+ linear head") as err:
        pipeline.explain_split(model_dir, DATASET, "test", tmp_path / "o2", CounterfactualConfig(
            method="glance", params=GlanceParams(str(sur_dir))), limit=2, at="layer4.0")
    assert "\n" not in str(err.value)
    capsys.readouterr()
    code = cli.main(["explain", "--model", str(model_dir), "--dataset", DATASET, "--out", str(tmp_path / "o3"),
                     "--method", "glance", "--at", "layer4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--glance-surrogate" in err[0]
    assert methods.names("render") == ("mirror", "glance")
