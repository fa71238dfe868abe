"""Screened local Phi (``fgvce_jax.shapley.local_screening``): the full estimate at the kept windows, the
cheap pass elsewhere, chosen from the cheap pass; invariant to devices and chunks; off when it does not pay."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax import saliency
from fgvce_jax.keys import row_keys
from fgvce_jax.counterfactual.config import CounterfactualConfig
from fgvce_jax.counterfactual.config import screened
from fgvce_jax.counterfactual.explain import saliency_settings
from fgvce_jax.errors import FgvceError
from fgvce_jax.models import create, split
from fgvce_jax.shapley import local_screening as ls

KEY = jax.random.key(0)


@dataclasses.dataclass(frozen=True)
class GapLinear:
    """GAP + linear head: the affine (window-at-a-time) path."""

    family = "resnet"
    num_classes: int = 5

    def head(self, params, z, ctx=None, token_mask=None):
        return z.mean((1, 2)) @ params["W"] + params["b"]

    def linear_head(self, params):
        return params["W"], params["b"]


def _deep():
    """resnet_tiny cut at layer4.0 (a spatial, croppable head: the generic item path), 4 x 4 maps."""
    sm, params = split(create("resnet_tiny", num_classes=5, seed=1), at="layer4.0")
    z = jax.nn.relu(jax.random.normal(jax.random.key(3), (3, 4, 4, 128)))
    return sm, params, z


def _affine():
    w = jax.random.normal(jax.random.key(4), (6, 5))
    params = {"W": w, "b": jnp.zeros(5)}
    z = jax.nn.relu(jax.random.normal(jax.random.key(5), (3, 5, 6, 6)))
    return GapLinear(), params, z


@pytest.mark.parametrize("make", [_deep, _affine], ids=["generic", "affine"])
def test_screened_map_is_the_full_map_at_the_kept_windows_and_the_cheap_map_elsewhere(make):
    sm, params, z = make()
    classes = jnp.array([0, 3, 1])
    kw = dict(kernel=3, key=KEY)
    full = np.asarray(saliency.compute(sm, params, z, {}, classes, samples=16, **kw))
    screen_keys = jax.vmap(ls.screen_key)(row_keys(KEY, 3))  # image i's first pass: screen_key of its key
    cheap = np.asarray(saliency.compute(sm, params, z, {}, classes, samples=2, kernel=3, keys=screen_keys))
    got = np.asarray(saliency.compute(sm, params, z, {}, classes, samples=16, screen_samples=2, screen_keep=4, **kw))
    n, h, w = full.shape
    for i in range(n):
        kept = np.argsort(-cheap[i].ravel(), kind="stable")[:4]  # the 4 largest cheap values, ties to lower index
        flat_got, flat_full, flat_cheap = got[i].ravel(), full[i].ravel(), cheap[i].ravel()
        np.testing.assert_allclose(flat_got[kept], flat_full[kept], rtol=1e-5, atol=1e-7)
        rest = np.setdiff1d(np.arange(h * w), kept)
        np.testing.assert_array_equal(flat_got[rest], flat_cheap[rest])
        assert not np.allclose(flat_cheap[kept], flat_full[kept], atol=1e-7)  # the kept values did change
    assert np.abs(full).max() > 1e-4


def test_screening_does_not_depend_on_devices_or_chunks():
    sm, params, z = _deep()
    classes = jnp.array([2, 0, 4])
    one = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    kw = dict(kernel=3, samples=8, key=KEY, screen_samples=2, screen_keep=5)
    ref = saliency.compute(sm, params, z, {}, classes, mesh=one, **kw)
    assert jax.device_count() == 4
    np.testing.assert_array_equal(saliency.compute(sm, params, z, {}, classes, **kw), ref)
    np.testing.assert_allclose(saliency.compute(sm, params, z, {}, classes, chunk_size=12, **kw), ref, atol=1e-6)


def test_screening_that_would_not_save_evaluations_is_the_unscreened_map():
    sm, params, z = _affine()
    classes = jnp.array([0, 1, 2])
    full = saliency.compute(sm, params, z, {}, classes, kernel=3, samples=8, key=KEY)
    # 30 windows: 30 x 6 + 8 x 8 > 30 x 8 does not pay, keeping every window never does, nor a first pass of M
    for m0, keep in ((6, 8), (2, 30), (2, 100), (8, 1), (10, 1)):
        assert not ls.saves(30, keep, m0, 8)
        np.testing.assert_array_equal(saliency.compute(sm, params, z, {}, classes, kernel=3, samples=8, key=KEY,
                                                       screen_samples=m0, screen_keep=keep), full)
    assert ls.saves(30, 20, 2, 8)  # 60 + 160 < 240


def test_select_windows_takes_the_largest_with_ties_to_the_lower_index_sorted_by_position():
    phi0 = jnp.array([[[0.1, 0.5, 0.5], [0.9, -1.0, 0.5]]])  # (1, 2, 3)
    np.testing.assert_array_equal(ls.select_windows(phi0, 3), [[1, 2, 3]])  # 0.9, then the first two 0.5s
    merged = ls.merge(phi0, jnp.array([[1, 3]]), jnp.array([[7.0, 8.0]]))
    np.testing.assert_array_equal(merged, np.float32([[[0.1, 7.0, 0.5], [8.0, -1.0, 0.5]]]))


@pytest.mark.parametrize("m0, keep, match", [(3, 4, "an even integer"), (0, 4, "at least 2"),
                                             (2, 0, "positive integer")])
def test_bad_screening_requests_are_clear_errors(m0, keep, match):
    sm, params, z = _affine()
    with pytest.raises(FgvceError, match=match):
        saliency.compute(sm, params, z, {}, jnp.array([0, 1, 2]), samples=8, key=KEY, screen_samples=m0,
                         screen_keep=keep)


def test_config_keeps_margin_times_the_regions_each_map_gives_and_validates():
    c = CounterfactualConfig(samples=32, screen_samples=8, screen_margin=3, max_regions=8,
                             candidates_per_reference=4, region_size=2)
    assert saliency_settings(c, "query")["screen_keep"] == 3 * 8 * 4
    assert saliency_settings(c, "reference")["screen_keep"] == 3 * 4 * 4
    default = saliency_settings(CounterfactualConfig())  # on by default, M0 = 4, margin 3, K = 4 candidates
    assert (default["screen_samples"], default["screen_keep"]) == (4, 12)
    for off in (CounterfactualConfig(screen_samples=None), CounterfactualConfig(phi_tolerance=0.1),
                CounterfactualConfig(method="gradient")):
        assert "screen_samples" not in (saliency_settings(off) or {}) and not screened(off)
    for bad, match in (({"screen_samples": 7}, "even integer"), ({"screen_samples": 0}, "at least 2"),
                       ({"screen_samples": 4, "screen_margin": 0}, "screen_margin \\(--screen-margin\\) must be a positive")):
        with pytest.raises(FgvceError, match=match):
            CounterfactualConfig(**bad)


def test_the_command_line_screens_by_default_except_under_a_tolerance_and_0_turns_it_off():
    from argparse import Namespace

    from fgvce_jax.commands.explain import screen_from_args

    assert screen_from_args(Namespace(screen_samples=None, phi_tolerance=None)) == 4
    assert screen_from_args(Namespace(screen_samples=None, phi_tolerance=0.1)) is None
    assert screen_from_args(Namespace(screen_samples=0, phi_tolerance=None)) is None
    assert screen_from_args(Namespace(screen_samples=8, phi_tolerance=None)) == 8
    with pytest.raises(FgvceError, match="--screen and --phi-tolerance cannot be combined"):
        screen_from_args(Namespace(screen_samples=4, phi_tolerance=0.1))
