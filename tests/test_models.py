"""Model ports without torch: split views, linear head, jit caching, checkpoints, ViT masking."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fgvce_jax import models
from fgvce_jax.errors import FgvceError
from fgvce_jax.models.vit import ViT


@pytest.fixture(scope="module")
def tiny():
    return models.create("resnet_tiny", 10, seed=0)


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(1), (4, 32, 32, 3))


@pytest.fixture(scope="module")
def small_vit():
    # ViT structure at toy sizes: patch 4, 3 blocks, 2 heads, D 16, 16x16 px -> 4x4 grid.
    return ViT(4, 3, 2, 16, 32, num_classes=5, arch="vit_b_16", image_size=16, rngs=nnx.Rngs(0))


def test_tiny_shapes_at_every_split(tiny, images):
    expected = {"layer4.0": (4, 8, 8, 128), "layer4": (4, 8, 8, 128), "layer3": (4, 8, 8, 64)}
    assert tiny.default_split == "layer4.0"
    for at, shape in expected.items():
        z, ctx = tiny.encode(images, at)
        assert z.shape == shape and ctx == {}
        np.testing.assert_array_equal(tiny.features(images, at), z)
    assert tiny(images).shape == (4, 10)


@pytest.mark.parametrize("at", ["layer4.0", "layer4", "layer3"])
def test_head_of_encode_is_logits(tiny, images, at):
    np.testing.assert_allclose(tiny.head(*tiny.encode(images, at), at=at), tiny(images), atol=1e-5)


def test_linear_head_is_gap_then_affine(tiny):
    z = jax.random.uniform(jax.random.key(2), (3, 8, 8, 128))
    w, b = tiny.linear_head("layer4")
    assert w.shape == (128, 10) and b.shape == (10,)
    ref = np.asarray(z).mean(axis=(1, 2)) @ np.asarray(w) + np.asarray(b)
    np.testing.assert_allclose(tiny.head(z, at="layer4"), ref, rtol=1e-5, atol=1e-5)
    # Perturbing one position changes the logits by (1/HW) * dz @ W, as SPEC 2 states.
    dz = jnp.zeros_like(z).at[:, 3, 5].set(1.0)
    delta = tiny.head(z + dz, at="layer4") - tiny.head(z, at="layer4")
    np.testing.assert_allclose(delta, np.broadcast_to(np.asarray(w).sum(0) / 64, (3, 10)), atol=1e-5)
    assert tiny.linear_head() is None and tiny.linear_head("layer3") is None


def test_batch_composition_does_not_change_logits(tiny, images):
    np.testing.assert_allclose(jnp.concatenate([tiny(images[:1]), tiny(images[1:])]), tiny(images), atol=1e-5)


def test_bad_names_are_fgvce_errors(tiny):
    with pytest.raises(FgvceError, match="layer4.0"):
        tiny.encode(jnp.zeros((1, 32, 32, 3)), at="layer5")
    with pytest.raises(FgvceError, match="resnet18"):
        models.create("resnet19", 3)
    with pytest.raises(FgvceError, match="num_classes"):
        models.create("resnet_tiny", 0)
    with pytest.raises(FgvceError, match="ViT"):
        tiny.head(jnp.zeros((1, 8, 8, 128)), token_mask=jnp.ones((1, 8, 8), bool))


def test_split_model_is_hashable_and_equal_across_seeds(tiny):
    a, _ = models.split(tiny, "layer4")
    b, _ = models.split(models.create("resnet_tiny", 10, seed=5), "layer4")
    c, _ = models.split(tiny, "layer3")
    assert hash(a) == hash(b) and a == b and a != c
    assert (a.family, a.at, a.arch, a.num_classes) == ("resnet", "layer4", "resnet_tiny", 10)


def test_split_functions_match_module_and_do_not_recompile(tiny, images):
    sm, params = models.split(tiny)
    assert sm.at == "layer4.0"
    encode, head = jax.jit(sm.encode), jax.jit(sm.head)
    z, ctx = encode(params, images)
    np.testing.assert_allclose(head(params, z, ctx), tiny(images), atol=1e-5)
    for seed in (3, 4):  # new images and new weights of the same shapes
        _, p2 = models.split(models.create("resnet_tiny", 10, seed=seed))
        x = jax.random.normal(jax.random.key(seed), images.shape)
        head(p2, *encode(p2, x))
    assert encode._cache_size() == 1 and head._cache_size() == 1

    @jax.jit
    def static_user(x):
        return sm.logits(params, x)

    logits = jax.jit(lambda s, p, x: s.logits(p, x), static_argnums=0)
    logits(sm, params, images)
    logits(models.split(models.create("resnet_tiny", 10, seed=9))[0], params, images + 1)
    assert logits._cache_size() == 1
    np.testing.assert_allclose(static_user(images), tiny(images), atol=1e-5)


def test_split_keeps_callers_mode_and_uses_running_stats(tiny, images):
    model = models.create("resnet_tiny", 10, seed=0)
    model.train()
    sm, params = models.split(model, "layer4")
    assert model.bn1.use_running_average is False
    # Eval mode inside the split: a single image gives the same logits alone or in a batch.
    np.testing.assert_allclose(sm.logits(params, images[:1]), sm.logits(params, images)[:1], atol=1e-5)
    w, b = sm.linear_head(params)
    np.testing.assert_array_equal(w, model.fc.kernel[...])
    assert models.split(model, "layer3")[0].linear_head(params) is None


def test_checkpoint_round_trip(tmp_path, tiny, images):
    info = models.ModelInfo.for_model(tiny, class_names=[f"c{i}" for i in range(10)])
    out = models.save(tmp_path / "ckpt", tiny, info)
    model, info2 = models.load(out)
    assert info2 == info and info2.image_size == 32 and info2.default_split == "layer4.0"
    np.testing.assert_array_equal(model(images), tiny(images))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp directory left behind
    with pytest.raises(FgvceError, match="already exists"):
        models.save(out, tiny, info)
    other = models.create("resnet_tiny", 10, seed=7)
    models.save(out, other, info, overwrite=True)
    np.testing.assert_array_equal(models.load(out)[0](images), other(images))


def test_checkpoint_bad_inputs(tmp_path, tiny):
    with pytest.raises(FgvceError, match="not a model checkpoint"):
        models.load(tmp_path)
    with pytest.raises(FgvceError, match="3 class names"):
        models.ModelInfo("resnet_tiny", 10, class_names=["a", "b", "c"])
    with pytest.raises(FgvceError, match="model is resnet_tiny with 10"):
        models.save(tmp_path / "x", tiny, models.ModelInfo("resnet_tiny", 4))
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_of_another_arch_or_damaged_is_one_short_line(tmp_path, tiny):
    """info.json naming another arch (or class count): one line with the counts and a few names, not the whole
    key list; a truncated weight file: "damaged or incomplete", not storage internals."""
    info = models.ModelInfo.for_model(tiny, class_names=[f"c{i}" for i in range(10)])
    out = models.save(tmp_path / "ckpt", tiny, info)
    meta = json.loads((out / "info.json").read_text())
    for change, words in (({"arch": "resnet18"}, "expected weights missing (e.g. "),
                          ({"num_classes": 4}, "of other shapes (e.g. fc.")):
        (out / "info.json").write_text(json.dumps({**meta, **change, "class_names": None}))
        with pytest.raises(FgvceError) as e:
            models.load(out)
        msg = str(e.value)
        assert "\n" not in msg and len(msg) < 500 and "as its info.json says" in msg and words in msg, msg
    (out / "info.json").write_text(json.dumps(meta))
    models.load(out)  # intact again
    data = max((f for f in (out / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[:100])  # the array data, cut short
    with pytest.raises(FgvceError, match=f"is damaged: {data} \\(its bytes differ from those written\\)"):
        models.load(out)
    # the command: that one line, exit status 2, before orbax starts reading (whose threads would print tracebacks)
    proc = subprocess.run([sys.executable, "-m", "fgvce_jax.cli", "explain", "--model", str(out), "--dataset", "digits",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert f"is damaged: {data}" in proc.stderr
    data.unlink()
    with pytest.raises(FgvceError, match=f"is damaged: {data} is missing"):
        models.load(out)
    # a checkpoint saved before the digests were kept: orbax's failure, still one short line
    (out / "state.sha256.json").unlink()
    for f in sorted((out / "state").rglob("*")):
        if f.is_file() and f.stat().st_size > 10_000:
            f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(FgvceError, match="is damaged or incomplete") as e:
        models.load(out)
    assert "\n" not in str(e.value) and len(str(e.value)) < 600 and "slice(" not in str(e.value)


def test_vit_split_points_and_head(small_vit):
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    assert small_vit.split_points[0] == "block2" and set(small_vit.split_points) == {"block0", "block1", "block2"}
    for at in small_vit.split_points:
        z, ctx = small_vit.encode(x, at)
        assert z.shape == (2, 4, 4, 16) and ctx["cls"].shape == (2, 16)
        np.testing.assert_allclose(small_vit.head(z, ctx, at=at), small_vit(x), atol=1e-5)
        full = jnp.ones((2, 4, 4), bool)
        np.testing.assert_allclose(small_vit.head(z, ctx, at=at, token_mask=full), small_vit(x), atol=1e-5)
    with pytest.raises(FgvceError, match="16x16"):
        small_vit(jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("at", ["block0", "block2"])
def test_vit_token_mask_equals_dropping_the_tokens(small_vit, at):
    """Masking tokens as keys in every remaining block == running the blocks on the present tokens only."""
    x = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
    z, ctx = small_vit.encode(x, at)
    mask = np.array(jax.random.bernoulli(jax.random.key(4), 0.5, (2, 4, 4)))
    mask[:, 0, 0] = True
    got = small_vit.head(z, ctx, at=at, token_mask=mask)
    for n in range(2):
        kept = np.asarray(z[n]).reshape(-1, 16)[mask[n].reshape(-1)]  # (k, D) as a 1 x k grid
        ref = small_vit.head(jnp.asarray(kept)[None, None], {"cls": ctx["cls"][n:n + 1]}, at=at)
        np.testing.assert_allclose(got[n], ref[0], atol=1e-5)
    assert np.abs(got - small_vit.head(z, ctx, at=at)).max() > 1e-4  # the mask matters


def test_vit_last_block_fast_path_equals_masked_head(small_vit):
    x = jax.random.normal(jax.random.key(5), (2, 16, 16, 3))
    z, ctx = small_vit.encode(x)
    masks = jax.random.bernoulli(jax.random.key(6), 0.6, (3, 2, 4, 4))  # (B, N, H', W')
    generic = jnp.stack([small_vit.head(z, ctx, token_mask=m) for m in masks])
    cache = small_vit.last_block_cache(z, ctx)
    np.testing.assert_allclose(small_vit.last_block_logits(cache, masks), generic, atol=1e-5)
    one = small_vit.last_block_cache(z[1], {"cls": ctx["cls"][1]})  # one image, masks (B, H', W')
    np.testing.assert_allclose(small_vit.last_block_logits(one, masks[:, 1]), generic[:, 1], atol=1e-5)
    sm, params = models.split(small_vit)
    fast = jax.jit(sm.last_block_logits)(params, jax.jit(sm.last_block_cache)(params, z, ctx), masks)
    np.testing.assert_allclose(fast, generic, atol=1e-5)
    with pytest.raises(FgvceError, match="block2"):
        small_vit.last_block_cache(z, ctx, at="block0")
    # The split view offers the fast path only where it applies.
    assert models.split(small_vit, "block0")[0].last_block_cache(params, z, ctx) is None
    tiny_split, tiny_params = models.split(models.create("resnet_tiny", 3), "layer4")
    assert tiny_split.last_block_cache(tiny_params, jnp.zeros((1, 8, 8, 128)), {}) is None
