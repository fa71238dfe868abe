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
    return np.random.default_rng(seed).normal(size=(n, TINY["concept_dim"])).astype(np.float32)


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


@jax.jit
def _demodulation_check(weight, styles, x):
    w2 = G.demodulate(weight, styles)  # (N, k, k, Cin, Cout)
    per_sample = jax.vmap(lambda xi, wi: jax.lax.conv_general_dilated(
        xi[None], wi, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))[0])(x, w2)
    return (jnp.sqrt(jnp.sum(jnp.square(w2), axis=(1, 2, 3))), per_sample,
            G.modulated_conv(x, weight, styles, demod=True), G.modulated_conv(x, weight, styles, demod=False))


def test_demodulated_weights_have_unit_norm_per_output_channel_and_match_the_fast_convolution():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(3, 3, 5, 7)).astype(np.float32)
    styles = (rng.normal(size=(4, 5)) * 3.0 + 1.0).astype(np.float32)
    x = rng.normal(size=(4, 6, 6, 5)).astype(np.float32)
    norms, per_sample, fast, undemodulated = _demodulation_check(weight, styles, x)
    np.testing.assert_allclose(norms, np.ones((4, 7)), atol=1e-5)
    np.testing.assert_allclose(fast, per_sample, atol=1e-4)
    assert float(jnp.max(jnp.abs(undemodulated - per_sample))) > 1e-2


@jax.jit
def _r1_linear_and_quadratic(a, x):
    linear = lambda imgs: jnp.sum(imgs * a, axis=(1, 2, 3, 4))  # D(x) = <a, x>: ||grad||^2 = ||a||^2
    quadratic = lambda imgs: jnp.sum(imgs ** 2, axis=(1, 2, 3, 4))  # grad = 2x
    return gan.r1_penalty(linear, x, gamma=3.0), gan.r1_penalty(quadratic, x, gamma=3.0)


def test_r1_penalty_equals_the_closed_form():
    a = np.random.default_rng(0).normal(size=(3, 4, 4, 2)).astype(np.float32)
    x = np.random.default_rng(1).normal(size=(5, 3, 4, 4, 2)).astype(np.float32)
    linear, quadratic = _r1_linear_and_quadratic(a, x)
    np.testing.assert_allclose(linear, 1.5 * np.sum(a * a), rtol=1e-5)
    np.testing.assert_allclose(quadratic, 1.5 * np.mean(np.sum((2 * x) ** 2, axis=(1, 2, 3, 4))), rtol=1e-5)


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


def test_second_render_with_new_concepts_does_not_recompile_and_z_comes_from_the_key():
    graph, params = tiny_generator(resolution=8, z_dim=2)
    first = G.render(graph, params, concepts(1), jax.random.key(0))
    compiled = G.render._cache_size()
    second = G.render(graph, params, concepts(2), jax.random.key(0))
    third = G.render(graph, params, concepts(2), jax.random.key(1))  # another z (noise strengths are 0)
    assert G.render._cache_size() == compiled
    assert float(jnp.max(jnp.abs(first - second))) > 1e-3
    assert float(jnp.max(jnp.abs(third - second))) > 1e-3


def tiny_gan(size, config):
    g_config = G.GeneratorConfig(**{**TINY, "concept_dim": 10}, resolution=size)
    d_config = gan.DiscriminatorConfig(image_size=size, channel_base=64, channel_max=8, mbstd_group=4)
    return gan.init(g_config, d_config, config, jax.random.key(0))


def digits_batch(size, n):
    """The first n digits train images at ``size`` px in [-1, 1] and their one-hot labels as concepts."""
    ds = data.load("digits", "train", image_size=size)
    p, idx = ds.preprocessing, np.arange(n)
    real = np.asarray(G.from_classifier_space(ds.images(idx), np.asarray(p.mean), np.asarray(p.std)))
    np.testing.assert_allclose(G.to_classifier_space(real, p.mean, p.std), ds.images(idx), atol=1e-5)
    assert real.min() >= -1.0 - 1e-5 and real.max() <= 1.0 + 1e-5
    return real, np.eye(10, dtype=np.float32)[ds.labels[idx]]


def test_gan_step_descends_the_extra_loss_when_the_adversarial_weight_is_zero():
    setup, state = tiny_gan(4, gan.GanConfig(adv_weight=0.0, lr=1e-2))  # 4 px: the step logic, compiled fast
    real, c = digits_batch(4, 8)

    def extra(images, concepts_, target):  # each image's mean brightness, a function of its concept
        return jnp.mean((images.mean(axis=(1, 2, 3)) - concepts_ @ target) ** 2)

    step = gan.make_gan_step(setup, extra)
    losses, compiled = [], []

    def count(event, _duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(len(losses))

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        for i in range(8):
            state, m = step(state, real, c, jax.random.key(i), jnp.linspace(-0.5, 0.5, 10))
            losses.append(float(m["g_extra"]))
            assert np.isfinite(float(m["d_loss"])) and float(m["r1"]) > 0
            assert float(m["g_adv"]) > 0 and float(m["g_loss"]) == pytest.approx(losses[-1])
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert losses[-1] < 0.5 * losses[0], losses
    # the step's state keeps its types (one trace) and its placement (init commits it): XLA compiles only
    # during the first step
    assert step._cache_size() == 1 and compiled and set(compiled) == {0}, compiled
    assert int(state.step) == 8


@pytest.mark.slow
def test_a_tiny_training_run_on_digits_at_32_px_keeps_a_finite_d_loss():
    real_all, c_all = digits_batch(32, 64)
    setup, state = tiny_gan(32, gan.GanConfig())
    g0 = state.g
    step = gan.make_gan_step(setup)
    for i in range(30):
        rows = np.arange(8 * i, 8 * i + 8) % 64
        state, m = step(state, real_all[rows], c_all[rows], jax.random.key(i))
        assert np.isfinite([float(v) for v in m.values()]).all(), m
        assert float(m["d_loss"]) < 10.0, m
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), g0, state.g))
    assert max(float(v) for v in moved) > 1e-3


def test_discriminator_at_28_px_and_its_one_line_errors():
    config = gan.DiscriminatorConfig(image_size=28, channel_base=64, channel_max=8)
    assert config.sides == (28, 14, 7)
    graph, params = nnx.split(gan.Discriminator(config, rngs=nnx.Rngs(params=jax.random.key(0))))
    logits = jax.jit(lambda p, x: nnx.merge(graph, p)(x))(params, np.zeros((8, 28, 28, 3), np.float32))
    assert logits.shape == (8,) and np.all(np.isfinite(logits))
    with pytest.raises(FgvceError, match="divide the batch size 6"):  # traced only, nothing compiled
        jax.eval_shape(lambda x: nnx.merge(graph, params)(x), jax.ShapeDtypeStruct((6, 28, 28, 3), jnp.float32))
    with pytest.raises(FgvceError, match=r"\(N, 28, 28, 3\)"):
        nnx.merge(graph, params)(np.zeros((8, 32, 32, 3), np.float32))
    with pytest.raises(FgvceError, match="do not match"):
        gan.init(G.GeneratorConfig(**TINY, resolution=32), config, gan.GanConfig(), jax.random.key(0))
