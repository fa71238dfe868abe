"""The generator distilled from a classifier and its surrogate, the rendered intervention strips, the loader of
``fgvce train-surrogate``'s artefacts and the global model's metrics (fgvce_jax.glance; docs/glance_generator.md).

A stand-in classifier keeps compilation short: z = relu(x @ P) per pixel (N, 4, 4, 16), logits = mean_hw(z) @ W + b.
"""
import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax.errors import FgvceError
from fgvce_jax.glance import causal, distil, explain, fit, metrics, surrogate
from fgvce_jax.glance.generator import render, to_classifier_space

SIZE, CLASSES, LATENT = 4, 3, 16
TINY = distil.DistilConfig(steps=5, batch_size=4, w_dim=8, mapping_layers=1, channel_base=32, channel_max=8,
                           save_every=2)
MEAN, STD = np.array([0.5, 0.4, 0.3], np.float32), np.array([0.2, 0.25, 0.3], np.float32)


@dataclasses.dataclass(frozen=True)
class PixelSplit:
    """Stand-in for a SplitModel at a GAP + linear split (hashable; params first)."""

    def encode(self, params, images):
        return jax.nn.relu(images @ params["P"]), {}

    def logits(self, params, images):
        return self.encode(params, images)[0].mean((1, 2)) @ params["W"] + params["b"]

    def linear_head(self, params):
        return params["W"], params["b"]


def classifier(seed=0):
    rng = np.random.default_rng(seed)
    return PixelSplit(), {"P": jnp.asarray(rng.normal(size=(3, LATENT)), jnp.float32),
                          "W": jnp.asarray(rng.normal(size=(LATENT, CLASSES)), jnp.float32),
                          "b": jnp.zeros(CLASSES, jnp.float32)}


def images(n, seed=1):
    """(n, 4, 4, 3) images in the classifier's input space: blobs whose colour varies per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    blob = np.exp(-((yy - 1.5) ** 2 + (xx - 1.5) ** 2) / 2.0)[None, :, :, None]
    unit = np.clip(blob * rng.uniform(0, 1, (n, 1, 1, 3)) + rng.uniform(0, 0.1, (n, SIZE, SIZE, 3)), 0, 1)
    return ((unit - MEAN) / STD).astype(np.float32)


def setting(n=16):
    split_model, params = classifier()
    real = images(n)
    h = np.asarray(split_model.encode(params, jnp.asarray(real))[0].mean((1, 2)))
    model = surrogate.Surrogate(LATENT, 2, 2, 16, key=jax.random.key(1))
    return split_model, params, model, real, h, np.asarray(model.encode(jnp.asarray(h)))


def test_latent_losses_by_hand():
    """||h(x_g) - D(c)||^2 / D and ||E(h(x_g)) - c||^2 / P on G's images in [-1, 1], against numpy."""
    split_model, params, model, real, _, c = setting(4)
    g_images = np.tanh(np.random.default_rng(2).normal(size=(4, SIZE, SIZE, 3))).astype(np.float32)
    latent, concept = distil.latent_losses(jnp.asarray(g_images), jnp.asarray(c), split_model, params, model, MEAN, STD)
    x = ((g_images + 1) / 2 - MEAN) / STD
    h = np.maximum(x @ np.asarray(params["P"]), 0).mean((1, 2))
    np.testing.assert_allclose(latent, np.mean((h - np.asarray(model.decode(jnp.asarray(c)))) ** 2), rtol=1e-4)
    np.testing.assert_allclose(concept, np.mean((np.asarray(model.encode(jnp.asarray(h))) - c) ** 2), rtol=1e-4)


