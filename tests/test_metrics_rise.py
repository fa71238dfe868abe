"""RISE deletion / insertion: closed forms, torch references and invariances."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from fgvce_jax.errors import FgvceError
from fgvce_jax.metrics import rise

S = 8  # image side
EVIDENCE = (slice(0, 4), slice(0, 4))  # the 4x4 pixel block the evidence model reads


def evidence_predict(images):
    """p_1 = 0.1 + 0.8 * mean(channel 0 over the top-left 4x4 block), p_0 = 1 - p_1."""
    s = images[:, EVIDENCE[0], EVIDENCE[1], 0].mean((1, 2))
    p1 = 0.1 + 0.8 * s
    return jnp.stack([1 - p1, p1], -1)


def constant_predict(images):
    return jnp.broadcast_to(jnp.array([0.3, 0.7]), (images.shape[0], 2))


def _softmax_linear(w, images):
    """A linear softmax classifier on the flattened image (w: (S*S*3, C))."""
    return jax.nn.softmax(images.reshape(images.shape[0], -1) @ w, -1)


def evidence_image():
    img = np.zeros((1, S, S, 3), np.float32)
    img[0, EVIDENCE[0], EVIDENCE[1], 0] = 1.0
    return img


def evidence_saliency(sign=1.0):
    """(1, 4, 4) map: +1 on the 2x2 cells covering the evidence block (2x upsampling), 0 elsewhere."""
    sal = np.zeros((1, 4, 4), np.float32)
    sal[0, :2, :2] = 1.0
    return sign * sal


def gkern(klen=11, nsig=5.0):
    """RISE's kernel (eclique/RISE ``evaluation.py``), rebuilt independently: SciPy's gaussian_filter of a
    centred delta, SciPy defaults (truncate 4, mode reflect)."""
    inp = np.zeros((klen, klen))
    inp[klen // 2, klen // 2] = 1
    return gaussian_filter(inp, nsig)


def torch_blur(images):
    """Reference blur: RISE's gkern(11, 5), zero padding 5, torch conv2d per channel."""
    k2 = torch.tensor(gkern(), dtype=torch.float64)[None, None].repeat(3, 1, 1, 1)
    t = torch.tensor(np.asarray(images), dtype=torch.float64).permute(0, 3, 1, 2)
    return F.conv2d(t, k2, padding=5, groups=3).permute(0, 2, 3, 1).numpy()


def test_auc_is_the_trapezoid_by_hand():
    # x = 0, 1/2, 1; areas 0.5*(0+1)/2 + 0.5*(1+0.5)/2 = 0.625
    assert float(rise.auc(jnp.array([0.0, 1.0, 0.5]))) == pytest.approx(0.625)
    y = np.random.default_rng(0).random((3, 11))
    np.testing.assert_allclose(rise.auc(y), np.trapezoid(y, np.linspace(0, 1, 11), axis=-1), rtol=1e-6)


def test_constant_model_gives_its_probability():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, S, S, 3)).astype(np.float32)
    sal = rng.normal(size=(3, 4, 4)).astype(np.float32)
    c = rise.deletion_insertion(constant_predict, images, sal, np.array([0, 1, 1]), steps=5)
    np.testing.assert_allclose(c.deletion_auc, [0.3, 0.7, 0.7], rtol=1e-6)
    np.testing.assert_allclose(c.insertion_auc, [0.3, 0.7, 0.7], rtol=1e-6)
    np.testing.assert_allclose(c.del_ins, 0, atol=1e-6)


def test_true_evidence_beats_reversed_with_closed_form_curves():
    img = evidence_image()
    cls = np.array([1])
    good = rise.deletion_insertion(evidence_predict, img, evidence_saliency(1.0), cls, steps=4)
    bad = rise.deletion_insertion(evidence_predict, img, evidence_saliency(-1.0), cls, steps=4)
    # Deletion: the 16 evidence pixels are exactly the first quarter removed (good)
    # or the last quarter (reversed).
    np.testing.assert_allclose(good.deletion[0], [0.9, 0.1, 0.1, 0.1, 0.1], atol=1e-6)
    np.testing.assert_allclose(bad.deletion[0], [0.9, 0.9, 0.9, 0.9, 0.1], atol=1e-6)
    # Insertion starts from the blurred image; only the evidence block matters.
    p_blur = 0.1 + 0.8 * torch_blur(img)[0, EVIDENCE[0], EVIDENCE[1], 0].mean()
    np.testing.assert_allclose(good.insertion[0], [p_blur, 0.9, 0.9, 0.9, 0.9], atol=1e-5)
    np.testing.assert_allclose(bad.insertion[0], [p_blur, p_blur, p_blur, p_blur, 0.9], atol=1e-5)
    assert good.del_ins[0] > bad.del_ins[0]
    # hand trapezoids of the two deletion curves: (0.9+0.1)/2/4 + 3*0.1/4 and 3*0.9/4 + (0.9+0.1)/2/4
    assert good.deletion_auc[0] == pytest.approx(0.2, abs=1e-6)
    assert bad.deletion_auc[0] == pytest.approx(0.8, abs=1e-6)


