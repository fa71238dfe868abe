"""The raw CUB_200_2011 reader on a tiny folder written here, part locations included."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from fgvce_jax import data
from fgvce_jax.data import parts as parts_lib
from fgvce_jax.errors import FgvceError

PART_NAMES = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing",
              "nape", "right eye", "right leg", "right wing", "tail", "throat"]
MERGED = ("back", "beak", "belly", "breast", "crown", "forehead", "eye", "leg", "wing", "nape", "tail", "throat")
# image id -> (relative path, class id, is_train, (height, width))
IMAGES = {
    1: ("001.Black_footed_Albatross/a_1.jpg", 1, 1, (60, 90)),
    2: ("001.Black_footed_Albatross/a_2.jpg", 1, 0, (96, 64)),
    3: ("002.Laysan_Albatross/b_3.jpg", 2, 0, (70, 70)),
    4: ("002.Laysan_Albatross/b_4.jpg", 2, 1, (50, 80)),
    5: ("002.Laysan_Albatross/b_5.jpg", 2, 0, (40, 40)),  # corrupt on disk
}


def _write_cub(root: Path, rng) -> dict:
    """Write the CUB text files and JPEGs; return {image_id: (part_ids, xy, visible)} as written."""
    (root / "parts").mkdir(parents=True)
    (root / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    (root / "images.txt").write_text("".join(f"{i} {p}\n" for i, (p, *_) in IMAGES.items()))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, (_, c, *_) in IMAGES.items()))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, (_, _, t, _) in IMAGES.items()))
    (root / "bounding_boxes.txt").write_text("".join(f"{i} 3.0 4.0 {hw[1] / 2} {hw[0] / 2}\n"
                                                     for i, (*_, hw) in IMAGES.items()))
    (root / "parts" / "parts.txt").write_text("".join(f"{k + 1} {n}\n" for k, n in enumerate(PART_NAMES)))
    written, lines = {}, []
    for i, (path, _, _, (h, w)) in IMAGES.items():
        f = root / "images" / path
        f.parent.mkdir(parents=True, exist_ok=True)
        if i == 5:
            f.write_bytes(b"\xff\xd8\xff" + bytes(20))
        else:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(f, quality=95)
        xy = np.stack([rng.uniform(0, w - 1, 15), rng.uniform(0, h - 1, 15)], 1).round(1)
        visible = rng.random(15) < 0.7
        written[i] = (np.arange(15), xy, visible)
        lines += [f"{i} {k + 1} {x if v else 0.0} {y if v else 0.0} {int(v)}\n"
                  for k, ((x, y), v) in enumerate(zip(xy, visible))]
    (root / "parts" / "part_locs.txt").write_text("".join(lines))
    return written


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    parent = tmp_path_factory.mktemp("cub")
    written = _write_cub(parent / "CUB_200_2011", np.random.default_rng(0))
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\): .*b_5\.jpg"):
        test = data.load(f"cub:{parent}", "test", image_size=32)  # the parent folder is accepted too
    train = data.load(f"cub:{parent / 'CUB_200_2011'}", "train", image_size=32)
    return parent / "CUB_200_2011", train, test, written


def test_cub_split_labels_names(cub):
    root, train, test, _ = cub
    assert train.class_names == ["Black_footed_Albatross", "Laysan_Albatross"]
    assert list(train.ids) == [IMAGES[1][0], IMAGES[4][0]] and list(train.labels) == [0, 1]
    assert list(test.ids) == [IMAGES[2][0], IMAGES[3][0]] and list(test.labels) == [0, 1]
    assert test.images([0, 1]).shape == (2, 32, 32, 3)
    assert test.preprocessing.resize_size == 37
    assert test.read(0).shape == (96, 64, 3)


def test_part_types_merge_left_and_right():
    names, types = parts_lib.merge_sides(PART_NAMES)
    assert names == MERGED
    for k, n in enumerate(PART_NAMES):
        assert names[types[k]] == n.replace("left ", "").replace("right ", "")


def _dot_position(h, w, x, y, resize, crop):
    """Where torchvision's Resize + CenterCrop moves a bright blob centred on original pixel (x, y)."""
    img = np.zeros((h, w, 3), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img[(xx - x) ** 2 + (yy - y) ** 2 <= 2.0] = 255
    out = T.Compose([T.ToImage(), T.Resize(resize, antialias=True), T.CenterCrop(crop)])(Image.fromarray(img))
    a = out[0].to(torch.float32).numpy()
    if a.max() < 40:
        return None  # cropped away
    r, c = np.mgrid[:crop, :crop]
    return np.array([(a * c).sum() / a.sum(), (a * r).sum() / a.sum()])  # centroid (x, y)


@pytest.mark.parametrize("image_id", [1, 2, 4])
def test_part_points_follow_torchvision_resize_and_crop(image_id):
    h, w = IMAGES[image_id][3]
    rng = np.random.default_rng(image_id)
    for x, y in zip(rng.integers(3, w - 3, 12), rng.integers(3, h - 3, 12)):
        expected = _dot_position(h, w, x, y, 37, 32)
        got = parts_lib.transform_points(np.array([[x + 0.5, y + 0.5]]), h, w, 37, 32)[0] - 0.5
        if expected is None:
            assert not np.all((got >= 1) & (got < 31))
        elif np.all((got > 2) & (got < 30)):  # blobs cut by the crop edge shift their centroid
            np.testing.assert_allclose(got, expected, atol=0.1)


def test_part_annotation_visible_only_and_rasterised(cub):
    root, train, test, written = cub
    for ds, image_ids in ((train, [1, 4]), (test, [2, 3])):
        for i, image_id in enumerate(image_ids):
            ann = ds.parts(i)
            part_ids, xy, visible = written[image_id]
            h, w = IMAGES[image_id][3]
            assert ann.names == MERGED and ann.image_size == 32
            _, type_of = parts_lib.merge_sides(PART_NAMES)
            assert list(ann.types) == list(type_of[part_ids[visible]])
            np.testing.assert_allclose(ann.xy, parts_lib.transform_points(xy[visible], h, w, 37, 32))
            # brute force: a cell holds type k iff some visible part of type k lies in its pixel box
            for shape in ((8, 8), (4, 2)):
                grid = ann.grid(shape)
                assert grid.shape == (12, *shape) and grid.dtype == bool
                expected = np.zeros_like(grid)
                for t, (px, py) in zip(ann.types, ann.xy):
                    for r in range(shape[0]):
                        for c in range(shape[1]):
                            if (r * 32 / shape[0] <= py < (r + 1) * 32 / shape[0]
                                    and c * 32 / shape[1] <= px < (c + 1) * 32 / shape[1]):
                                expected[t, r, c] = True
                np.testing.assert_array_equal(grid, expected)
            # the bird box (x, y, w/2, h/2 as written) through the same geometry
            box = parts_lib.transform_points(np.array([[3.0, 4.0], [3.0 + w / 2, 4.0 + h / 2]]), h, w, 37, 32)
            np.testing.assert_allclose(ann.bbox, box.reshape(4))
    assert data.load("digits", "test").parts(0) is None


def test_cub_folder_missing_a_file_names_it(tmp_path):
    root = tmp_path / "CUB_200_2011"
    _write_cub(root, np.random.default_rng(1))
    (root / "parts" / "part_locs.txt").unlink()
    with pytest.raises(FgvceError, match="parts/part_locs.txt"):
        data.load(f"cub:{root}", "train")
