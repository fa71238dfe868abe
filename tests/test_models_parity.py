"""Parity with torchvision: random models in eval mode with randomised BatchNorm/LayerNorm statistics.

Logits within 1e-4 max abs, and ``features`` at every split point equal to the
torchvision intermediate (forward hooks), under highest matmul precision.
"""
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import converters
from fgvce_jax.models import preprocess
from fgvce_jax.models.vgg import adaptive_avg_pool

ATOL = 1e-4


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Eval mode, BatchNorm running stats and norm affine params randomised so they matter,
    and the classifier scaled so that logits are O(1-10) (the 1e-4 check is then meaningful)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.copy_(0.25 + 0.5 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        if isinstance(model, torchvision.models.VGG):  # torchvision's N(0, 0.01) makes the MLP output ~constant
            for m in linears[:-1]:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.in_features) ** 0.5)
        linears[-1].weight.copy_(4 * torch.randn(linears[-1].weight.shape, generator=g) / linears[-1].in_features**0.5)
        if isinstance(model, torchvision.models.VisionTransformer):
            model.class_token.copy_(torch.randn(model.class_token.shape, generator=g))
    return model.eval()


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def run_with_hooks(tm, x, modules: dict, pre: bool = False):
    """torchvision logits and {name: output (or input, if pre) of modules[name]}."""
    seen, handles = {}, []
    for name, mod in modules.items():
        if pre:
            handles.append(mod.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0])))
        else:
            handles.append(mod.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, out)))
    with torch.inference_mode():
        logits = tm(nchw(x)).numpy()
    for h in handles:
        h.remove()
    return logits, seen


def check_cnn(arch: str, size: int, num_classes: int = 7):
    tm = randomized(getattr(torchvision.models, arch)(num_classes=num_classes))
    model = converters.convert(arch, tm.state_dict())
    x = images(2, size)
    if arch.startswith("resnet"):
        hooks = {"layer3": tm.layer3, "layer4.0": tm.layer4[0], "layer4": tm.layer4}
    else:
        hooks = {"features": tm.features}
    ref, seen = run_with_hooks(tm, x, hooks)
    assert set(hooks) == set(model.split_points)
    assert np.abs(ref).max() > 0.5  # logits large enough for the 1e-4 check to mean something
    np.testing.assert_allclose(model(x), ref, atol=ATOL, rtol=0)
    for at in model.split_points:
        z, ctx = model.encode(x, at)
        np.testing.assert_allclose(z, nhwc(seen[at]), atol=ATOL, rtol=1e-5, err_msg=at)
        np.testing.assert_allclose(model.head(z, ctx, at=at), ref, atol=ATOL, rtol=0, err_msg=at)


def check_vit(arch: str, image_size: int, num_classes: int = 7, splits=None):
    tm = randomized(getattr(torchvision.models, arch)(num_classes=num_classes, image_size=image_size))
    model = converters.convert(arch, tm.state_dict())
    x = images(2, image_size)
    layers = list(tm.encoder.layers)
    ref, seen = run_with_hooks(tm, x, {f"block{i}": layer for i, layer in enumerate(layers)}, pre=True)
    assert len(model.split_points) == len(layers) and model.default_split == f"block{len(layers) - 1}"
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(model(x), ref, atol=ATOL, rtol=0)
    g = image_size // model.patch_size
    for at in splits or model.split_points:
        z, ctx = model.encode(x, at)
        tokens = seen[at].numpy()
        np.testing.assert_allclose(z, tokens[:, 1:].reshape(2, g, g, -1), atol=ATOL, rtol=1e-5, err_msg=at)
        np.testing.assert_allclose(ctx["cls"], tokens[:, 0], atol=ATOL, rtol=1e-5, err_msg=at)
        np.testing.assert_allclose(model.head(z, ctx, at=at), ref, atol=ATOL, rtol=0, err_msg=at)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_parity(arch):
    check_cnn(arch, 64)


def test_vgg16_bn_parity():
    check_cnn("vgg16_bn", 64)  # 2x2 features, upsampled to 7x7 by the adaptive pool


@pytest.mark.parametrize("n_in", [1, 2, 3, 7, 9, 14])
def test_adaptive_avg_pool_matches_torch(n_in):
    z = np.random.default_rng(n_in).normal(size=(2, n_in, n_in + 1, 3)).astype(np.float32)
    ref = nhwc(torch.nn.AdaptiveAvgPool2d((7, 7))(nchw(z)))
    np.testing.assert_allclose(adaptive_avg_pool(z, (7, 7)), ref, atol=1e-6)


def test_vit_b_16_parity():
    # torchvision's ViT-B/16 structure at 64 px (a 4x4 patch grid) keeps the test fast.
    check_vit("vit_b_16", 64, splits=["block0", "block6", "block11"])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet34", "resnet101", "resnet152"])
def test_resnet_parity_large(arch):
    check_cnn(arch, 64)


@pytest.mark.slow
def test_vgg16_bn_parity_448():
    check_cnn("vgg16_bn", 448)  # 14x14 features, 2x2 average pool


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit_b_32", "vit_l_16"])
def test_vit_parity_large(arch):
    check_vit(arch, 64)


@pytest.mark.slow
def test_vit_b_16_parity_224():
    check_vit("vit_b_16", 224, splits=["block11"])


@pytest.mark.parametrize("wh,size,crop", [((97, 61), 32, 28), ((50, 80), 64, 56), ((300, 200), 256, 224)])
def test_eval_transform_matches_torchvision(wh, size, crop):
    rng = np.random.default_rng(sum(wh))
    img = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    t = torchvision.transforms
    tv = t.Compose([t.Resize(size), t.CenterCrop(crop), t.ToTensor(),
                    t.Normalize(preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)])
    ref = tv(img).permute(1, 2, 0).numpy()
    got = preprocess.eval_transform([img, np.asarray(img)], size=size, crop=crop)
    assert got.shape == (2, crop, crop, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], ref, atol=1e-5)
    np.testing.assert_allclose(got[1], ref, atol=1e-5)