def test_generator_resume_gives_the_same_weights_and_refuses_another_classifier(tmp_path):
    """Killed after step 3 of 5 (checkpoints every 2 steps and after the last: it resumes from step 2) and run
    again: G's weights and the per-step losses equal those of an uninterrupted run bit for bit; load_generator
    gives the same weights; another classifier's fingerprint is one line naming both, on resume and load."""
    split_model, params, model, real, _, c = setting()

    def run(out, on_step=None, fingerprint="w"):
        return distil.train_generator(split_model, params, model, real, c, MEAN, STD, jax.random.key(4), out,
                                      fingerprint=fingerprint, config=TINY, on_step=on_step)

    whole = run(tmp_path / "whole")

    def kill(step, _):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", kill)
    resumed = run(tmp_path / "cut")
    loaded = distil.load_generator(tmp_path / "cut", "w")
    for a, b, d in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, d)
    assert resumed.history == whole.history and len(whole.history) == 5
    assert all(np.isfinite(list(m.values())).all() and m["g_extra"] > 0 for m in whole.history)
    assert loaded.config == whole.config and loaded.config.image_size == SIZE
    for call in (lambda: distil.load_generator(tmp_path / "cut", "other"), lambda: run(tmp_path / "cut", None, "other")):
        with pytest.raises(FgvceError, match="another classifier") as e:
            call()
        assert "\n" not in str(e.value) and "weights w," in str(e.value) and "other" in str(e.value)
    with pytest.raises(FgvceError, match="holds no generator"):
        distil.load_generator(tmp_path / "absent", "w")


@pytest.mark.parametrize("kw, words", [
    (dict(steps=0), "steps must be >= 1"),
    (dict(batch_size=6), "multiple of 4"),
    (dict(batch_size=64), "exceeds the 16 training images"),
])
def test_bad_generator_training_input_is_one_line(kw, words, tmp_path):
    split_model, params, model, real, _, c = setting()
    with pytest.raises(FgvceError, match=words) as e:
        distil.train_generator(split_model, params, model, real, c, MEAN, STD, jax.random.key(0), tmp_path,
                               fingerprint="w", config=dataclasses.replace(TINY, **kw))
    assert "\n" not in str(e.value)


def test_strips_by_hand_and_no_recompilation():
    """Strips of 2 queries, 4 concepts, 3 shifts with an untrained tiny G: (N, P, M, S, S, C) images; the zero
    shift renders E(h) (the same frame for every concept, G's noise shared); p_y through g(D(.)) and through the
    classifier on the frames equal hand computations; the frames move with the shift; a second call with new
    latents does not recompile."""
    from fgvce_jax.glance import gan

    split_model, params, model, real, h, _ = setting(4)
    g_config, d_config, gan_config = TINY.networks(4, SIZE, 3)
    setup, state = gan.init(g_config, d_config, gan_config, jax.random.key(0))
    g = distil.Distilled(setup.g_graph, state.g, g_config, MEAN, STD, [])
    effects = np.diag([1.0, 0.5, 2.0, 1.0]).astype(np.float32)
    effects[0, 1] = 0.7  # concept 0 -> concept 1 in the structural model
    head, y, deltas = split_model.linear_head(params), np.array([0, 2]), (-1.0, 0.0, 2.0)
    out = explain.strips(model, head, effects, g, split_model, params, h[:2], y, jax.random.key(7), deltas)
    assert out["images"].shape == (2, 4, 3, SIZE, SIZE, 3) and out["p_y_surrogate"].shape == (2, 4, 3)
    frames = out["images"]
    for j in range(1, 4):
        np.testing.assert_allclose(frames[:, j, 1], frames[:, 0, 1], atol=1e-6)
    assert np.abs(frames[:, :, 2] - frames[:, :, 1]).max() > 1e-3
    c = np.asarray(model.encode(jnp.asarray(h[:2])))
    shifted = c[:, None, None] + np.asarray(deltas)[None, None, :, None] * effects[None, :, None, :]  # (2, 4, 3, 4)
    p_sur = np.asarray(jax.nn.softmax(surrogate.head_logits(head, model.decode(jnp.asarray(shifted)))))
    np.testing.assert_allclose(out["p_y_surrogate"], np.take_along_axis(p_sur, y[:, None, None, None], -1)[..., 0],
                               atol=1e-5)
    one = render(g.graph, g.params, jnp.asarray(shifted[1, 0, 2][None]), jax.random.key(7))
    np.testing.assert_allclose(frames[1, 0, 2], np.asarray(to_classifier_space(jnp.clip(one, -1, 1), MEAN, STD))[0],
                               atol=1e-5)  # the valid pixels it is shown as
    p_cls = np.asarray(jax.nn.softmax(split_model.logits(params, jnp.asarray(frames.reshape(-1, SIZE, SIZE, 3)))))
    np.testing.assert_allclose(out["p_y_classifier"], np.take_along_axis(p_cls.reshape(2, 4, 3, CLASSES),
                                                                         y[:, None, None, None], -1)[..., 0], atol=1e-5)
    before = explain._strips._cache_size()
    explain.strips(model, head, effects, g, split_model, params, h[2:4], y, jax.random.key(8), deltas)
    assert explain._strips._cache_size() == before


