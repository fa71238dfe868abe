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
from fgvce_jax.shapley.game import ConvHead, Game, GenericHead, LinearHead
from fgvce_jax.shapley.local import item_masks

KEY = jax.random.key(0)
NARROW = (4, 4, 8, 8)  # the real block structure with few channels, so that 14 x 14 heads stay fast on 2 cores


def initialised(make, seed=0):
    """The module make() builds, with random NumPy weights: kernels N(0, 2 / fan-in), BN statistics and
    affine terms near (0, 1). Eager initialisers compile one op per shape, tens of seconds on 2 cores."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-2])  # (..., layer, name, .value)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "var" in name or "scale" in name:
            return jnp.asarray(1 + 0.2 * np.abs(noise))
        if "mean" in name or "bias" in name:
            return jnp.asarray(0.1 * noise)
        return jnp.asarray(noise * np.sqrt(2 / np.prod(leaf.shape[:-1])))
    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@functools.cache
def model(arch):
    if arch == "resnet_tiny":
        return initialised(lambda: create("resnet_tiny", 6, seed=0))
    block, sizes = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}[arch]
    return initialised(lambda: ResNet(block, sizes, 6, arch=arch, widths=NARROW, rngs=nnx.Rngs(0)))


def games(arch, at, hw, output="logit", seed=1):
    """(fast, generic) games of one random feature map (hw, hw, D) at split ``at``, class 2, mean baseline."""
    sm, params = split(model(arch), at)
    d = jax.eval_shape(sm.encode, params, jnp.zeros((1, 32, 32, 3)))[0].shape[-1]
    z = jax.nn.relu(jax.random.normal(jax.random.key(seed), (hw, hw, d)))
    return tuple(built(sm, params, z, output=output, fast=fast) for fast in (True, False))


def built(sm, params, z, *, output, fast):
    """feature_game(..., class 2, mean baseline) with its arguments computed in one compiled call."""
    def make(p, zz):
        return shapley.feature_game(sm, p, zz, None, 2, baseline="mean", output=output, fast=fast)

    shape = jax.eval_shape(make, params, z)
    return Game(shape.fn, jax.jit(lambda p, zz: make(p, zz).args)(params, z), shape.bytes_per_evaluation)


@functools.partial(jax.jit, static_argnames="fn")
def values(fn, args, masks):
    return fn(args, masks)


@functools.partial(jax.jit, static_argnames=("fn", "kernel"))
def cropped(fn, args, masks, centres, kernel):
    return fn.cropped(args, masks, centres, kernel)


def window_masks(hw, kernel, centres, paired=True):
    """local's masks (4 or 2 per window, H, W) at flat positions ``centres``, and each mask's centre."""
    centres = jnp.asarray(centres)
    one = functools.partial(item_masks, grid=(hw, hw), kernel=kernel, outside="absent", paired=paired)
    masks = jax.jit(jax.vmap(lambda p: one(jax.random.fold_in(KEY, p), p)))(centres)
    return masks.reshape(-1, hw, hw), jnp.repeat(centres, masks.shape[1])


CASES = [(arch, at, hw) for arch in ("resnet18", "resnet50", "resnet_tiny") for at in ("layer4.0", "layer3")
         for hw in (7, 14)]


@pytest.mark.parametrize("arch,at,hw", CASES)
def test_prefix_and_cropped_paths_equal_the_generic_head(arch, at, hw):
    """Random full masks through the prefix path, and local window masks (k = 3, 5) through the crop path,
    at corner, edge and interior windows: the generic head's values to 1e-5."""
    fast, generic = games(arch, at, hw)
    assert isinstance(fast.fn, ConvHead) and isinstance(generic.fn, GenericHead)
    kernels = (3, 5) if hw > 7 else (3,)  # at 7 x 7 a 5 x 5 window's crop is the whole map
    centres = [0, hw - 1, hw * (hw // 2) + hw // 2, hw * hw - hw + 2, hw * hw - 1]  # corners, edge, centre
    windows = [window_masks(hw, k, centres) for k in kernels]
    full = jax.random.bernoulli(jax.random.key(2), 0.5, (5, hw, hw))
    every = jnp.concatenate([full] + [m for m, _ in windows])
    want = np.asarray(values(generic.fn, generic.args, every))
    np.testing.assert_allclose(values(fast.fn, fast.args, every), want, rtol=1e-5, atol=1e-5)
    assert np.ptp(want[:5]) > 1e-3  # the masks matter
    start = 5
    for kernel, (masks, at_centres) in zip(kernels, windows):
        got = cropped(fast.fn, fast.args, masks, at_centres, kernel)
        np.testing.assert_allclose(got, want[start:start + masks.shape[0]], rtol=1e-5, atol=1e-5)
        start += masks.shape[0]


@pytest.mark.parametrize("outside", ["absent", "present"])
@pytest.mark.parametrize("arch,at,hw", [("resnet50", "layer4.0", 10), ("resnet_tiny", "layer3", 7)])
def test_local_on_a_residual_head_equals_the_generic_path(arch, at, hw, outside):
    """Phi by local: cropping (absent) or the prefix path (present) against the generic head, same draws."""
    fast, generic = games(arch, at, hw)
    kw = dict(kernel=3, samples=2, key=KEY, outside=outside)
    want = np.asarray(shapley.local(generic, (hw, hw), **kw))
    np.testing.assert_allclose(shapley.local(fast, (hw, hw), **kw), want, rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 1e-3


def test_real_resnet50_layer4_0_windows_equal_the_generic_head():
    """The full-width ResNet-50 layer4.0 head (2 Bottlenecks, 2048 channels) on 14 x 14: two windows
    (about 7 s on 2 cores)."""
    sm, params = split(initialised(lambda: ResNet(Bottleneck, (3, 4, 6, 3), 6, arch="resnet50",
                                                  rngs=nnx.Rngs(0))), "layer4.0")
    z = jax.nn.relu(jax.random.normal(jax.random.key(1), (14, 14, 2048)))
    fast, generic = (built(sm, params, z, output="logit", fast=f) for f in (True, False))
    masks, centres = window_masks(14, 3, [0, 7 * 14 + 7], paired=False)
    want = np.asarray(values(generic.fn, generic.args, masks))
    np.testing.assert_allclose(cropped(fast.fn, fast.args, masks, centres, 3), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(values(fast.fn, fast.args, masks), want, rtol=1e-5, atol=1e-5)


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
    """saliency.compute on 2 maps (the batched engine, shared parameters), crop path: at each chunk size 1 and 4
    devices bit for bit; across chunk sizes equal to float32 rounding. (Another chunk size is another batch
    shape, which some CPUs round differently: seen on CI hardware, 1e-7 absolute.)"""
    sm, params = split(model("resnet_tiny"), "layer4.0")
    z = jax.nn.relu(jax.random.normal(jax.random.key(5), (2, 10, 10, 128)))
    one = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    run = functools.partial(saliency.compute, sm, params, z, None, jnp.asarray([1, 4]), kernel=3, samples=2,
                            key=KEY, output="logit")
    ref = np.asarray(run(mesh=one))
    assert np.abs(ref).max() > 1e-3
    for chunk in (None, 8, 10 ** 6):
        single = np.asarray(run(chunk_size=chunk, mesh=one))
        np.testing.assert_array_equal(run(chunk_size=chunk, mesh=None), single)
        np.testing.assert_allclose(single, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