def test_blur_kernel_is_rises_gkern():
    k1 = rise.rise_kernel1d()
    np.testing.assert_allclose(np.outer(k1, k1), gkern(), rtol=1e-12, atol=1e-15)
    assert 0.087 < k1.min() < k1.max() < 0.095 and k1.sum() == pytest.approx(1.0)
    # a sampled Gaussian (the earlier kernel) is not it: its weights spread 0.066-0.109
    x = np.arange(11) - 5.0
    sampled = np.exp(-0.5 * (x / 5.0) ** 2)
    assert np.abs(np.outer(sampled, sampled) / sampled.sum() ** 2 - gkern()).max() > 1e-3


def test_blur_matches_rise_torch_reference():
    img = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    out = np.asarray(rise.blur(jnp.asarray(img)))
    np.testing.assert_allclose(out, torch_blur(img), atol=1e-5)


def test_pixel_ranks_follow_torch_bilinear_upsampling():
    sal = np.random.default_rng(2).normal(size=(3, 4, 4)).astype(np.float32)
    up = F.interpolate(torch.tensor(sal)[:, None], size=(S, S), mode="bilinear", align_corners=False)
    order = np.argsort(-up[:, 0].reshape(3, -1).numpy(), axis=-1, kind="stable")
    ranks = np.asarray(rise.pixel_ranks(jnp.asarray(sal), (S, S)))
    np.testing.assert_array_equal(np.take_along_axis(ranks, order, -1), np.tile(np.arange(S * S), (3, 1)))


def _brute_force_curve(w, images, sal, classes, mode, steps):
    """Loop over images and steps in numpy/torch: the definition of SPEC 6, written out."""
    up = F.interpolate(torch.tensor(sal)[:, None], size=(S, S), mode="bilinear", align_corners=False)
    blurred = torch_blur(images)
    out = np.zeros((len(images), steps + 1))
    for b in range(len(images)):
        order = np.argsort(-up[b, 0].numpy().ravel(), kind="stable")
        for i in range(steps + 1):
            top = np.zeros(S * S, bool)
            top[order[: (i * S * S) // steps]] = True
            top = top.reshape(S, S, 1)
            if mode == "deletion":
                x = np.where(top, 0.0, images[b])
            else:
                x = np.where(top, images[b], blurred[b])
            logits = x.reshape(-1) @ w
            p = np.exp(logits - logits.max())
            out[b, i] = (p / p.sum())[classes[b]]
    return out


@pytest.mark.parametrize("mode", rise.MODES)
def test_curves_match_brute_force(mode):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(S * S * 3, 4)).astype(np.float32) * 0.3
    images = rng.normal(size=(3, S, S, 3)).astype(np.float32)
    sal = rng.normal(size=(3, 4, 4)).astype(np.float32)
    classes = np.array([0, 2, 3])
    predict = functools.partial(_softmax_linear, jnp.asarray(w))
    got = rise.curve(predict, images, sal, classes, mode=mode, steps=6, chunk_size=5)
    np.testing.assert_allclose(got, _brute_force_curve(w, images, sal, classes, mode, 6), atol=1e-5)


def test_chunk_size_and_batch_do_not_change_curves():
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.normal(size=(S * S * 3, 3)).astype(np.float32) * 0.3)
    predict = functools.partial(_softmax_linear, w)
    images = rng.normal(size=(4, S, S, 3)).astype(np.float32)
    sal = rng.normal(size=(4, 2, 2)).astype(np.float32)
    classes = np.array([0, 1, 2, 0])
    ref = rise.curve(predict, images, sal, classes, mode="insertion", steps=7, chunk_size=32)
    assert ref.shape == (4, 8)
    for chunk in (1, 5, 100):
        np.testing.assert_allclose(rise.curve(predict, images, sal, classes, mode="insertion",
                                              steps=7, chunk_size=chunk), ref, atol=1e-6)
    alone = rise.curve(predict, images[2:3], sal[2:3], classes[2:3], mode="insertion", steps=7)
    np.testing.assert_allclose(alone[0], ref[2], atol=1e-6)


def test_bad_input_raises_fgvce_error():
    img = evidence_image()
    with pytest.raises(FgvceError, match="mode"):
        rise.curve(evidence_predict, img, evidence_saliency(), np.array([1]), mode="sideways")
    with pytest.raises(FgvceError, match="saliency"):
        rise.curve(evidence_predict, img, np.zeros((2, 4, 4)), np.array([1]))
    with pytest.raises(FgvceError, match="classes"):
        rise.curve(evidence_predict, img, evidence_saliency(), np.array([1, 0]))
    with pytest.raises(FgvceError, match="steps"):
        rise.curve(evidence_predict, img, evidence_saliency(), np.array([1]), steps=0)
