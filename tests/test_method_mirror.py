"""The ``mirror`` method (Mirror-CFE, issue 12) through the pipeline, evaluate, report and the CLI.

A random-weight resnet_tiny on the embedded digits (most test images are mistakes) split at layer4, and a width-8
decoder trained for a few steps: cheap, and enough to check that what is stored is what the classifier says of
the stored images, independently of the method's own bookkeeping."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax import cli, data, evaluate, models, pipeline, report, results
from fgvce_jax.counterfactual import CounterfactualConfig, methods
from fgvce_jax.counterfactual.methods.mirror import MirrorParams
from fgvce_jax.errors import FgvceError
from fgvce_jax.mirror import decoder as dec
from fgvce_jax.mirror import geometry as geo
from fgvce_jax.mirror import metrics as mm
from fgvce_jax.mirror import train as mt

TRAIN = mt.DecoderTrainConfig(steps=8, batch_size=8, decoder=dec.DecoderConfig(width=8),
                              loss=mt.LossConfig(lr=2e-3), save_every=8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(model dir, decoder dir, explain out dir, summary) of 6 digits mistakes explained by ``mirror``."""
    root = tmp_path_factory.mktemp("mirror")
    model = models.create("resnet_tiny", 10, seed=0)
    model.fc.bias[...] = 0.3 * jax.random.normal(jax.random.key(1), model.fc.bias.shape)
    test = data.load("digits", "test")
    pre = test.preprocessing
    info = models.ModelInfo(model.arch, 10, tuple(test.class_names), pre.image_size, pre.resize_size,
                            tuple(pre.mean), tuple(pre.std))
    model_dir = models.save(root / "model", model, info)
    split_model, params = models.split(model, at="layer4")
    mt.train_decoder(split_model, params, data.load("digits", "train").subset(np.arange(32)), TRAIN,
                     root / "decoder")
    config = CounterfactualConfig(method="mirror", params=MirrorParams(decoder=str(root / "decoder")))
    (summary,) = pipeline.explain_split(model_dir, "digits", "test", root / "out", config, limit=6, shard_size=4,
                                          at="layer4")
    return model_dir, root / "decoder", root / "out", summary, (split_model, params)


def test_mirror_stores_what_the_classifier_says_of_its_renders(run):
    _, decoder_dir, out, summary, (split_model, params) = run
    assert summary.method == "mirror" and summary.queries == 6
    stored, cfg = results.load_run(out / "mirror")
    assert cfg["flow"] == "render" and cfg["params.decoder"] == str(decoder_dir)
    assert cfg["artefact"] == methods.get("mirror")(MirrorParams(str(decoder_dir))).artefact()
    a, ks = stored.arrays, np.asarray(geo.DEFAULT_KS)
    assert a["path"].shape == (6, len(ks), 32, 32, 3) and a["path"].dtype == np.uint8
    # the classifier's verdict on the stored renders is the stored one
    t = stored.true
    pred_cf = np.asarray(split_model.logits(params, jnp.asarray(a["counterfactual"]))).argmax(-1)
    np.testing.assert_array_equal(pred_cf[stored.success], t[stored.success])
    # k_first is the first k >= 0.5 whose render is assigned to t, recomputed from the stored class path
    for q in range(6):
        hits = np.flatnonzero((a["pred_path"][q] == t[q]) & (ks >= 0.5))
        assert stored.success[q] == bool(hits.size)
        if hits.size:
            assert a["k_first"][q] == pytest.approx(ks[hits[0]])
        else:
            assert np.isnan(a["k_first"][q]) and stored.table.column("reason")[q].as_py() in ("never_t",
                                                                                              "t_only_below_half")
    # k = 0.5 lies on the boundary only in feature space; the renders' p_t is a probability curve
    assert np.all((a["p_t_path"] >= 0) & (a["p_t_path"] <= 1))
    mean, std = np.asarray(cfg["preprocessing"]["mean"]), np.asarray(cfg["preprocessing"]["std"])
    np.testing.assert_allclose(a["l1"], mm.l1(a["counterfactual"], a["source"], mean, std), rtol=1e-5)
    np.testing.assert_array_equal(a["source"], data.load("digits", "test").images(stored.query_split_index))


