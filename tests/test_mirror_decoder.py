"""Mirror-CFE's decoder, its training, the per-query decode and the metrics (issue 12).

The default tests use resnet_tiny (32 px digits) with random weights and a random non-zero fc bias (no
classifier training: cheap), and decoders of width 8 trained for a handful of steps. The slow tests train the
classifier briefly (2 epochs on the digits) and the decoder for a few hundred steps."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fgvce_jax import data, models
from fgvce_jax.errors import FgvceError
from fgvce_jax.mirror import decoder as dec
from fgvce_jax.mirror import explain as mx
from fgvce_jax.mirror import geometry as geo
from fgvce_jax.mirror import metrics as mm
from fgvce_jax.mirror import pairs
from fgvce_jax.mirror import train as mt

TINY = dec.DecoderConfig(width=8)


@pytest.fixture(scope="module")
def tiny():
    """(split model at layer4, params, images (8, 32, 32, 3) of the digits test split, labels)."""
    model = models.create("resnet_tiny", 10, seed=0)
    model.fc.bias[...] = 0.3 * jax.random.normal(jax.random.key(1), model.fc.bias.shape)
    split_model, params = models.split(model, at="layer4")
    test = data.load("digits", "test")
    return split_model, params, jnp.asarray(test.images(np.arange(8))), test.labels[:8]


def test_source_stages_end_at_the_models_features(tiny):
    split_model, params, x, _ = tiny
    z, skips = dec.source_stages(split_model, params, x)
    np.testing.assert_array_equal(z, split_model.encode(params, x)[0])
    assert [e.shape for e in skips] == [(8, 32, 32, 16), (8, 16, 16, 32), (8, 8, 8, 64)]
    with pytest.raises(FgvceError, match="needs a ResNet split at 'layer4'"):
        dec.source_stages(*models.split(models.create("resnet_tiny", 10), at="layer4.0"), x)


def test_decoder_forward_shapes_and_edits_only_inside_the_mask(tiny):
    split_model, params, x, _ = tiny
    g = dec.build(split_model, params, 32, TINY)
    z, skips = dec.source_stages(split_model, params, x)
    inside = jnp.zeros((8, 8, 8), bool).at[:, :4].set(True)
    run = nnx.jit(lambda module, mask: module(z, skips, mask))
    out = run(g, inside)
    assert out.shape == (8, 32, 32, 3) and bool(jnp.all(jnp.isfinite(out)))
    # the editor's last layer only matters through the mask: with an empty mask it has no effect
    changed = nnx.clone(g)
    changed.edit_out[-1].bias[...] = changed.edit_out[-1].bias[...] + 1.0  # the layer1 skip's editor
    empty = jnp.zeros_like(inside)
    np.testing.assert_array_equal(run(changed, empty), run(g, empty))
    assert float(jnp.abs(run(changed, inside) - out).max()) > 1e-3


def test_csp_mask_on_a_constructed_cam():
    # D = 2, C = 3: class 0 reads channel 0, class 1 channel 1; Z puts a ramp on channel 0 and a spot on 1
    W = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    ramp = jnp.tile(jnp.linspace(-1.0, 1.0, 5)[None, :], (4, 1))  # U_0 after ReLU: 0, 0, 0, .5, 1 per row
    spot = jnp.zeros((4, 5)).at[0, 0].set(2.0)
    z = jnp.stack([ramp, spot], -1)[None].repeat(3, 0)  # (3, 4, 5, 2)
    s, t = jnp.array([0, 0, 0]), jnp.array([1, 1, 1])
    k = jnp.array([0.0, 0.6, 1.0])  # rho = clip(1 - k, 0.2, 0.8) = 0.8, 0.4, 0.2
    m = np.asarray(dec.csp_mask(W, z, s, t, k, dec.DecoderConfig()))
    want_high = np.zeros((4, 5), bool)
    want_high[:, 4] = True  # U_0 = 1 > 0.8
    want_high[0, 0] = True  # the spot of class 1, max-normalised to 1
    want_low = want_high.copy()
    want_low[:, 3] = True  # U_0 = 0.5 > 0.4 (and > 0.2)
    np.testing.assert_array_equal(m[0], want_high)
    np.testing.assert_array_equal(m[1], want_low)
    np.testing.assert_array_equal(m[2], want_low)
    assert bool(dec.csp_mask(W, z, s, t, k, dataclasses.replace(TINY, prior=False)).all())
    # an all-zero CAM gives an empty mask, not NaNs
    assert not bool(dec.csp_mask(W, jnp.zeros_like(z), s, t, k, dec.DecoderConfig()).any())
    # resized to a skip's resolution by nearest neighbour: every cell becomes a 2 x 2 block
    big = np.asarray(dec.resize_mask(jnp.asarray(m[:1]), (8, 10)))
    np.testing.assert_array_equal(big[0], np.kron(m[0], np.ones((2, 2))))


# --------------------------------------------------------------------------- training
TINY_LOSS = mt.LossConfig(lr=2e-3)  # a larger rate than the paper's 2e-4, so that a few steps show progress
TINY_TRAIN = mt.DecoderTrainConfig(steps=24, batch_size=8, decoder=TINY, loss=TINY_LOSS, save_every=4)
REC_L1_SHORT = 0.6  # mean |x - G(f(x))| in normalised units after TINY_TRAIN's 24 steps (about 0.79 at start)


@pytest.fixture(scope="module")
def train_subset():
    return data.load("digits", "train").subset(np.arange(64))


@pytest.fixture(scope="module")
def trained(tiny, train_subset, tmp_path_factory):
    """(out dir, weights, summary) of TINY_TRAIN on 64 training digits for the random-weight classifier."""
    split_model, params, _, _ = tiny
    out = tmp_path_factory.mktemp("decoder")
    weights, summary = mt.train_decoder(split_model, params, train_subset, TINY_TRAIN, out)
    return out, weights, summary


def _reconstruction_l1(split_model, params, g_def, weights, x):
    """mean |x - G(f(x))| (k = 0, s = t irrelevant for the masks at k = 0 beyond the prior)."""
    W, _ = geo.linear_head(split_model, params)
    z, skips = dec.source_stages(split_model, params, x)
    s = jnp.argmax(split_model.head(params, z), -1)
    return float(jnp.abs(x - dec.decode(g_def, weights, TINY, W, z, skips, s, (s + 1) % 10, jnp.zeros(len(x))))
                 .mean())


def test_short_training_lowers_the_reconstruction_error(tiny, train_subset, trained):
    split_model, params, _, _ = tiny
    out, weights, summary = trained
    x = jnp.asarray(train_subset.images(np.arange(32)))
    g_def, fresh = nnx.split(dec.build(split_model, params, 32, TINY))
    before = _reconstruction_l1(split_model, params, g_def, nnx.to_pure_dict(fresh), x)
    after = _reconstruction_l1(split_model, params, g_def, weights, x)
    assert before > 0.7 and after < REC_L1_SHORT, (before, after)
    assert summary["steps"] == 24 and set(summary["last"]) == {"cls", "rec", "feat", "adv", "tri", "disc"}
    assert (out / mt.INFO_FILE).is_file() and (out / mt.DECODER_DIR).is_dir()


def test_resume_after_interruption_gives_the_same_weights(tiny, train_subset, tmp_path, capsys):
    split_model, params, _, _ = tiny
    cfg = dataclasses.replace(TINY_TRAIN, steps=4, save_every=2)
    straight, _ = mt.train_decoder(split_model, params, train_subset, cfg, tmp_path / "a")

    def stop_at_3(step, _):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mt.train_decoder(split_model, params, train_subset, cfg, tmp_path / "b", on_step=stop_at_3)
    assert not (tmp_path / "b" / mt.INFO_FILE).exists()
    capsys.readouterr()
    resumed, _ = mt.train_decoder(split_model, params, train_subset, cfg, tmp_path / "b")
    assert "resuming from step 2/4" in capsys.readouterr().err
    leaves_a, leaves_b = jax.tree.leaves(straight), jax.tree.leaves(resumed)
    assert len(leaves_a) == len(leaves_b) > 0
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(a, b)
    fresh = nnx.to_pure_dict(nnx.split(dec.build(split_model, params, 32, TINY))[1])
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh), leaves_a))  # it did train
    with pytest.raises(FgvceError, match="another configuration or classifier"):
        mt.train_decoder(split_model, params, train_subset, dataclasses.replace(cfg, seed=1), tmp_path / "b")


def test_triangulation_is_zero_exactly_for_distances_proportional_at_the_data_scale():
    z0, z1 = jnp.zeros((2, 2, 2, 4)), jnp.ones((2, 2, 2, 4))  # d(Z_0, Z_1) = 1
    x0, x1 = jnp.zeros((2, 4, 4, 3)), 3 * jnp.ones((2, 4, 4, 3))  # d(x_0, x_1) = 3
    k = jnp.array([0.25, 0.5])[:, None, None, None]
    zk, xk = z0 + k * (z1 - z0), x0 + k * (x1 - x0)
    assert float(mt.triangulation(x0, xk, x1, z0, zk, z1, jnp.float32(3.0))) < 1e-8
    assert float(mt.triangulation(x0, xk, x1, z0, zk, z1, jnp.float32(2.0))) > 0.1  # right shape, wrong scale
    off = xk.at[:, 0].add(1.0)
    assert float(mt.triangulation(x0, off, x1, z0, zk, z1, jnp.float32(3.0))) > 1e-2
    # copying the source along the path is not free: all image sides 0 against lambda (k^2 + (1-k)^2 + 1)
    copy = float(mt.triangulation(x0, x0, x0, z0, zk, z1, jnp.float32(3.0)))
    assert copy == pytest.approx(np.mean([0.25 ** 2 + 0.75 ** 2 + 1, 0.5 ** 2 + 0.5 ** 2 + 1]), rel=1e-4)
    # lambda from neighbouring (cyclic) pairs: image gaps 2, 1, 1 against feature gaps 4, 2, 2
    ramp = jnp.arange(3.0)[:, None, None, None]
    assert float(mt.pair_scale(ramp * jnp.ones((3, 4, 4, 3)), 2 * ramp * jnp.ones((3, 2, 2, 4)))) == \
        pytest.approx(0.5, rel=1e-5)


def test_non_gap_head_is_refused_in_one_line(tiny, train_subset, tmp_path):
    split_model, params = models.split(models.create("resnet_tiny", 10), at="layer4.0")
    with pytest.raises(FgvceError, match="needs a GAP \\+ linear head") as err:
        mt.train_decoder(split_model, params, train_subset, TINY_TRAIN, tmp_path)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- the per-query decode
def test_decoder_for_another_model_or_missing_is_refused(tiny, trained, tmp_path):
    split_model, params, _, _ = tiny
    out, _, _ = trained
    other = models.split(models.create("resnet_tiny", 10, seed=5), at="layer4")[1]
    with pytest.raises(FgvceError, match="trained for other classifier weights") as err:
        mx.load_decoder(out, split_model, other)
    assert "\n" not in str(err.value)
    with pytest.raises(FgvceError, match="holds no trained decoder"):
        mx.load_decoder(tmp_path / "nothing", split_model, params)
    loaded = mx.load_decoder(out, split_model, params)
    assert loaded.config == TINY
    for a, b in zip(jax.tree.leaves(loaded.weights), jax.tree.leaves(trained[1])):
        np.testing.assert_array_equal(a, b)


def test_explain_decodes_the_path_in_one_compiled_call(tiny, trained):
    split_model, params, x, y = tiny
    decoder = mx.load_decoder(trained[0], split_model, params)
    s = np.asarray(split_model.logits(params, x).argmax(-1))
    t = np.where(y == s, (s + 1) % 10, y)
    first = mx.explain(split_model, params, decoder, x[:4], s[:4], t[:4])
    size = mx.decode_paths._cache_size()
    second = mx.explain(split_model, params, decoder, x[4:], s[4:], t[4:])
    assert mx.decode_paths._cache_size() == size  # a second batch does not recompile
    K = len(geo.DEFAULT_KS)
    assert first.images.shape == (4, K, 32, 32, 3) and first.p_t.shape == (4, K)
    for e in (first, second):
        assert np.all((e.p_t >= 0) & (e.p_t <= 1))
        np.testing.assert_array_equal(e.success, e.reason == mx.FLIPPED)
        np.testing.assert_array_equal(e.success, ~np.isnan(e.k_first))
    # the images are those of the decoder at each k: the end of the path decoded directly
    W, b = geo.linear_head(split_model, params)
    z, skips = dec.source_stages(split_model, params, x[:4])
    end = geo.path_batch(W, b, z, jnp.asarray(s[:4]), jnp.asarray(t[:4]), jnp.ones(1)).z[:, 0]
    direct = dec.decode(decoder.graphdef, decoder.weights, TINY, W, end, skips, jnp.asarray(s[:4]),
                        jnp.asarray(t[:4]), jnp.ones(4))
    np.testing.assert_allclose(first.images[:, -1], direct, atol=1e-4)
    with pytest.raises(FgvceError, match="source and target are both"):
        mx.explain(split_model, params, decoder, x[:1], s[:1], s[:1])


def test_decoder_figures_measure_every_partner_query_in_chunks(tiny, trained):
    split_model, params, _, _ = tiny
    decoder = mx.load_decoder(trained[0], split_model, params)
    dataset = data.load("digits", "test").subset(np.arange(30))
    pred = np.asarray(split_model.logits(params, jnp.asarray(dataset.images(np.arange(30)))).argmax(-1))
    a = int(np.bincount(pred).argmax())  # the random classifier's most frequent class
    b = int(np.setdiff1d(np.arange(10), pred)[0])  # a class it assigns to none of them
    pair = ((a, b), (b, a))
    x, s, t = pairs.partner_queries(split_model, params, dataset, pair)
    assert len(t) == np.sum(pred == a) >= 2 and np.all(s == a) and np.all(t == b)
    whole = mx.explain(split_model, params, decoder, x, s, t)
    chunked = pairs.explain_in_chunks(split_model, params, decoder, x, s, t, chunk=3)
    np.testing.assert_allclose(chunked.images, whole.images, atol=1e-5)  # the chunk size changes nothing
    np.testing.assert_allclose(chunked.p_t, whole.p_t, atol=1e-6)
    np.testing.assert_array_equal(chunked.reason, whole.reason)
    fig = pairs.decoder_figures(split_model, params, decoder, dataset, pair, real=30, rec_images=8)
    pre = dataset.preprocessing
    assert fig["queries"] == len(t)
    assert fig["validity_k1"] == pytest.approx(np.mean(whole.pred[:, -1] == t))
    assert fig["success"] == pytest.approx(whole.success.mean())
    l1 = float(mm.l1(whole.images[:, -1], x, pre.mean, pre.std).mean())
    assert fig["L1_pixels"] == pytest.approx(l1, rel=1e-5)
    assert all(0 <= fig[k] <= 1 for k in ("p_t_spearman_above_half", "p_t_rising", "D_Val"))
    first8 = jnp.asarray(dataset.images(np.arange(8)))
    rec = _reconstruction_l1(split_model, params, decoder.graphdef, decoder.weights, first8)
    assert fig["rec_l1"] == pytest.approx(rec, rel=1e-5) and fig["FD_classifier"] >= 0
    with pytest.raises(FgvceError, match="no image of"):
        pairs.decoder_figures(split_model, params, decoder, dataset, ((b, a),))


def test_first_flip_on_constructed_curves():
    ks = np.asarray(geo.DEFAULT_KS)  # 21 points, index 10 is k = 0.5
    t = np.array([3, 3, 3, 3])
    pred = np.full((4, 21), 5)
    pred[0, 13:] = 3  # flips at k = 0.65
    pred[1, 4:] = 3  # t from k = 0.2: the first counterfactual is still counted from k = 0.5
    pred[2, 2:6] = 3  # only before the boundary
    pred[3, 12] = 3  # flips at 0.6 then back: still the first at 0.6
    k_first, success, reason = mx.first_flip(pred, t, ks)
    np.testing.assert_allclose(k_first[[0, 1, 3]], [0.65, 0.5, 0.6])
    assert np.isnan(k_first[2])
    np.testing.assert_array_equal(success, [True, True, False, True])
    np.testing.assert_array_equal(reason, [mx.FLIPPED, mx.FLIPPED, mx.T_ONLY_BELOW_HALF, mx.FLIPPED])
    _, success, reason = mx.first_flip(np.full((1, 21), 5), np.array([3]), ks)
    assert not success[0] and reason[0] == mx.NEVER_T


# --------------------------------------------------------------------------- metrics
def test_frechet_distance_against_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    # diagonal covariances: tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(a) - sqrt(b))^2
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert mm.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    # non-commuting: S1 = c I, S2 = Q diag(e) Q^T: (S1 S2)^1/2 = sqrt(c) S2^1/2, trace sqrt(c) sum sqrt(e)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    e = rng.uniform(0.1, 3, 5)
    s2 = q @ np.diag(e) @ q.T
    want = 5 * 2.0 + e.sum() - 2 * np.sqrt(2.0) * np.sqrt(e).sum()
    assert mm.frechet_distance(np.zeros(5), 2 * np.eye(5), np.zeros(5), s2) == pytest.approx(want, rel=1e-8)
    assert mm.frechet_distance(mu1, s2, mu1, s2) == pytest.approx(0, abs=1e-8)
    # rank-deficient covariances (fewer images than dimensions) stay finite and real
    f = rng.normal(size=(3, 6))
    assert np.isfinite(mm.frechet_distance(*mm.gaussian_fit(f), *mm.gaussian_fit(f + 1.0)))


def test_blur_matches_scipy_and_d_val_uses_it(tiny):
    import scipy.ndimage

    split_model, params, x, _ = tiny
    want = scipy.ndimage.gaussian_filter(np.asarray(x), sigma=(0, 1, 1, 0), mode="nearest", truncate=3.0)
    np.testing.assert_allclose(mm.blur(x), want, atol=1e-5)
    assert float(jnp.abs(mm.blur(x) - x).max()) > 0.1
    pred_blurred = np.asarray(split_model.logits(params, mm.blur(x)).argmax(-1))
    for t in (pred_blurred, (pred_blurred + 1) % 10):
        assert mm.d_val(split_model, params, x, t) == pytest.approx(np.mean(pred_blurred == t))
    assert mm.d_val(split_model, params, x, pred_blurred) == 1.0


def test_l1_and_lpips_in_pixel_units(tiny):
    _, _, x, _ = tiny
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    shifted = x + 0.4  # 0.1 in [0, 1] units where nothing is clipped
    u = mm.to_unit(x, mean, std)
    inner = (u > 0) & (u < 0.9)
    got = mm.l1(shifted, x, mean, std)
    assert got.shape == (8,) and np.all(got <= 0.1 + 1e-6) and np.all(got >= 0.1 * inner.mean((1, 2, 3)) - 1e-6)
    d = mm.lpips(shifted, x, mean, std)
    assert d.shape == (8,) and np.all(d > 0) and np.all(mm.lpips(x, x, mean, std) < 1e-6)


# --------------------------------------------------------------------------- slow: a trained classifier
SLOW_TRAIN = mt.DecoderTrainConfig(steps=600, batch_size=16, decoder=dec.DecoderConfig(width=16),
                                   loss=mt.LossConfig(lr=1e-3), save_every=100)  # the default weights
REC_L1_SLOW = 0.25  # mean |x - G(f(x))| in normalised units on 64 test digits; measured 0.11 to 0.12
VALIDITY_MARGIN = 0.2  # full decoder's validity at k = 1 >= the ablation's + this (the "clearly above");
# measured over 351 queries: 0.52 vs 0.62 in this test's run, 0.52 vs 0.49 mean over 4 seeds (docs/mirror.md)
RISING_SHARE = 0.75  # share of queries whose p_t(k) has Spearman > 0.5 with k must exceed this


def mirror_figures(split_model, params, train_set, test_set, config, out):
    """Train a decoder with ``config`` and measure it on every pair query of the test split (351 for the slow
    tests' classifier): ``pairs.decoder_figures`` and the run's training "steps_per_s"."""
    _, summary = mt.train_decoder(split_model, params, train_set, config, out)
    decoder = mx.load_decoder(out, split_model, params)
    return {**pairs.decoder_figures(split_model, params, decoder, test_set), "steps_per_s": summary["steps_per_s"]}


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    """resnet_tiny trained 2 epochs on the digits (as `fgvce train`), split at layer4."""
    from fgvce_jax.train import TrainConfig, train

    model, _, _ = train(TrainConfig(epochs=2, batch_size=64, lr=0.05), tmp_path_factory.mktemp("classifier"))
    split_model, params = models.split(model, at="layer4")
    return split_model, params, data.load("digits", "train"), data.load("digits", "test")


@pytest.mark.slow
def test_full_decoder_beats_the_ablation_at_k_1(digits_classifier, tmp_path, capsys):
    """Issue 12's acceptance on the digits (resnet_tiny at layer4, 600 decoder steps, all 351 test digits
    predicted as 3, 8, 4, 9, 5 or 6 with t the pair partner); the bar is full >= ablation + 0.2 at k = 1.

    This test FAILS: the claim does not hold on our data. Run as ``make test-slow`` runs it (4 forced host
    devices) it measured full 0.516 against the ablation's 0.624. Over decoder seeds 0-3 without XLA_FLAGS
    (``benchmarks/mirror_ablation.py``) the full decoder averages 0.52 and the ablation 0.49 at 600 steps,
    0.69 and 0.70 at 2,000 (docs/mirror.md). Reconstruction L1 0.12 (bar 0.25); p_t(k) rank-correlates
    with k (Spearman > 0.5) for 0.95 of the queries (bar: more than 0.75)."""
    split_model, params, train_set, test_set = digits_classifier
    ablation = dataclasses.replace(SLOW_TRAIN, decoder=dataclasses.replace(SLOW_TRAIN.decoder, prior=False),
                                   loss=dataclasses.replace(SLOW_TRAIN.loss, triangulation=False))
    full = mirror_figures(split_model, params, train_set, test_set, SLOW_TRAIN, tmp_path / "full")
    ablated = mirror_figures(split_model, params, train_set, test_set, ablation, tmp_path / "ablation")
    with capsys.disabled():
        print(f"\nMirror-CFE figures: full {full}\nablation (no triangulation, no prior) {ablated}")
    assert full["rec_l1"] < REC_L1_SLOW
    assert full["p_t_spearman_above_half"] > RISING_SHARE
    assert full["validity_k1"] >= ablated["validity_k1"] + VALIDITY_MARGIN


# --------------------------------------------------------------------------- the command
def test_train_decoder_command_refuses_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    from fgvce_jax import cli

    assert cli.main(["train-decoder", "--model", str(tmp_path / "none"), "--dataset", "digits", "--out",
                     str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fgvce train-decoder: error:") and "not a model checkpoint" in err and "\n" not in err


@pytest.mark.slow
def test_train_decoder_command_writes_a_loadable_decoder(tmp_path, capsys):
    from fgvce_jax import cli
    from fgvce_jax.models import checkpoint

    model = models.create("resnet_tiny", 10, seed=0)
    checkpoint.save(tmp_path / "model", model, checkpoint.ModelInfo.for_model(model, [str(c) for c in range(10)]))
    args = ["train-decoder", "--model", str(tmp_path / "model"), "--dataset", "digits", "--out",
            str(tmp_path / "dec"), "--steps", "2", "--batch-size", "8", "--width", "8", "--lr", "0.002"]
    assert cli.main(args) == 0
    assert "decoder written to" in capsys.readouterr().out
    split_model, params = models.split(model, at="layer4")
    assert mx.load_decoder(tmp_path / "dec", split_model, params).config == TINY
