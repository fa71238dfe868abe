"""Local Shapley sampled to a standard-error tolerance (fgvce_jax.shapley.local_tolerance)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgvce_jax.keys import row_keys
from fgvce_jax import saliency
from fgvce_jax.errors import FgvceError
from fgvce_jax.models import create, split
from fgvce_jax.shapley import local
from fgvce_jax.shapley.local_tolerance import local_to_tolerance
from fgvce_jax.sharding import device_mesh
from test_shapley_local import per_window_reference, sigmoid_game

GRID = (3, 4)


def additive_game(grid):
    a = jax.random.normal(jax.random.key(3), grid)
    return lambda m: (m * a).sum((1, 2))


def test_an_easy_game_stops_after_two_rounds_with_exact_values():
    """An additive game has one marginal per window: zero variance, so two rounds settle every window."""
    game = additive_game(GRID)
    out = local_to_tolerance(game, GRID, kernel=3, tolerance=1e-4, key=jax.random.key(0), max_samples=64,
                             round_samples=4)
    np.testing.assert_array_equal(np.asarray(out.samples), np.full(GRID, 8))
    np.testing.assert_allclose(out.phi, per_window_reference(game, GRID, 3, "absent"), atol=1e-5)


def test_reaches_the_requested_standard_error_on_a_game_with_a_known_answer():
    """Sigmoid of a neighbour game: over 24 keys the error of each window is within its requested tolerance
    in the root-mean-square sense (tolerance = target se), and windows with more variance draw more."""
    game = sigmoid_game(GRID)
    exact = per_window_reference(game, GRID, 3, "absent")
    tol = 2e-3
    outs = [local_to_tolerance(game, GRID, kernel=3, tolerance=tol, key=jax.random.key(k), max_samples=4096,
                               round_samples=8) for k in range(24)]
    err = np.stack([np.asarray(o.phi) - exact for o in outs])
    samples = np.stack([np.asarray(o.samples) for o in outs])
    assert samples.max() < 4096  # every window settled before the cap
    rms = np.sqrt((err ** 2).mean(0))
    assert np.all(rms <= 1.6 * tol), rms.max()
    assert samples.min() < samples.max()  # the sample size adapts per window
    # a tenfold looser tolerance stops much earlier
    loose = local_to_tolerance(game, GRID, kernel=3, tolerance=10 * tol, key=jax.random.key(0), max_samples=4096,
                               round_samples=8)
    assert np.asarray(loose.samples).sum() < samples[0].sum() / 4


def test_the_cap_bounds_the_samples():
    game = sigmoid_game(GRID)
    out = local_to_tolerance(game, GRID, kernel=3, tolerance=1e-9, key=jax.random.key(0), max_samples=20,
                             round_samples=8)
    np.testing.assert_array_equal(np.asarray(out.samples), np.full(GRID, 20))


def test_results_do_not_depend_on_the_bucket():
    game = sigmoid_game(GRID)
    outs = [local_to_tolerance(game, GRID, kernel=3, tolerance=3e-3, key=jax.random.key(5), max_samples=512,
                               round_samples=4, bucket=b) for b in (1, 5, 12)]
    for o in outs[1:]:
        np.testing.assert_array_equal(np.asarray(o.samples), np.asarray(outs[0].samples))
        np.testing.assert_allclose(np.asarray(o.phi), np.asarray(outs[0].phi), rtol=0, atol=1e-7)


def test_batched_maps_bit_identical_on_1_and_4_devices_and_equal_to_single_games():
    sm, params = split(create("resnet_tiny", num_classes=5, seed=1), at="layer4.0")
    z = jax.random.uniform(jax.random.key(2), (3, 4, 4, 128))
    classes = jnp.array([0, 3, 1])
    runs = [saliency.compute_to_tolerance(sm, params, z, {}, classes, tolerance=5e-3, key=jax.random.key(7),
                                          max_samples=32, round_samples=4,
                                          mesh=jax.make_mesh((d,), ("d",), devices=jax.devices()[:d],
                                                             axis_types=(jax.sharding.AxisType.Auto,)))
            for d in (1, 4)]
    np.testing.assert_array_equal(np.asarray(runs[0].phi), np.asarray(runs[1].phi))
    np.testing.assert_array_equal(np.asarray(runs[0].samples), np.asarray(runs[1].samples))
    game = saliency.batch_games(sm, params, z[1:2], {}, classes[1:2], "zero", "prob")
    one = local_to_tolerance(lambda m: game[0]({**game[2], **jax.tree.map(lambda a: a[0], game[1])}, m), (4, 4),
                             kernel=3, tolerance=5e-3, key=row_keys(jax.random.key(7), 3)[1],
                             max_samples=32, round_samples=4)
    np.testing.assert_allclose(np.asarray(one.phi), np.asarray(runs[0].phi[1]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(one.samples), np.asarray(runs[0].samples[1]))


@pytest.mark.parametrize("kw, match", [({"tolerance": 0.0}, "positive finite"),
                                       ({"tolerance": float("nan")}, "positive finite"),
                                       ({"round_samples": 7}, "even"),
                                       ({"round_samples": 64, "max_samples": 32}, "draws per round")])
def test_bad_settings_are_one_line_errors(kw, match):
    args = {"kernel": 3, "tolerance": 1e-3, "key": jax.random.key(0), "max_samples": 32, "round_samples": 8, **kw}
    with pytest.raises(FgvceError, match=match):
        local_to_tolerance(additive_game(GRID), GRID, **args)


def test_counterfactual_config_phi_tolerance_drives_the_query_phi():
    from fgvce_jax.counterfactual import CounterfactualConfig, FeatureBatch, explain

    sm, params = split(create("resnet_tiny", num_classes=5, seed=1), at="layer4.0")
    z = jax.random.uniform(jax.random.key(4), (4, 4, 4, 128))
    preds = np.asarray(sm.head(params, z).argmax(-1))
    labels = (preds + 1) % 5
    batch = FeatureBatch(z[:1], {}, labels[:1], preds[:1], z[:1].mean((1, 2)))
    refs = FeatureBatch(z, {}, preds, preds, z.mean((1, 2)))
    config = CounterfactualConfig(samples=64, t_max=1, phi_tolerance=1e-2)
    key = jax.random.key(9)
    got = explain(sm, params, batch, refs, config, key=key)
    want = saliency.compute_to_tolerance(sm, params, z[:1], {}, preds[:1], tolerance=1e-2, max_samples=64,
                                         round_samples=8, key=jax.random.split(key)[0])
    np.testing.assert_allclose(np.asarray(got.query_phi), np.asarray(want.phi), atol=1e-6)
    assert np.asarray(want.samples).min() < 64  # some windows stopped early: not the fixed-samples map
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(FgvceError, match="--phi-tolerance"):
            CounterfactualConfig(phi_tolerance=bad)