def test_mirror_metrics_in_evaluate_and_figures_in_the_report(run, capsys):
    _, _, out, _, (split_model, params) = run
    capsys.readouterr()
    rows, _ = evaluate.evaluate_directory(out, use_rise=False, parts=False)
    # 6 counterfactuals in resnet_tiny's 128 feature dimensions: the distance is computed, with a notice
    assert re.search(r"FD-classifier from \d+ real and 6 counterfactual images in 128 feature dimensions: .* "
                     r"unreliable", capsys.readouterr().err)
    (row,) = rows
    stored, _ = results.load_run(out / "mirror")
    a, ok = stored.arrays, stored.success
    assert row["method"] == "mirror" and row["validity"] == pytest.approx(ok.mean())
    assert row["d_val"] == pytest.approx(mm.d_val(split_model, params, a["counterfactual"], stored.true))
    assert row["failures"] == pytest.approx(1 - ok.mean())
    if ok.any():
        assert row["l1"] == pytest.approx(a["l1"][ok].mean()) and row["lpips"] >= 0
    assert np.isfinite(row["fd_classifier"]) and row["fd_classifier"] >= 0
    table = (out / "evaluation" / "table.md").read_text()
    assert "D.Val ↑" in table and "FD-classifier ↓" in table and "Validity ↑" in table
    page = report.write_report(out, max_queries=2).read_text()
    assert "id='m-mirror'" in page and "the path, animated" in page and "FD-classifier (lower is better)" in page
    from PIL import Image

    gifs = sorted((out / "report_files" / "mirror").glob("*.gif"))
    assert len(gifs) == 2
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == len(geo.DEFAULT_KS)


def test_mirror_refuses_bad_input_in_one_line(run, tmp_path, capsys):
    model_dir, decoder_dir, _, _, _ = run
    with pytest.raises(FgvceError, match="needs a trained decoder: pass --mirror-decoder"):
        CounterfactualConfig(method="mirror")
    bad = [(MirrorParams(str(tmp_path / "none")), "layer4", "holds no trained decoder"),
           (MirrorParams(str(decoder_dir)), "layer4.0", "GAP \\+ linear head")]
    for params, at, message in bad:
        with pytest.raises(FgvceError, match=message) as err:
            pipeline.explain_split(model_dir, "digits", "test", tmp_path / "o", CounterfactualConfig(
                method="mirror", params=params), limit=2, at=at, overwrite=True)
        assert "\n" not in str(err.value)
    other = models.create("resnet_tiny", 10, seed=7)
    other_dir = models.save(tmp_path / "other", other, models.load(model_dir)[1])
    with pytest.raises(FgvceError, match="trained for other classifier weights"):
        pipeline.explain_split(other_dir, "digits", "test", tmp_path / "o2", CounterfactualConfig(
            method="mirror", params=MirrorParams(str(decoder_dir))), limit=2, at="layer4")
    capsys.readouterr()
    code = cli.main(["explain", "--model", str(model_dir), "--dataset", "digits", "--out", str(tmp_path / "o3"),
                     "--method", "mirror", "--at", "layer4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--mirror-decoder" in err[0]


def test_demo_with_mirror_trains_the_decoder_explains_evaluates_and_writes_the_pairs(tmp_path, capsys):
    """`fgvce demo --method mirror` in a tiny configuration of the same code path (1 epoch, 4 decoder steps,
    3 mistakes): the decoder, the explanations, the evaluation table, the pairs and the report."""
    out = tmp_path / "demo"
    argv = ["demo", "--method", "mirror", "--out", str(out), "--epochs", "1", "--decoder-steps", "4", "--limit", "3"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "D.Val ↑" in printed and "pairs (source -> target: validity):" in printed
    stored, cfg = results.load_run(out / "explanations" / "mirror")
    assert len(stored.success) == 3 and cfg["params.decoder"] == str(out / "decoder")
    pairs = json.loads((out / "mirror_pairs.json").read_text())
    assert set(pairs) == {"3->8", "8->3", "4->9", "9->4", "5->6", "6->5"}
    assert all(0 <= p["validity"] <= 1 for p in pairs.values() if p["queries"])
    assert (out / "mirror_pairs.png").stat().st_size > 0 and "id='m-mirror'" in (out / "report.html").read_text()