class TinySet:
    """Stand-in for a Dataset: 64 images of 4 px, the classifier's normalisation."""

    def __init__(self, n=64):
        self.pixels = images(n, seed=5)
        self.preprocessing = SimpleNamespace(image_size=SIZE, mean=tuple(MEAN), std=tuple(STD))

    def __len__(self):
        return len(self.pixels)

    def images(self, idx):
        return self.pixels[np.asarray(idx)]


def test_load_reads_back_every_artefact_and_refuses_foreign_ones(tmp_path):
    """fit_global + fit_generator on a 64-image stand-in, then fit.load: the surrogate encodes as trained, the
    graph and sigma are those fitted, effects = concept_effects, the generator's weights are the trained ones;
    another classifier, a missing directory and a missing global.json are each one line; the metrics run."""
    split_model, params = classifier()
    ds = TinySet()
    u = np.random.default_rng(6).normal(size=(64, 2))
    u[:, 1] += ds.pixels.mean((1, 2, 3))  # one feature the images carry
    g = fit.fit_global(split_model, params, ds, u, ("a", "b"), tmp_path, key=jax.random.key(0),
                       prediction_classes=[0], config=surrogate.SurrogateConfig(n_free=2, hidden=16, epochs=2,
                                                                                batch_size=32))
    trained = fit.fit_generator(split_model, params, ds, g, tmp_path, key=jax.random.key(1), config=TINY)
    loaded = fit.load(tmp_path, split_model, params)
    np.testing.assert_array_equal(loaded.fitted.model.encode(jnp.asarray(g.h)), g.fitted.model.encode(jnp.asarray(g.h)))
    assert loaded.graph.nodes == ("a", "b", "free0", "free1", "y_hat") == g.graph.nodes
    assert loaded.graph.directed == g.graph.directed and loaded.graph.undirected == g.graph.undirected
    np.testing.assert_allclose(loaded.graph.weights, g.graph.weights)
    np.testing.assert_allclose(loaded.sigma, g.sigma)
    np.testing.assert_allclose(loaded.effects, explain.concept_effects(g.graph, g.sigma))
    assert loaded.prediction_classes == (0,)
    for a, b in zip(jax.tree.leaves(loaded.generator.params), jax.tree.leaves(trained.params)):
        np.testing.assert_array_equal(a, b)
    other = {**params, "b": params["b"] + 1.0}
    for out, p, words in ((tmp_path, other, "another classifier"), (tmp_path / "absent", params, "holds no surrogate")):
        with pytest.raises(FgvceError, match=words) as e:
            fit.load(out, split_model, p)
        assert "\n" not in str(e.value)
    (tmp_path / fit.GLOBAL_FILE).unlink()
    with pytest.raises(FgvceError, match="no global.json"):
        fit.load(tmp_path, split_model, params)
    m = metrics.generator_metrics(loaded, split_model, params, ds.pixels[:16], jax.random.key(2), u[:16])
    assert set(m) == {"surrogate_agreement", "concept_r2", "generator_agreement", "fd_classifier"}
    assert 0 <= m["surrogate_agreement"] <= 1 and 0 <= m["generator_agreement"] <= 1 and m["fd_classifier"] > 0
    assert set(m["concept_r2"]) == {"a", "b"}


