"""Morphometrics on constructed shapes whose true values are known analytically.

Shapes are anti-aliased: each pixel's grey level is the covered fraction of its 8x8 sub-pixels. Tolerances
follow from the measurement's resolution: thickness is read on a 4x upsampled grid (1/4 px steps), and
width/height keep the central 98% of the mass, so a solid extent L measures 0.98 L, give or take 1 px: a
partly covered edge pixel spreads its mass over its whole width (``EXTENT_TOL``).
"""
import numpy as np
import pytest

from fgvce_jax import morphometrics as morpho
from fgvce_jax.errors import FgvceError

RESOLUTION = 1.0 / morpho.SCALE
EXTENT_TOL = 1.0


def coverage(inside, h: int, w: int, k: int = 8) -> np.ndarray:
    """(h, w) float image in [0, 1]: fraction of each pixel's k x k sub-pixel centres (x=col, y=row) inside."""
    y, x = np.mgrid[0:h * k, 0:w * k]
    return inside((x + 0.5) / k, (y + 0.5) / k).reshape(h, k, w, k).mean(axis=(1, 3))


def disc(r: float, size: int = 40) -> np.ndarray:
    return coverage(lambda x, y: (x - size / 2) ** 2 + (y - size / 2) ** 2 <= r * r, size, size)


def bar(width: float, length: float, theta: float = 0.0, size: int = 64) -> np.ndarray:
    """An upright bar (``width`` across, ``length`` tall) sheared by c -> c - tan(theta) (r - r_mid), or, for
    theta=None, a horizontal bar of ``length`` by ``width``."""
    mid = size / 2
    if theta is None:
        return coverage(lambda x, y: (np.abs(y - mid) <= width / 2) & (np.abs(x - mid) <= length / 2), size, size)
    t = np.tan(theta)
    return coverage(lambda x, y: (np.abs(x - mid + t * (y - mid)) <= width / 2) & (np.abs(y - mid) <= length / 2),
                    size, size)


@pytest.mark.parametrize("r", [4.0, 6.0, 9.0])
def test_disc_thickness_is_its_diameter_and_area_pi_r_squared(r):
    m = morpho.measure(disc(r))
    assert abs(m["thickness"] - 2 * r) <= 2 * RESOLUTION  # the skeleton is the centre, up to a sub-pixel
    assert abs(m["area"] - np.pi * r * r) <= 0.03 * np.pi * r * r
    assert abs(m["slant"]) < 1e-6
    assert abs(m["width"] - m["height"]) < 1e-6


@pytest.mark.parametrize("w", [2.0, 3.0, 5.0])
def test_horizontal_bar_thickness_is_its_width(w):
    length = 40.0
    m = morpho.measure(bar(w, length, theta=None))
    assert abs(m["thickness"] - w) <= RESOLUTION
    assert abs(m["area"] - w * length) <= 0.02 * w * length
    assert abs(m["width"] - 0.98 * length) <= EXTENT_TOL and abs(m["height"] - 0.98 * w) <= EXTENT_TOL
    assert abs(m["slant"]) < 1e-6


@pytest.mark.parametrize("theta", [-0.4, 0.2, 0.5])
def test_sheared_bar_slant_is_the_shear_angle(theta):
    w, length = 4.0, 24.0
    m = morpho.measure(bar(w, length, theta))
    assert abs(m["slant"] - theta) <= 0.01  # radians; positive = top leans right (Morpho-MNIST's sign)
    assert abs(m["height"] - 0.98 * length) <= EXTENT_TOL
    assert abs(m["width"] - 0.98 * w) <= EXTENT_TOL  # in the de-slanted frame: the bar's own width


def test_intensity_is_the_stroke_grey_level_and_other_features_ignore_it():
    full, dim = morpho.measure(disc(8.0)), morpho.measure(0.5 * disc(8.0))
    assert 0.9 <= full["intensity"] <= 1.0  # only the anti-aliased rim is below 1
    assert dim["intensity"] == pytest.approx(0.5 * full["intensity"], rel=1e-9)
    for f in ("thickness", "slant", "width", "height", "area"):
        assert dim[f] == pytest.approx(full[f], rel=1e-9, abs=1e-9)


def test_a_uniform_background_changes_only_the_intensity():
    shape = bar(3.0, 20.0, 0.3, size=28)
    plain, lifted = morpho.measure(shape), morpho.measure(0.2 + 0.8 * shape)
    for f in ("thickness", "slant", "width", "height", "area"):
        assert lifted[f] == pytest.approx(plain[f], rel=1e-9, abs=1e-9)
    assert lifted["intensity"] == pytest.approx(0.2 + 0.8 * plain["intensity"], rel=1e-9)


def test_a_stroke_one_row_tall_has_slant_zero_and_height_one_row():
    line = np.zeros((28, 28))
    line[14, 4:24] = 1.0
    m = morpho.measure(line)
    assert m["slant"] == 0.0 and abs(m["height"] - 0.98) < 1e-9 and abs(m["width"] - 0.98 * 20) < 1e-9


def test_uint8_rgb_and_float_grey_agree_and_measure_all_stacks_in_feature_order():
    grey = np.rint(255 * bar(3.0, 20.0, 0.3, size=28)).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    a, b = morpho.measure(grey), morpho.measure(rgb)
    c = morpho.measure(grey / 255.0)
    for f in morpho.FEATURES:
        assert a[f] == pytest.approx(b[f], rel=1e-9, abs=1e-12) and a[f] == pytest.approx(c[f], rel=1e-9, abs=1e-12)
    table = morpho.measure_all(np.stack([grey, np.rint(255 * disc(6.0, size=28)).astype(np.uint8)]))
    assert table.shape == (2, len(morpho.FEATURES)) and table.dtype == np.float64
    assert np.allclose(table[0], [a[f] for f in morpho.FEATURES])


@pytest.mark.parametrize("image, words", [
    (np.zeros((28, 28)), "constant"),
    (np.zeros((2, 28, 28, 3)), "(H, W) or (H, W, C)"),
])
def test_bad_images_are_one_line_errors(image, words):
    with pytest.raises(FgvceError) as err:
        morpho.measure(image)
    assert words in str(err.value) and "\n" not in str(err.value)
