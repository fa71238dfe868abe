"""Residual heads: point-wise prefixes and receptive-field cropping (shapley/crop.py) equal the generic path."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fgvce_jax import saliency, shapley
from fgvce_jax.models import create
from fgvce_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from fgvce_jax.models.split import split
from fgvce_jax.shapley import crop
from fgvce_jax.shapley.game import ConvHead, GenericHead, LinearHead
from fgvce_jax.shapley.local import item_masks

KEY = jax.random.key(0)
NARROW = (4, 4, 8, 8)  # the real block structure with few channels, so that 14 x 14 heads stay fast on 2 cores


@functools.cache
def model(arch):
    if arch == "resnet_tiny":
        return create("resnet_tiny", 6, seed=0)
    block, sizes = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}[arch]
    return ResNet(block, sizes, 6, arch=arch, widths=NARROW, rngs=nnx.Rngs(0))


def games(arch, at, hw, output="logit", seed=1):
    """(fast, generic) games of one random feature map (hw, hw, D) at split ``at``, class 2, mean baseline."""
    sm, params = split(model(arch), at)
    d = jax.eval_shape(sm.encode, params, jnp.zeros((1, 32, 32, 3)))[0].shape[-1]
    z = jax.nn.relu(jax.random.normal(jax.random.key(seed), (hw, hw, d)))
    kw = dict(baseline="mean", output=output)
    return (shapley.feature_game(sm, params, z, None, 2, **kw),
            shapley.feature_game(sm, params, z, None, 2, fast=False, **kw))


CASES = [(arch, at, hw) for arch in ("resnet18", "resnet50", "resnet_tiny") for at in ("layer4.0", "layer3")
         for hw in (7, 14)]


@pytest.mark.parametrize("arch,at,hw", CASES)
def test_prefix_and_cropped_paths_equal_the_generic_head(arch, at, hw):
    """Random full masks through the prefix path, and local window masks (k = 3, 5) through the crop path,
    at corner, edge and interior windows: the generic head's values to 1e-5."""
    fast, generic = games(arch, at, hw)
    assert isinstance(fast.fn, ConvHead) and isinstance(generic.fn, GenericHead)
    masks = jax.random.bernoulli(jax.random.key(2), 0.5, (5, hw, hw))
    want = np.asarray(generic(masks))
    np.testing.assert_allclose(fast(masks), want, rtol=1e-5, atol=1e-5)
    assert np.ptp(want) > 1e-3  # the masks matter
    for kernel in (3, 5):
        centres = jnp.asarray([0, hw - 1, hw * (hw // 2) + hw // 2, hw * hw - hw + 2, hw * hw - 1])
        masks = jnp.concatenate([item_masks(jax.random.fold_in(KEY, int(p)), p, (hw, hw), kernel, "absent", True)
                                 for p in centres])  # (4 per window, H, W)
        centres = jnp.repeat(centres, 4)
        np.testing.assert_allclose(fast.fn.cropped(fast.args, masks, centres, kernel), generic(masks),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("outside", ["absent", "present"])
@pytest.mark.parametrize("arch,at,hw", [("resnet50", "layer4.0", 14), ("resnet_tiny", "layer3", 7)])
def test_local_on_a_residual_head_equals_the_generic_path(arch, at, hw, outside):
    """Phi by local: cropping (absent) or the prefix path (present) against the generic head, same draws."""
    fast, generic = games(arch, at, hw)
    kw = dict(kernel=3, samples=2, key=KEY, outside=outside)
    want = np.asarray(shapley.local(generic, (hw, hw), **kw))
    np.testing.assert_allclose(shapley.local(fast, (hw, hw), **kw), want, rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 1e-3


def test_real_resnet50_layer4_0_windows_equal_the_generic_head():
    """The full-width ResNet-50 layer4.0 head (2 Bottlenecks, 2048 channels) on 14 x 14: a few windows."""
    sm, params = split(ResNet(Bottleneck, (3, 4, 6, 3), 6, arch="resnet50", rngs=nnx.Rngs(0)), "layer4.0")
    z = jax.nn.relu(jax.random.normal(jax.random.key(1), (14, 14, 2048)))
    fast = shapley.feature_game(sm, params, z, None, 2, baseline="mean", output="logit")
    generic = shapley.feature_game(sm, params, z, None, 2, baseline="mean", output="logit", fast=False)
    centres = jnp.asarray([0, 7 * 14 + 7])
    masks = jnp.concatenate([item_masks(jax.random.fold_in(KEY, int(p)), p, (14, 14), 3, "absent", False)
                             for p in centres])
    want = np.asarray(generic(masks))
    np.testing.assert_allclose(fast.fn.cropped(fast.args, masks, jnp.repeat(centres, 2), 3), want,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast(masks), want, rtol=1e-5, atol=1e-5)


def test_crop_sizes_are_the_receptive_field():
    """ResNet-50 layer4.0 (two stride-1 Bottlenecks, radius 1 each) at 14 x 14, k = 3: 7 x 7 then 9 x 9;
    at 7 x 7 the second block needs the whole map. A stride-2 block's crop starts on even positions."""
    convs = (((1, 1),), ((1, 1),))
    assert [level[0][0] for level in crop.plan((14, 14), 3, convs)] == [7, 9]
    assert [level[0][0] for level in crop.plan((7, 7), 3, convs)] == [7, 7]
    rows = crop.plan((14, 14), 3, (((1, 2),), ((1, 1),)))[0][0]
    assert (rows[1] % 2 == 0).all() and rows[0] % 2 == 0
    size, starts, exact = crop.plan((14, 14), 3, convs)[1][0]
    assert starts.tolist()[:4] == [0, 0, 0, 0] and starts[-1] == 14 - size  # clipped to the map


def test_only_residual_heads_get_the_conv_game():
    assert isinstance(games("resnet_tiny", "layer4", 7)[0].fn, LinearHead)
    assert isinstance(games("resnet_tiny", "layer4.0", 7)[0].fn, ConvHead)


def test_crop_path_is_bit_identical_across_devices_and_chunk_sizes():
    """saliency.compute on 2 maps (the batched engine, shared parameters): crop path, 1 and 4 devices,
    several chunk sizes, bit for bit."""
    sm, params = split(model("resnet_tiny"), "layer4.0")
    z = jax.nn.relu(jax.random.normal(jax.random.key(5), (2, 10, 10, 128)))
    one = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    run = functools.partial(saliency.compute, sm, params, z, None, jnp.asarray([1, 4]), kernel=3, samples=2,
                            key=KEY, output="logit")
    ref = np.asarray(run(mesh=one))
    for chunk, mesh in [(None, None), (8, one), (8, None), (10 ** 6, None)]:
        np.testing.assert_array_equal(run(chunk_size=chunk, mesh=mesh), ref)
    assert np.abs(ref).max() > 1e-3