def test_concept_r2_closed_form():
    """c = u: R^2 = 1; c = u / 2: 1 - 1/4; c = 0 on centred u: 0; c = -u: -3; bad shapes and a constant u."""
    u = np.random.default_rng(0).normal(size=(50, 3))
    u = (u - u.mean(0)) / u.std(0)
    np.testing.assert_allclose(metrics.concept_r2(u, u), 1.0)
    np.testing.assert_allclose(metrics.concept_r2(u / 2, u), 0.75)
    np.testing.assert_allclose(metrics.concept_r2(np.zeros_like(u), u), 0.0, atol=1e-12)
    np.testing.assert_allclose(metrics.concept_r2(-u, u), -3.0)
    with pytest.raises(FgvceError, match="same shape"):
        metrics.concept_r2(u[:, :2], u)
    with pytest.raises(FgvceError, match="column 1 is constant"):
        metrics.concept_r2(u[:, :2], np.stack([u[:, 0], np.ones(50)], 1))


def test_surrogate_agreement_counts_argmax_matches():
    """An identity-like surrogate agrees everywhere; one whose decoder flips the latent disagrees where the
    flip changes the argmax (counted by hand)."""
    class Flip:
        def __init__(self, sign):
            self.sign = sign

        def encode(self, h):
            return h

        def decode(self, c):
            return self.sign * c

    h = np.random.default_rng(1).normal(size=(40, 4)).astype(np.float32)
    head = (jnp.eye(4)[:, :3], jnp.asarray([0.0, 0.0, 0.5]))
    assert metrics.surrogate_agreement(Flip(1.0), head, h) == 1.0
    logits = h[:, :3] + np.array([0, 0, 0.5])
    want = np.mean(np.argmax(-h[:, :3] + np.array([0, 0, 0.5]), 1) == np.argmax(logits, 1))
    assert metrics.surrogate_agreement(Flip(-1.0), head, h) == pytest.approx(want) and want < 0.5


def graph(nodes, directed=(), undirected=()):
    idx = {n: k for k, n in enumerate(nodes)}
    return causal.Graph(tuple(nodes), tuple((idx[a], idx[b]) for a, b in directed),
                        tuple(tuple(sorted((idx[a], idx[b]))) for a, b in undirected), np.zeros((len(nodes),) * 2),
                        np.ones(len(nodes)))


def test_structural_hamming_distance_on_hand_made_graphs():
    """Truth x -> y -> z. Found: y -> x (reversed, 1), y - z (unoriented, 1), x -> z (extra, 1), plus an edge to
    a node outside the truth (ignored): 3. Identical: 0. Empty: 2 (both edges missing). Node order does not
    matter; a truth node missing from the found graph is one line."""
    truth = graph(("x", "y", "z"), [("x", "y"), ("y", "z")])
    found = graph(("z", "w", "y", "x"), [("y", "x"), ("x", "z"), ("w", "z")], [("y", "z")])
    assert metrics.structural_hamming_distance(found, truth) == 3
    assert metrics.structural_hamming_distance(graph(("z", "y", "x"), [("x", "y"), ("y", "z")]), truth) == 0
    assert metrics.structural_hamming_distance(graph(("x", "y", "z")), truth) == 2
    with pytest.raises(FgvceError, match="no node z"):
        metrics.structural_hamming_distance(graph(("x", "y")), truth)


def test_morpho_truth_against_the_documented_test_bed_graphs():
    """The true morpho-digits graphs: on the shortcut twin thickness -> intensity and slant -> y_hat; the
    documented recovered shortcut graph (docs/glance.md: intensity -> thickness, slant -> y_hat) is at SHD 1
    (the reversal), the clean one (thickness -> intensity, slant - y_hat absent) at 0."""
    shortcut, clean = metrics.morpho_truth(True), metrics.morpho_truth(False)
    assert shortcut.has_edge("thickness", "intensity") and shortcut.has_edge("slant", "y_hat")
    assert not clean.has_edge("slant", "y_hat") and metrics.structural_hamming_distance(clean, shortcut) == 1
    nodes = ("thickness", "slant", "width", "height", "area", "intensity", "free0", "y_hat")
    found_shortcut = graph(nodes, [("intensity", "thickness"), ("slant", "y_hat"), ("area", "y_hat"),
                                   ("free0", "slant")])
    found_clean = graph(nodes, [("thickness", "intensity"), ("area", "y_hat"), ("free0", "y_hat")],
                        [("slant", "free0")])
    assert metrics.structural_hamming_distance(found_shortcut, shortcut) == 1
    assert metrics.structural_hamming_distance(found_clean, clean) == 0
