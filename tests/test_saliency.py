"""Feature-map games (generic and fast paths) and saliency.compute over batches of feature maps."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax.keys import row_keys
from fgvce_jax import saliency, shapley, sharding
from fgvce_jax.errors import FgvceError
from fgvce_jax.models import create, split
from fgvce_jax.shapley.game import GenericHead, LastBlockAttention, LinearHead
from fgvce_jax.shapley.estimate import run_batch as run_engine
from fgvce_jax.shapley.local import plan as plan_local

KEY = jax.random.key(0)
H, W, D, C = 4, 5, 6, 7


@dataclasses.dataclass(frozen=True)
class LinearSplit:
    """A SplitModel stand-in cut at ``layer4``: g = global average pool + linear."""

    family = "resnet"
    num_classes: int = C

    def head(self, params, z, ctx=None, token_mask=None):
        return z.mean((1, 2)) @ params["W"] + params["b"]

    def linear_head(self, params):
        return params["W"], params["b"]


def _ln(x):
    return (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)


@dataclasses.dataclass(frozen=True)
class LastBlockSplit:
    """A SplitModel stand-in cut at a ViT's last block: one pre-LN attention block, class-token head.

    ``head`` runs the block on every token; ``last_block_cache``/``last_block_logits`` compute the patch
    K/V once and only the class token's row, the contract of the real ViT's fast path.
    """

    family = "vit"
    num_classes: int = C

    def _finish(self, params, x_cls, attended):
        y = x_cls + attended @ params["wo"]
        y = y + jax.nn.gelu(_ln(y) @ params["w1"], approximate=False)
        return _ln(y) @ params["head"]

    def head(self, params, z, ctx=None, token_mask=None):
        b = z.shape[0]
        x = jnp.concatenate([ctx["cls"][:, None], z.reshape(b, H * W, D)], axis=1)  # (B, T, D)
        ln = _ln(x)
        q, k, v = ln @ params["wq"], ln @ params["wk"], ln @ params["wv"]
        att = q @ k.transpose(0, 2, 1) / np.sqrt(D)  # (B, T, T)
        if token_mask is not None:
            keep = jnp.concatenate([jnp.ones((b, 1), bool), token_mask.reshape(b, H * W)], axis=1)
            att = jnp.where(keep[:, None, :], att, -jnp.inf)
        out = jax.nn.softmax(att, -1) @ v
        return self._finish(params, x[:, 0], out[:, 0])

    def linear_head(self, params):
        return None

    def last_block_cache(self, params, z, ctx):
        x = jnp.concatenate([ctx["cls"][:, None], z.reshape(z.shape[0], H * W, D)], axis=1)
        ln = _ln(x)
        return {"x_cls": x[:, 0], "q": ln[:, 0] @ params["wq"], "k": ln @ params["wk"], "v": ln @ params["wv"]}

    def last_block_logits(self, params, cache, token_mask):
        b = token_mask.shape[0]
        keep = jnp.concatenate([jnp.ones((b, 1), bool), token_mask.reshape(b, H * W)], axis=1)
        att = jnp.where(keep, (cache["k"][0] @ cache["q"][0]) / np.sqrt(D), -jnp.inf)  # (B, T)
        return self._finish(params, cache["x_cls"], jax.nn.softmax(att, -1) @ cache["v"][0])


def _params(names_shapes, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(names_shapes))
    return {n: jax.random.normal(k, s) / np.sqrt(s[0]) for k, (n, s) in zip(keys, names_shapes.items())}


LIN_PARAMS = _params({"W": (D, C), "b": (C,)})
VIT_PARAMS = _params({"wq": (D, D), "wk": (D, D), "wv": (D, D), "wo": (D, D), "w1": (D, D), "head": (D, C)})
Z = jax.nn.relu(jax.random.normal(jax.random.key(1), (3, H, W, D)))
MASKS = jax.random.bernoulli(jax.random.key(2), 0.5, (16, H, W))


@pytest.mark.parametrize("output", ["prob", "logit", "log_prob"])
@pytest.mark.parametrize("baseline", ["zero", "mean", "channel", "map"])
def test_linear_fast_path_equals_generic(baseline, output):
    base = {"channel": jnp.linspace(0, 1, D), "map": jax.random.uniform(jax.random.key(3), (H, W, D))}.get(
        baseline, baseline)
    fast = shapley.feature_game(LinearSplit(), LIN_PARAMS, Z[0], None, 2, baseline=base, output=output)
    slow = shapley.feature_game(LinearSplit(), LIN_PARAMS, Z[0], None, 2, baseline=base, output=output, fast=False)
    assert isinstance(fast.fn, LinearHead) and isinstance(slow.fn, GenericHead)
    np.testing.assert_allclose(fast(MASKS), slow(MASKS), atol=1e-5)
    np.testing.assert_allclose(fast(MASKS.reshape(16, -1)), slow(MASKS), atol=1e-5)  # flat masks too


def test_vit_last_block_fast_path_equals_generic():
    ctx = {"cls": jax.random.normal(jax.random.key(4), (D,))}
    fast = shapley.feature_game(LastBlockSplit(), VIT_PARAMS, Z[0], ctx, 3, baseline="attention")
    slow = shapley.feature_game(LastBlockSplit(), VIT_PARAMS, Z[0], ctx, 3, baseline="attention", fast=False)
    assert isinstance(fast.fn, LastBlockAttention)
    np.testing.assert_allclose(fast(MASKS), slow(MASKS), atol=1e-5)
    # all tokens present: the plain head's probability
    full = jax.nn.softmax(LastBlockSplit().head(VIT_PARAMS, Z[:1], {"cls": ctx["cls"][None]}))[0, 3]
    np.testing.assert_allclose(fast(jnp.ones((1, H, W), bool))[0], full, atol=1e-6)


def test_resnet_tiny_split_layer4_fast_path_equals_generic():
    sm, params = split(create("resnet_tiny", 10, seed=0), at="layer4")
    z, ctx = sm.encode(params, jax.random.normal(jax.random.key(5), (1, 32, 32, 3)))
    masks = jax.random.bernoulli(jax.random.key(6), 0.5, (8, *z.shape[1:3]))
    fast = shapley.feature_game(sm, params, z[0], {}, 4)
    slow = shapley.feature_game(sm, params, z[0], {}, 4, fast=False)
    assert isinstance(fast.fn, LinearHead)
    np.testing.assert_allclose(fast(masks), slow(masks), atol=1e-5)


def test_compute_local_and_global_equal_the_single_image_estimators():
    classes = jnp.array([0, 3, 6])
    phi_local = saliency.compute(LinearSplit(), LIN_PARAMS, Z, None, classes, kernel=3, samples=4, key=KEY)
    phi_global = saliency.compute(LinearSplit(), LIN_PARAMS, Z, None, classes, method="global", budget=4 * 21,
                                  key=KEY)
    assert phi_local.shape == phi_global.shape == (3, H, W)
    for i in range(3):
        game = shapley.feature_game(LinearSplit(), LIN_PARAMS, Z[i], None, classes[i])
        ki = jax.random.fold_in(KEY, i)
        np.testing.assert_allclose(phi_local[i], shapley.local(game, (H, W), kernel=3, samples=4, key=ki),
                                   atol=1e-6)
        want = shapley.estimate(game, H * W, method="permutation", budget=4 * 21, key=ki).phi.reshape(H, W)
        np.testing.assert_allclose(phi_global[i], want, atol=1e-6)


def test_compute_with_the_generic_vit_head_and_chunks_devices_invariance():
    ctx = {"cls": jax.random.normal(jax.random.key(4), (3, D))}
    classes = jnp.array([1, 2, 3])
    one = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    ref = saliency.compute(LastBlockSplit(), VIT_PARAMS, Z, ctx, classes, baseline="attention", samples=4,
                           key=KEY, mesh=one)
    got = saliency.compute(LastBlockSplit(), VIT_PARAMS, Z, ctx, classes, baseline="attention", samples=4,
                           key=KEY, chunk_size=5)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    before = run_engine._cache_size()
    saliency.compute(LastBlockSplit(), VIT_PARAMS, Z + 1.0, ctx, classes, baseline="attention", samples=4,
                     key=KEY, chunk_size=5)
    assert run_engine._cache_size() == before  # new feature maps, same compiled call


@pytest.mark.parametrize("method", ["gradient", "gradcam"])
def test_gradient_maps_match_the_closed_form_of_a_linear_head(method):
    """logit_c = mean_hw(z) W_c + b_c, so d logit_c / d z_hw = W_c / HW for every position."""
    classes = jnp.array([0, 3, 6])
    phi = saliency.compute(LinearSplit(), LIN_PARAMS, Z, None, classes, method=method, output="logit")
    cam = jnp.einsum("nhwd,dn->nhw", Z, LIN_PARAMS["W"][:, classes]) / (H * W)
    np.testing.assert_allclose(phi, cam if method == "gradient" else jax.nn.relu(cam), atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="lime"), "unknown saliency method"),
    (dict(z=Z[0]), "\\(N, H, W, D\\)"),
    (dict(classes=jnp.array([0, 1])), "one entry per feature map"),
    (dict(classes=jnp.array([0, 1, 7])), "0..6"),
    (dict(baseline="attention"), "ViT"),
    (dict(baseline="blur"), "unknown baseline"),
    (dict(baseline=jnp.zeros(D + 1)), "shape"),
    (dict(output="odds"), "unknown output"),
    (dict(key=None), "PRNG key"),
])
def test_bad_requests_raise_clear_errors(kwargs, match):
    args = dict(z=Z, classes=jnp.array([0, 1, 2]), key=KEY)
    args.update(kwargs)
    with pytest.raises(FgvceError, match=match):
        saliency.compute(LinearSplit(), LIN_PARAMS, args.pop("z"), None, args.pop("classes"), **args)


def test_compute_on_a_real_vit_takes_the_last_block_fast_path_and_matches_the_generic_head():
    """A small flax ViT split at its last block: saliency.compute (fast path, batched) equals local() on the
    generic game (head on every token with a token mask), image by image with the per-image keys."""
    from flax import nnx

    from fgvce_jax.models.vit import ViT

    vit = ViT(4, 3, 2, 16, 32, num_classes=5, arch="vit_b_16", image_size=16, rngs=nnx.Rngs(0))
    sm, params = split(vit)
    z, ctx = jax.jit(sm.encode)(params, jax.random.normal(jax.random.key(7), (2, 16, 16, 3)))
    classes = jnp.array([1, 4])
    assert isinstance(shapley.feature_game(sm, params, z[0], jax.tree.map(lambda a: a[0], ctx), 1,
                                           baseline="attention").fn, LastBlockAttention)
    phi = saliency.compute(sm, params, z, ctx, classes, baseline="attention", kernel=3, samples=4, key=KEY)
    for i in range(2):
        generic = shapley.feature_game(sm, params, z[i], jax.tree.map(lambda a: a[i], ctx), classes[i],
                                       baseline="attention", fast=False)
        assert isinstance(generic.fn, GenericHead)
        want = shapley.local(generic, z.shape[1:3], kernel=3, samples=4, key=jax.random.fold_in(KEY, i))
        np.testing.assert_allclose(phi[i], want, atol=1e-5)
    assert np.abs(np.asarray(phi)).max() > 1e-4


def local_hlo(fn, args, keys, mesh, shared) -> str:
    """The compiled text of a local request (4 x 4 grid, 3 x 3 windows, 2 paired draws) on the unit engine."""
    p = plan_local((4, 4), 3, 2, "absent", True, keys.shape[0], 4096, 32, mesh)
    return run_engine.lower(p.est, fn, args, keys, n_units=p.n_units, u=p.u, n_chunks=p.n_chunks, mesh=mesh,
                            r=p.r, shared=shared).as_text()


def test_batched_games_share_the_model_parameters():
    """A batch of N maps runs every convolution with the one set of weights (no per-image kernel copies):
    the compiled local call holds no grouped convolution, and the parameters carry no image axis."""
    sm, params = split(create("resnet_tiny", num_classes=5, seed=1), at="layer4.0")
    z = jax.random.uniform(jax.random.key(2), (3, 4, 4, 128))
    fn, args, shared, _ = saliency.batch_games(sm, params, z, {}, jnp.array([0, 1, 2]), "zero", "prob")
    assert "params" not in args and shared["params"] is params
    assert all(a.shape[0] == 3 for a in jax.tree.leaves(args))  # every per-image argument has the image axis
    mesh = sharding.device_mesh(None)

    def hlo(args, shared):
        return local_hlo(fn, args, row_keys(KEY, 3), mesh, shared)

    def groups(text):
        return {int(g) for g in re.findall(r"feature_group_count = (\d+)", text)}

    assert groups(hlo(args, shared)) == {1}
    # the check can fail: per-image copies of the weights (the old layout) compile to grouped convolutions
    copies = {**args, "params": jax.tree.map(lambda a: jnp.broadcast_to(a, (3, *a.shape)), params)}
    assert max(groups(hlo(copies, None))) > 1


def test_bf16_head_runs_the_convolutions_in_bf16_and_stays_close_to_float32():
    """dtype="bfloat16": the deep head's convolutions take bf16 operands (the check fails for float32),
    Phi comes back float32 and within bf16 rounding of the float32 Phi, but not bit-equal to it."""
    sm, params = split(create("resnet_tiny", num_classes=5, seed=1), at="layer4.0")
    z = jax.nn.relu(jax.random.normal(jax.random.key(3), (2, 4, 4, 128)))
    classes = jnp.array([0, 3])

    def conv_types(dtype):
        p, zz, ctx, base = saliency.in_dtype(params, z, {}, "zero", dtype)
        fn, args, shared, _ = saliency.batch_games(sm, p, zz, ctx, classes, base, "prob")
        text = local_hlo(fn, args, row_keys(KEY, 2), sharding.device_mesh(None), shared)
        return set(re.findall(r"stablehlo.convolution.*-> tensor<[^>]*x(\w+)>", text))

    assert conv_types("float32") == {"f32"} and conv_types("bfloat16") == {"bf16"}
    full = saliency.compute(sm, params, z, {}, classes, kernel=3, samples=8, key=KEY)
    half = saliency.compute(sm, params, z, {}, classes, kernel=3, samples=8, key=KEY, dtype="bfloat16")
    assert half.dtype == jnp.float32
    err = float(jnp.linalg.norm(half - full) / jnp.linalg.norm(full))
    assert 0 < err < 0.05, err
    with pytest.raises(FgvceError, match="head dtype must be one of float32, bfloat16"):
        saliency.compute(sm, params, z, {}, classes, key=KEY, dtype="float16")
