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
from fgvce_jax.mirror import geometry as geo

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
    out = g(z, skips, inside)
    assert out.shape == (8, 32, 32, 3) and bool(jnp.all(jnp.isfinite(out)))
    # the editor's last layer only matters through the mask: with an empty mask it has no effect
    changed = nnx.clone(g)
    changed.edit_out[-1].bias[...] = changed.edit_out[-1].bias[...] + 1.0  # the layer1 skip's editor
    empty = jnp.zeros_like(inside)
    np.testing.assert_array_equal(changed(z, skips, empty), g(z, skips, empty))
    assert float(jnp.abs(changed(z, skips, inside) - out).max()) > 1e-3


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
