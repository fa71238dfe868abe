"""Datasets: digits, folder trees (with a corrupt file), TFDS under mock_data, errors."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from sklearn.datasets import load_digits

from fgvce_jax import data
from fgvce_jax.data.dataset import stratified_split
from fgvce_jax.errors import FgvceError


def torchvision_eval(img_uint8, resize, crop, mean, std):
    """Reference eval transform: torchvision Resize + CenterCrop + Normalize -> (S, S, 3)."""
    t = T.Compose([T.ToImage(), T.Resize(resize, antialias=True), T.CenterCrop(crop),
                   T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])
    return t(Image.fromarray(img_uint8)).permute(1, 2, 0).numpy()


# ---------------------------------------------------------------- split helper

def test_stratified_split_partitions_each_class_with_seeded_counts():
    labels = np.repeat(np.arange(4), [10, 7, 3, 1])
    train, test = stratified_split(labels, 0.3, seed=5)
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    for c, n in enumerate([10, 7, 3, 1]):
        assert np.sum(labels[test] == c) == int(round(0.3 * n))
    again = stratified_split(labels, 0.3, seed=5)
    other = stratified_split(labels, 0.3, seed=6)
    assert np.array_equal(again[1], test) and not np.array_equal(other[1], test)


# ---------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits_splits():
    return data.load("digits", "train"), data.load("digits", "test")


def test_digits_split_is_fixed_stratified_and_complete(digits_splits):
    train, test = digits_splits
    assert len(train) + len(test) == 1797
    assert 580 <= len(test) <= 610
    assert not set(train.ids) & set(test.ids)
    assert train.class_names == [str(c) for c in range(10)]
    target = load_digits().target
    index = {f"digits/{i}": i for i in range(1797)}
    assert np.array_equal(test.labels, target[[index[i] for i in test.ids]])
    frac = np.bincount(test.labels, minlength=10) / np.bincount(target, minlength=10)
    assert np.all(np.abs(frac - 1 / 3) < 0.02)
    assert np.array_equal(data.load("digits", "test").ids, test.ids)


def test_digits_images_match_torchvision_bilinear_upsampling(digits_splits):
    train, test = digits_splits
    p = train.preprocessing
    assert (p.image_size, p.resize_size) == (32, 32) and p.mean == test.preprocessing.mean
    grey = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    idx = [0, 5, 17]
    x = test.images(idx)
    assert x.shape == (3, 32, 32, 3) and x.dtype == np.float32
    for row, i in enumerate(idx):
        src = np.repeat(grey[int(test.ids[i].split("/")[1])][..., None], 3, -1)
        np.testing.assert_allclose(x[row], torchvision_eval(src, 32, 32, p.mean, p.std), atol=2e-2)
    # normalisation statistics are the train split's: about zero mean on train images
    assert abs(float(train.images(np.arange(0, len(train), 7)).mean())) < 0.1
    raw = test.raw_image(5)
    assert raw.dtype == np.uint8 and raw.shape == (32, 32, 3)
    np.testing.assert_allclose((raw / 255.0 - p.mean[0]) / p.std[0], x[1], atol=0.01 / p.std[0])


def test_digits_other_size_and_subset(digits_splits):
    big = data.load("digits", "test", image_size=64)
    assert big.images([0]).shape == (1, 64, 64, 3)
    sub = digits_splits[1].subset([4, 2])
    assert list(sub.ids) == list(digits_splits[1].ids[[4, 2]])
    np.testing.assert_array_equal(sub.images([1]), digits_splits[1].images([2]))


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("name, split, match", [
    ("mnist", "train", "unknown dataset"),
    ("digits", "validation", "no split"),
    ("cub:/nonexistent/CUB_200_2011", "train", "download CUB_200_2011"),
    ("folder:/nonexistent/dir", "train", "does not exist"),
    ("tfds:", "train", "unknown dataset"),
])
def test_bad_names_are_one_line_errors(name, split, match):
    with pytest.raises(FgvceError, match=match) as e:
        data.load(name, split)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- folder

def _write_png(path: Path, rng, size=(20, 14)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_folder_seeded_split_skips_corrupt_file_with_one_warning(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in [("zebra", 5), ("ant", 4), ("moth", 6)]:
        for k in range(n):
            _write_png(tmp_path / cls / f"{k}.png", rng)
    (tmp_path / "ant" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "moth" / "notes.txt").write_text("ignored: not an image extension")
    with pytest.warns(UserWarning) as record:
        train = data.load(f"folder:{tmp_path}", "train", image_size=16)
        test = data.load(f"folder:{tmp_path}", "test", image_size=16)
    broken = [str(w.message) for w in record if "broken.jpg" in str(w.message)]
    assert len(broken) == 1 and "skipped 1 unreadable" in broken[0]  # only the split it fell in warns
    broken_in_test = " test: " in broken[0]
    assert train.class_names == ["ant", "moth", "zebra"]
    all_ids = sorted(list(train.ids) + list(test.ids))
    expected = sorted(f"{c}/{k}.png" for c, n in [("zebra", 5), ("ant", 4), ("moth", 6)] for k in range(n))
    assert all_ids == expected
    for ds in (train, test):
        assert all(ds.class_names[y] == i.split("/")[0] for i, y in zip(ds.ids, ds.labels))
    # round(0.2 * n) per class, n = {5 (with broken.jpg), 6, 5}, before unreadable files are dropped
    assert np.array_equal(np.bincount(test.labels, minlength=3), [1 - broken_in_test, 1, 1])
    x = test.images([0])
    img = np.asarray(Image.open(tmp_path / test.ids[0]).convert("RGB"))
    np.testing.assert_allclose(x[0], torchvision_eval(img, 18, 16, data.Preprocessing.imagenet(16).mean,
                                                      data.Preprocessing.imagenet(16).std), atol=2e-2)


def test_folder_with_train_test_subfolders(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in [("train", 3), ("test", 2)]:
        for cls in ("b", "a"):
            for k in range(n):
                _write_png(tmp_path / split / cls / f"{k}.png", rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        test = data.load(f"folder:{tmp_path}", "test", image_size=8)
    assert test.class_names == ["a", "b"]
    assert list(test.ids) == ["test/a/0.png", "test/a/1.png", "test/b/0.png", "test/b/1.png"]
    assert list(test.labels) == [0, 0, 1, 1]
    assert test.raw_image(3).shape == (8, 8, 3)


def test_fingerprints_follow_the_content_and_the_models_preprocessing_wins_with_one_notice(tmp_path, capsys):
    """A folder's fingerprint is stable across loads and changes when one file is replaced under its name;
    digits' is stable and a subset has its own. Given a model's preprocessing, a source uses it, and one
    notice (per process) names the fields that differ from the source's default."""
    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        for k in range(3):
            _write_png(tmp_path / split / "a" / f"{k}.png", rng)
    name = f"folder:{tmp_path}"
    before = data.load(name, "test", image_size=8).fingerprint
    assert data.load(name, "test", image_size=8).fingerprint == before
    _write_png(tmp_path / "test" / "a" / "1.png", rng)  # the same name, other pixels
    assert data.load(name, "test", image_size=8).fingerprint != before
    digits = data.load("digits", "test")
    assert digits.fingerprint == data.load("digits", "test").fingerprint != digits.subset([0, 1]).fingerprint
    assert digits.subset([0, 1]).fingerprint == digits.subset([0, 1]).fingerprint

    model = data.Preprocessing(8, 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ds = data.load(name, "test", preprocessing=model)
    err = capsys.readouterr().err
    assert err == (f"notice: {name} is read with the model's preprocessing, not the dataset's default "
                   "(resize 9 -> 8; mean (0.485, 0.456, 0.406) -> (0.5, 0.5, 0.5); "
                   "std (0.229, 0.224, 0.225) -> (0.25, 0.25, 0.25))\n")
    assert ds.preprocessing == model
    np.testing.assert_allclose(ds.images([0])[0], (ds.raw_image(0) / 255 - 0.5) / 0.25, atol=1e-5)
    data.load(name, "train", preprocessing=model)
    data.load("digits", "test", preprocessing=digits.preprocessing)
    assert capsys.readouterr().err == ""  # said once; and nothing when the model's is the source's own


# ---------------------------------------------------------------- TFDS (mocked, no TensorFlow)

@pytest.mark.parametrize("name, n_classes", [("caltech_birds2011", 200), ("stanford_dogs", 120)])
def test_tfds_under_mock_data(name, n_classes):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load(f"tfds:{name}", "test", image_size=24)
        source = tfds.data_source(name, split="test", download=False)
        assert len(ds) == 6 and len(ds.class_names) == n_classes
        assert list(ds.labels) == [int(source[i]["label"]) for i in range(6)]
        assert len(set(ds.ids)) == 6
        x = ds.images([0, 3])
        assert x.shape == (2, 24, 24, 3) and np.isfinite(x).all()
        p = ds.preprocessing
        np.testing.assert_allclose(x[1], torchvision_eval(np.asarray(source[3]["image"]), p.resize_size, 24,
                                                          p.mean, p.std), atol=2e-2)
        assert ds.parts(0) is None


def test_tfds_not_prepared_says_how_to_build(tmp_path):
    with pytest.raises(FgvceError, match="tfds build caltech_birds2011"):
        data.load("tfds:caltech_birds2011", "train", data_dir=str(tmp_path))
    assert not any(tmp_path.rglob("*.array_record*"))  # nothing was downloaded or prepared
    with pytest.raises(FgvceError, match="unknown TFDS dataset"):
        data.load("tfds:no_such_dataset_xyz", "train", data_dir=str(tmp_path))


# ---------------------------------------------------------------- bit depths

def test_16_bit_and_float_images_are_scaled_by_their_bit_depth(tmp_path):
    """A 16-bit PNG and a float TIFF decode to the 8-bit image they stand for, not to a saturated or
    black one, and a folder dataset built from them reads them the same way."""
    ramp = np.linspace(0, 1, 40 * 40).reshape(40, 40)
    want = np.repeat(np.rint(ramp * 255).astype(np.uint8)[..., None], 3, axis=-1)
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "test" / c).mkdir(parents=True)
    Image.fromarray(np.rint(ramp * 65535).astype(np.uint16)).save(tmp_path / "train" / "a" / "g16.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "train" / "b" / "f32.tiff")
    Image.fromarray(want).save(tmp_path / "test" / "a" / "rgb8.png")
    Image.fromarray(want).save(tmp_path / "test" / "b" / "rgb8.png")
    for name in ("a/g16.png", "b/f32.tiff"):
        got = data.dataset.read_rgb(tmp_path / "train" / name)
        assert got.dtype == np.uint8 and np.abs(got.astype(int) - want).max() <= 1, name
    ds = data.load(f"folder:{tmp_path}", "train")
    assert [np.abs(ds.read(i).astype(int) - want).max() <= 1 for i in range(2)] == [True, True]


@pytest.mark.parametrize("bad, match", [(np.nan, "non-finite"), (np.inf, "non-finite"), (2.5, r"outside \[0, 1\]")])
def test_damaged_float_pixels_are_refused_naming_the_file(tmp_path, bad, match):
    pixels = np.full((8, 8), 0.5, np.float32)
    pixels[3, 4] = bad
    path = tmp_path / "damaged.tiff"
    Image.fromarray(pixels).save(path)
    with pytest.raises(FgvceError, match=match) as err:
        data.dataset.read_rgb(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
