"""The GLANCE-style generator (a compact StyleGAN2) and its GAN training step (issue 13, docs/glance_generator.md)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fgvce_jax import data
from fgvce_jax.errors import FgvceError
from fgvce_jax.glance import gan
from fgvce_jax.glance import generator as G

TINY = dict(concept_dim=4, w_dim=16, mapping_layers=2, channel_base=64, channel_max=8)


def tiny_generator(seed=0, **kw) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(G.Generator(G.GeneratorConfig(**{**TINY, **kw}), rngs=nnx.Rngs(params=jax.random.key(seed))))


def concepts(seed, n=4):
    return jax.random.normal(jax.random.key(seed), (n, TINY["concept_dim"]))


def test_render_shapes_at_32_and_28_px_and_28_is_the_centre_of_32():
    graph32, params = tiny_generator(resolution=32)
    graph28, params28 = tiny_generator(resolution=32, image_size=28)
    c, key = concepts(1), jax.random.key(2)
    img32 = G.render(graph32, params, c, key)
    img28 = G.render(graph28, params28, c, key)
    assert img32.shape == (4, 32, 32, 3) and img28.shape == (4, 28, 28, 3)
    assert np.all(np.isfinite(img32)) and float(jnp.std(img32)) > 1e-3
    np.testing.assert_allclose(img28, img32[:, 2:30, 2:30], atol=1e-5)


@pytest.mark.parametrize("kw, words", [
    (dict(resolution=24), "4 * 2^k"),
    (dict(resolution=2), "4 * 2^k"),
    (dict(resolution=32, image_size=27), "even"),
    (dict(resolution=16, image_size=28), "at most"),
    (dict(concept_dim=0), "concept_dim"),
])
def test_bad_generator_config_is_one_line_error(kw, words):
    with pytest.raises(FgvceError, match=re.escape(words)) as err:
        G.GeneratorConfig(**{**TINY, **kw})
    assert "\n" not in str(err.value)


def test_concepts_of_the_wrong_width_are_refused():
    graph, params = tiny_generator(resolution=8)
    with pytest.raises(FgvceError, match=r"\(N, 4\)"):
        nnx.merge(graph, params)(jnp.zeros((2, 5)), jax.random.key(0))


def test_demodulated_weights_have_unit_norm_per_output_channel_and_match_the_fast_convolution():
    kw, ks, kx = jax.random.split(jax.random.key(0), 3)
    weight = jax.random.normal(kw, (3, 3, 5, 7))
    styles = jax.random.normal(ks, (4, 5)) * 3.0 + 1.0
    w2 = G.demodulate(weight, styles)  # (4, 3, 3, 5, 7)
    norms = jnp.sqrt(jnp.sum(jnp.square(w2), axis=(1, 2, 3)))
    np.testing.assert_allclose(norms, np.ones((4, 7)), atol=1e-5)
    x = jax.random.normal(kx, (4, 6, 6, 5))
    per_sample = jax.vmap(lambda xi, wi: jax.lax.conv_general_dilated(
        xi[None], wi, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))[0])(x, w2)
    np.testing.assert_allclose(G.modulated_conv(x, weight, styles, demod=True), per_sample, atol=1e-4)
    undemodulated = G.modulated_conv(x, weight, styles, demod=False)
    assert float(jnp.max(jnp.abs(undemodulated - per_sample))) > 1e-2


def test_r1_penalty_equals_the_closed_form():
    a = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    x = jax.random.normal(jax.random.key(1), (5, 3, 4, 4, 2))
    linear = lambda imgs: jnp.sum(imgs * a, axis=(1, 2, 3, 4))  # D(x) = <a, x>: ||grad||^2 = ||a||^2
    np.testing.assert_allclose(gan.r1_penalty(linear, x, gamma=3.0), 1.5 * jnp.sum(a * a), rtol=1e-5)
    quadratic = lambda imgs: jnp.sum(imgs ** 2, axis=(1, 2, 3, 4))  # grad = 2x
    expected = 0.5 * 3.0 * jnp.mean(jnp.sum((2 * x) ** 2, axis=(1, 2, 3, 4)))
    np.testing.assert_allclose(gan.r1_penalty(quadratic, x, gamma=3.0), expected, rtol=1e-5)


def test_noise_changes_the_images_only_through_the_key():
    graph, params = tiny_generator(resolution=8)
    c = concepts(1)
    k1, k2 = jax.random.key(5), jax.random.key(6)
    # noise strengths start at 0: the key has no effect yet
    np.testing.assert_array_equal(G.render(graph, params, c, k1), G.render(graph, params, c, k2))
    noisy = jax.tree.map_with_path(
        lambda path, v: jnp.full_like(v, 0.5) if "noise_strength" in jax.tree_util.keystr(path) else v, params)
    same_a, same_b = G.render(graph, noisy, c, k1), G.render(graph, noisy, c, jax.random.key(5))
    np.testing.assert_array_equal(same_a, same_b)
    assert float(jnp.max(jnp.abs(same_a - G.render(graph, noisy, c, k2)))) > 1e-2


def test_second_render_with_new_concepts_does_not_recompile():
    graph, params = tiny_generator(resolution=8)
    first = G.render(graph, params, concepts(1), jax.random.key(0))
    compiled = G.render._cache_size()
    second = G.render(graph, params, concepts(2), jax.random.key(0))
    assert G.render._cache_size() == compiled
    assert float(jnp.max(jnp.abs(first - second))) > 1e-3


def tiny_gan(size, config, *, resolution=None):
    g_config = G.GeneratorConfig(**{**TINY, "concept_dim": 10}, resolution=resolution or size, image_size=size)
    d_config = gan.DiscriminatorConfig(image_size=size, channel_base=64, channel_max=8, mbstd_group=4)
    return gan.init(g_config, d_config, config, jax.random.key(0))


def test_gan_step_descends_the_extra_loss_when_the_adversarial_weight_is_zero():
    setup, state = tiny_gan(8, gan.GanConfig(adv_weight=0.0, lr=1e-2))
    c = jax.nn.one_hot(jnp.arange(8) % 10, 10)

    def extra(images, concepts_):  # each image's mean brightness, a function of its concept
        return jnp.mean((images.mean(axis=(1, 2, 3)) - concepts_ @ jnp.linspace(-0.5, 0.5, 10)) ** 2)

    step = gan.make_gan_step(setup, extra)
    real = jnp.zeros((8, 8, 8, 3))
    losses = []
    for i in range(8):
        state, m = step(state, real, c, jax.random.key(i))
        losses.append(float(m["g_extra"]))
        assert float(m["g_adv"]) > 0 and float(m["g_loss"]) == pytest.approx(losses[-1])
    assert losses[-1] < 0.5 * losses[0], losses
    assert step._cache_size() == 1  # the step's state keeps its types: no recompilation
    assert int(state.step) == 8


def test_a_tiny_training_run_on_digits_keeps_a_finite_d_loss():
    ds = data.load("digits", "train", image_size=32)
    idx = np.arange(64)
    p = ds.preprocessing
    real_all = G.from_classifier_space(jnp.asarray(ds.images(idx)), p.mean, p.std)
    assert float(real_all.min()) >= -1.0 - 1e-5 and float(real_all.max()) <= 1.0 + 1e-5
    np.testing.assert_allclose(G.to_classifier_space(real_all, p.mean, p.std), ds.images(idx), atol=1e-5)
    c_all = jax.nn.one_hot(jnp.asarray(ds.labels[idx]), 10)
    setup, state = tiny_gan(32, gan.GanConfig())
    step = gan.make_gan_step(setup)
    d_losses = []
    for i in range(30):
        rows = np.arange(8 * i, 8 * i + 8) % 64
        state, m = step(state, real_all[rows], c_all[rows], jax.random.key(i))
        d_losses.append(float(m["d_loss"]))
        assert np.isfinite([float(v) for v in m.values()]).all(), m
    g0 = tiny_gan(32, gan.GanConfig())[1].g
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), g0, state.g))
    assert max(float(v) for v in moved) > 1e-3
    assert max(d_losses) < 10.0
