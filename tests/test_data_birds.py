"""The embedded ``birds`` dataset: determinism, masks against pixels, causes, and the CUB export."""
import dataclasses
import itertools

import numpy as np
import pytest
from fake_explanations import explanations

from fgvce_jax import data
from fgvce_jax.data import birds
from fgvce_jax.data import parts as parts_lib
from fgvce_jax.errors import FgvceError
from fgvce_jax.metrics.parts import part_metrics

SOLID = {"body": lambda t: t, "head": lambda t: t, "beak": lambda t: "beak", "tail": lambda t: "tail",
         "leg": lambda t: t}  # parts painted in one colour: part -> type name -> colour name


def test_same_seed_same_images_other_seed_other_images():
    for k in (0, 17, 40):
        a = birds.render(birds.CLASS_TYPES[birds.label_of(k)], birds.nuisance_of(k), 64)
        b = birds.render(birds.CLASS_TYPES[birds.label_of(k)], birds.nuisance_of(k), 64)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(birds.sample(k)[0], a[0])
        assert birds.nuisance_of(k, seed=1) != birds.nuisance_of(k)
        assert not np.array_equal(birds.sample(k, seed=1)[0], a[0])


def test_splits_classes_and_sizes():
    train, test = data.load("birds", "train"), data.load("birds", "test")
    assert len(train) == 1200 and len(test) == 400 and train.class_names == birds.CLASS_NAMES
    assert len(set(train.class_names)) == 16
    np.testing.assert_array_equal(np.bincount(train.labels), np.full(16, 75))
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(16, 25))
    assert not set(train.ids) & set(test.ids)
    assert test.images([0, 5]).shape == (2, 64, 64, 3) and test.read(0).dtype == np.uint8
    big = data.load("birds", "test", image_size=96)
    assert big.read(0).shape == (96, 96, 3) and big.parts(0).image_size == 96
    with pytest.raises(FgvceError, match="no split 'val'"):
        data.load("birds", "val")


def test_masks_agree_with_pixels_and_keypoints_lie_inside():
    ds = birds.load("train", samples_per_class=4)
    for i in range(len(ds)):
        k = birds.sample_index(ds.ids[i])
        image, masks = birds.sample(k)
        nuisance = birds.nuisance_of(k)
        assert masks.shape == (7, 64, 64) and (masks.sum(0) <= 1).all()  # one top layer per pixel
        types = birds.CLASS_TYPES[ds.labels[i]]
        for p, part in enumerate(birds.PARTS):
            if part in SOLID and masks[p].any():  # every pixel of the mask has the part's colour (after the gain)
                rgb = np.asarray(birds._COLOURS[SOLID[part](birds.TYPES[part][types[p]])], float)
                expected = np.rint(np.clip(rgb * np.asarray(nuisance.gain), 0, 255))
                np.testing.assert_array_equal(image[masks[p]], np.broadcast_to(expected, (masks[p].sum(), 3)))
        ann = ds.parts(i)
        xy, visible = birds.keypoints(masks)
        assert ann.names == birds.PARTS
        np.testing.assert_array_equal(ann.types, np.flatnonzero(masks.any((1, 2))))
        for t, (x, y) in zip(ann.types, ann.xy):
            assert masks[t, int(y), int(x)], (i, birds.PARTS[t])
        assert (visible == masks.any((1, 2))).all()
        np.testing.assert_array_equal(ds.part_masks(i), masks)
    sub = ds.subset([5, 2])
    np.testing.assert_array_equal(sub.part_masks(0), ds.part_masks(5))
    assert ds.part_names == sub.part_names == birds.PARTS
    np.testing.assert_array_equal(sub.cause_parts([0, 4], [1, 0]), birds.cause_parts([0, 4], [1, 0]))


def test_occluded_and_cut_off_parts_are_invisible():
    types = birds.CLASS_TYPES[3]  # ring eye: the largest eye
    free = birds.Nuisance()
    _, masks = birds.render(types, free, 64)
    eye = birds.PARTS.index("eye")
    rows, cols = np.nonzero(masks[eye])
    x0, y0, x1, y1 = (cols.min() - 1) / 64, (rows.min() - 1) / 64, (cols.max() + 2) / 64, (rows.max() + 2) / 64
    hidden = dataclasses.replace(free, occluder=((x0, y0), (x1, y0), (x1, y1), (x0, y1)))
    image, masks = birds.render(types, hidden, 64)
    xy, visible = birds.keypoints(masks)
    assert not visible[eye] and visible[[p for p in range(7) if p != eye]].all()
    assert (image[rows, cols] == np.asarray(hidden.occluder_colour)).all()
    # shifted right, a bird facing left has its tail beyond the right border
    image, masks = birds.render(types, dataclasses.replace(free, centre=(0.86, 0.5)), 64)
    visible = birds.keypoints(masks)[1]
    assert not visible[birds.PARTS.index("tail")] and visible[birds.PARTS.index("beak")]
    assert visible.sum() == 6


@pytest.mark.parametrize("part", birds.PARTS)
def test_changing_one_part_changes_pixels_only_on_that_part(part):
    p = birds.PARTS.index(part)
    rng = np.random.default_rng(p)
    for trial in range(6):
        a = birds.CLASS_TYPES[trial % 16].copy()
        b = a.copy()
        b[p] = 1 - a[p]
        nuisance = birds.sample_nuisance(rng)
        if trial == 0:
            occluder = ((0.3, 0.3), (0.6, 0.35), (0.55, 0.6), (0.35, 0.55))
            nuisance = dataclasses.replace(nuisance, centre=(0.5, 0.5), occluder=occluder)
        image_a, masks_a = birds.render(a, nuisance)
        image_b, masks_b = birds.render(b, nuisance)
        on_part = masks_a[p] | masks_b[p]
        np.testing.assert_array_equal(image_a[~on_part], image_b[~on_part])
        np.testing.assert_array_equal(masks_a[:, ~on_part], masks_b[:, ~on_part])
        assert (image_a != image_b).any()  # the type shows


