"""Mirror-CFE's feature-space geometry (issue 12) on resnet_tiny split at layer4 (GAP + linear head):
the boundary at k = 0.5 and the flip at k = 1, L-BFGS against the closed form, one compilation for new
batches, the same paths on 1 and 4 devices, and the one-line errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax import models
from fgvce_jax.errors import FgvceError
from fgvce_jax.mirror import geometry as geo

N = 6  # queries; not a multiple of 4 devices, so the padding to the mesh is exercised


def _one_device_mesh():
    return jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def model():
    """resnet_tiny with random weights and a non-zero random fc bias."""
    model = models.create("resnet_tiny", 10, seed=0)
    model.fc.bias[...] = 0.3 * jax.random.normal(jax.random.key(1), model.fc.bias.shape)
    return model


@pytest.fixture(scope="module")
def tiny(model):
    """(split model at layer4, params, z (2N, 8, 8, 128), s, t)."""
    split_model, params = models.split(model, at="layer4")
    images = jax.random.normal(jax.random.key(2), (2 * N, 32, 32, 3))
    z, _ = jax.jit(split_model.encode)(params, images)
    s = np.asarray(jax.jit(split_model.head)(params, z).argmax(-1))
    t = (s + 1 + np.arange(2 * N) % 9) % 10
    return split_model, params, z, s, t


@pytest.fixture(scope="module")
def paths(tiny):
    """Both ends (reflection, refined) of the first N queries on the default grid, on all 4 devices."""
    split_model, params, z, s, t = tiny
    return {refined: geo.mirror_path(split_model, params, z[:N], s[:N], t[:N], refined=refined)
            for refined in (False, True)}


def test_linear_head_is_the_models_head(tiny):
    split_model, params, z, _, _ = tiny
    W, b = geo.linear_head(split_model, params)
    assert W.shape == (128, 10) and b.shape == (10,) and float(jnp.abs(b).min()) > 0
    np.testing.assert_allclose(geo.head_logits(W, b, z), split_model.head(params, z), atol=1e-5)


def test_projection_lies_on_the_mirror(tiny):
    split_model, params, z, s, t = tiny
    W, b = geo.linear_head(split_model, params)
    w_m, b_m = geo.mirror(W, b, s[0], t[0])
    p, r = geo.project(z[0], w_m, b_m), geo.reflect(z[0], w_m, b_m)
    side = z[0] @ w_m + b_m  # (8, 8) signed distance * ||w_m|| of every position
    assert float(jnp.abs(side).min()) > 1e-3  # the positions are off the mirror to start with
    np.testing.assert_allclose(p @ w_m + b_m, 0, atol=1e-5)
    np.testing.assert_allclose(r @ w_m + b_m, -side, atol=1e-4)


@pytest.mark.parametrize("refined", [False, True])
def test_boundary_at_half_and_flip_at_one(tiny, paths, refined):
    split_model, params, z, s, t = tiny
    out = paths[refined]
    ks = np.asarray(geo.DEFAULT_KS)
    assert out.z.shape == (N, len(ks), 8, 8, 128) and out.logits.shape == (N, len(ks), 10)
    rows = np.arange(N)
    d = np.asarray(out.logits[rows, :, t[:N]] - out.logits[rows, :, s[:N]])  # (N, K): g_t - g_s along the path
    half, one = int(np.flatnonzero(ks == 0.5)[0]), len(ks) - 1
    assert np.all(d[:, 0] < -1e-2)  # s is the prediction: g_t < g_s at k = 0
    np.testing.assert_allclose(d[:, half], 0, atol=1e-5)
    assert np.all(d[:, one] > 1e-2)
    np.testing.assert_allclose(d, d[:, :1] * (1 - 2 * ks), atol=1e-5)  # d(Z_k) = (1 - 2k) d(Z_s), exactly
    # The path's logits come from the model's own head, not from the geometry's formula.
    np.testing.assert_allclose(split_model.head(params, out.z[:, one]), out.logits[:, one], atol=1e-5)
    if refined:  # at k = 1 the logits are the source's with s and t swapped: t is now the top class
        assert np.all(np.asarray(out.loss) < 1e-8)
        assert np.all(np.asarray(out.logits[:, one].argmax(-1)) == t[:N])
    else:  # the plain reflection moves the other logits too, so it misses y*
        assert np.all(np.asarray(out.loss) > 1e-3)
        W, b = geo.linear_head(split_model, params)
        w_m, b_m = jax.vmap(geo.mirror, (None, None, 0, 0))(W, b, s[:N], t[:N])
        np.testing.assert_allclose(out.z[:, half], jax.vmap(geo.project)(z[:N], w_m, b_m), atol=1e-5)


def test_lbfgs_reaches_swapped_logits_and_equals_the_closed_form(tiny):
    """From the reflection Z_r, L-BFGS converges to the point of S = {Z : g(Z) = y*} nearest Z_r, which is the
    closed form least_norm(Z_r). The least-norm solution from Z_s is another point of S (the reflection's
    position-dependent part lies in the head's null space), so the 1e-4 agreement is a real test."""
    split_model, params, z, s, t = tiny
    W, b = geo.linear_head(split_model, params)
    w_m, b_m = jax.vmap(geo.mirror, (None, None, 0, 0))(W, b, s[:N], t[:N])
    z_r = jax.vmap(geo.reflect)(z[:N], w_m, b_m)
    target = jax.vmap(geo.swapped)(geo.head_logits(W, b, z[:N]), s[:N], t[:N])
    z_opt, loss = geo.refine(W, b, z_r, target)
    assert np.all(np.asarray(loss) < 1e-8)
    np.testing.assert_allclose(geo.head_logits(W, b, z_opt), target, atol=1e-5)
    closed = geo.least_norm(W, b, z_r, target)
    np.testing.assert_allclose(geo.head_logits(W, b, closed), target, atol=1e-5)
    np.testing.assert_allclose(z_opt, closed, atol=1e-4)
    from_source = geo.least_norm(W, b, z[:N], target)
    assert float(jnp.abs(from_source - closed).max()) > 1e-2
    assert float(jnp.abs(z_opt - z_r).max()) > 1e-2  # L-BFGS did move


def test_a_second_batch_does_not_recompile(tiny, paths):
    split_model, params, z, s, t = tiny
    before = geo.path_batch._cache_size()
    assert before >= 1
    again = geo.mirror_path(split_model, params, z[N:], s[N:], t[N:])  # new features and classes, same shapes
    assert geo.path_batch._cache_size() == before
    assert np.all(np.asarray(again.loss) < 1e-8)
    assert float(jnp.abs(again.z - paths[True].z).max()) > 1e-2  # really another batch


def test_one_and_four_devices_agree(tiny, paths):
    assert jax.device_count() == 4
    split_model, params, z, s, t = tiny
    one = geo.mirror_path(split_model, params, z[:N], s[:N], t[:N], mesh=_one_device_mesh())
    four = paths[True]
    assert len(four.z.sharding.device_set) == 4 and len(one.z.sharding.device_set) == 1
    np.testing.assert_allclose(one.z, four.z, atol=1e-5)
    np.testing.assert_allclose(one.logits, four.logits, atol=1e-5)
    np.testing.assert_array_less(np.maximum(np.asarray(one.loss), np.asarray(four.loss)), 1e-8)


def test_non_linear_head_is_a_one_line_error(model):
    split_model, params = models.split(model, at="layer4.0")
    z = jnp.zeros((1, 8, 8, 128))
    with pytest.raises(FgvceError, match="needs a GAP \\+ linear head") as err:
        geo.mirror_path(split_model, params, z, [1], [2])
    assert "\n" not in str(err.value) and "layer4.0" in str(err.value)


def test_same_source_and_target_is_a_one_line_error(tiny):
    split_model, params, z, s, _ = tiny
    t = (s[:3] + 1) % 10
    t[2] = s[2]
    with pytest.raises(FgvceError, match=f"query 2: source and target are both class {s[2]}") as err:
        geo.mirror_path(split_model, params, z[:3], s[:3], t)
    assert "\n" not in str(err.value)
    with pytest.raises(FgvceError, match="outside 0..9"):
        geo.mirror_path(split_model, params, z[:1], [0], [10])
    with pytest.raises(FgvceError, match=r"feature maps \(N=2, H, W, D=128\) for 2 queries, got \(3, 8, 8, 128\)"):
        geo.mirror_path(split_model, params, z[:3], s[:2], (s[:2] + 1) % 10)