def test_causes_of_class_pairs():
    assert birds.causes(0, 1) == {"beak"} and birds.causes(1, 2) == {"wing"} and birds.causes(0, 3) == {"eye"}
    assert birds.causes(0, 4) == {"body"} and birds.causes(4, 8) == {"head"} and birds.causes(8, 12) == {"tail", "leg"}
    assert birds.causes(0, 2) == {"beak", "wing"} and birds.causes(5, 5) == set()
    for y, y_hat in itertools.product(range(16), repeat=2):
        named = {part for part, u, v in zip(birds.PARTS, birds.CLASS_NAMES[y].split("-"),
                                            birds.CLASS_NAMES[y_hat].split("-")) if u != v}
        assert birds.causes(y, y_hat) == birds.causes(y_hat, y) == named
    nearest = [min(len(birds.causes(y, z)) for z in range(16) if z != y) for y in range(16)]
    assert nearest == [1] * 16  # every class has a neighbour that differs in one part
    np.testing.assert_array_equal(birds.cause_parts([0, 8], [1, 12]),
                                  [[0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1]])
    with pytest.raises(FgvceError, match="classes are 0..15"):
        birds.cause_parts(0, 16)


def test_bad_input_is_one_line_error():
    with pytest.raises(FgvceError, match="class_types"):
        birds.render([0, 0, 0], birds.Nuisance())
    with pytest.raises(FgvceError, match="class_types"):
        birds.render([0, 0, 2, 0, 0, 0, 0], birds.Nuisance())
    with pytest.raises(FgvceError, match="at least 8"):
        data.load("birds", "test", image_size=4)
    digits = data.load("digits", "test")  # no part masks, no known causes
    assert digits.part_masks(0) is None and digits.cause_parts(0, 1) is None and digits.part_names is None


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = birds.export_cub(tmp_path_factory.mktemp("export") / "CUB_200_2011", samples_per_class=4)
    return root, {s: birds.load(s, samples_per_class=4) for s in birds.SPLITS}


def test_export_reads_back_as_cub(exported):
    root, source = exported
    for split in birds.SPLITS:
        cub = data.load(f"cub:{root}", split, image_size=64)
        assert len(cub) == len(source[split]) and cub.class_names == birds.CLASS_NAMES
        np.testing.assert_array_equal(cub.labels, source[split].labels)
        for i in range(len(cub)):
            np.testing.assert_array_equal(cub.read(i), source[split].read(i))  # PNG: lossless
            ann, own = cub.parts(i), source[split].parts(i)
            assert ann.names == birds.PARTS  # left / right merged back
            np.testing.assert_array_equal(ann.types, own.types)
            np.testing.assert_allclose(ann.xy, parts_lib.transform_points(own.xy, 64, 64, 73, 64), atol=1e-9)
            box = parts_lib.transform_points(own.bbox.reshape(2, 2), 64, 64, 73, 64).reshape(4)
            np.testing.assert_allclose(ann.bbox, box, atol=1e-9)
    # a bird facing left shows its left eye, wing and leg; the other side is written invisible
    names = (root / "parts" / "parts.txt").read_text().split("\n")
    sides = {i + 1: n.split(" ")[1] for i, n in enumerate(names) if n.split(" ")[1:2] in (["left"], ["right"])}
    images = dict(line.split() for line in (root / "images.txt").read_text().splitlines())
    for line in (root / "parts" / "part_locs.txt").read_text().splitlines():
        image_id, part_id, _, _, visible = line.split()
        if int(part_id) in sides and visible == "1":
            k = int(images[image_id].split("_")[-1].split(".")[0])
            assert sides[int(part_id)] == ("right" if birds.nuisance_of(k).facing_right else "left")
    with pytest.raises(FgvceError, match="not empty"):
        birds.export_cub(root, samples_per_class=4)


def test_part_metrics_compute_on_the_export(exported):
    root, _ = exported
    queries, refs = data.load(f"cub:{root}", "test", image_size=64), data.load(f"cub:{root}", "train", image_size=64)
    grid = (8, 8)
    beak = birds.PARTS.index("beak")

    def beak_cell(ann):
        x, y = ann.xy[list(ann.types).index(beak)]
        return int(y * grid[0] / 64), int(x * grid[1] / 64)

    q_ann = [queries.parts(i) for i in range(4)]
    r_ann = [refs.parts(i) for i in range(4)]
    assert all(beak in a.types for a in q_ann + r_ann)
    # each query swaps its beak cell for reference q's beak cell: Near-KP = Same-KP = 1
    e = explanations(success=[1] * 4, n_edits=[1] * 4, query_region=[[beak_cell(a)] for a in q_ann],
                     ref_split_index=[[q] for q in range(4)], ref_region=[[beak_cell(a)] for a in r_ann],
                     grid=grid)
    got = part_metrics(e, np.stack([a.grid(grid) for a in q_ann]), np.stack([a.grid(grid) for a in r_ann]))
    assert got["near_kp"] == 1.0 and got["same_kp"] == 1.0 and got["misleading"] == 0.0
    assert 0 < got["part_iou"] <= 1 and 0 < got["coverage"] < 1
