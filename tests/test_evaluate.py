"""Evaluation tables: hand-built explanations, a stored explain directory, RISE over a tiny model."""
import csv
import dataclasses
import io
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from fgvce_jax import data, evaluate, results, store
from fgvce_jax.cli import main
from fgvce_jax.metrics import rise

from fake_explanations import explanations, id_table, write_run

GRID = (4, 4)


def two_methods():
    # fgvce: 2 of 2 succeed, 1 and 2 single-cell edits. random: 1 of 2 succeeds with 2 edits.
    fg = explanations([True, True], [1, 2], [[0, 0], [-1, -1], [1, 1], [2, 2]], [[0, -1], [1, 0]],
                      [[0, 0], [-1, -1], [1, 1], [3, 3]])
    rnd = explanations([False, True], [2, 2], [[0, 0], [0, 1], [3, 3], [3, 2]], [[0, 0], [0, 1]],
                       [[1, 0], [2, 0], [0, 0], [0, 1]])
    return {"random": rnd, "fgvce": fg}


def test_summarise_rows_by_hand():
    curves = {"gradcam": rise.RiseCurves(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([[0.0, 1.0], [1.0, 1.0]])),
              "fgvce": rise.RiseCurves(np.array([[1.0, 1.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [0.0, 1.0]]))}
    # parts: query 0 has part 0 on cell (0,0); reference 0 has part 0 on (0,0), reference 1 nothing.
    qp = np.zeros((2, 2, *GRID), bool)
    qp[0, 0, 0, 0] = True
    rp = np.zeros((2, 2, *GRID), bool)
    rp[0, 0, 0, 0] = True
    rows = evaluate.summarise(two_methods(), curves_by_method=curves,
                              parts_by_method={"fgvce": (qp, rp)})
    assert [r["method"] for r in rows] == ["fgvce", "random", "gradcam"]
    fg, rnd, gc = rows
    assert (fg["validity"], fg["edits_regions"], fg["edits_cells"]) == (1.0, 1.5, 1.5)
    assert (rnd["validity"], rnd["edits_regions"], rnd["edits_cells"]) == (0.5, 2.0, 2.0)
    # fgvce curves: deletion AUCs 1 and 0, insertion 0 and 0.5
    assert (fg["deletion_auc"], fg["insertion_auc"], fg["del_ins"]) == (0.5, 0.25, -0.25)
    assert (gc["deletion_auc"], gc["insertion_auc"]) == (0.5, 0.75)
    assert math.isnan(gc["validity"]) and math.isnan(rnd["deletion_auc"]) and math.isnan(rnd["near_kp"])
    # fgvce edits: q0 (0,0)|ref0 (0,0) near 1 same 1; q1 (1,1)|ref1, (2,2)|ref0 (3,3): near 0, 0
    assert fg["near_kp"] == pytest.approx(1 / 3) and fg["same_kp"] == pytest.approx(1 / 3)
    assert fg["coverage"] == pytest.approx(1.0)  # only query 0 has visible parts, fully covered
    assert fg["misleading"] == pytest.approx(2 / 3)


def test_markdown_and_csv_carry_the_rows():
    rows = evaluate.summarise(two_methods())
    md = evaluate.to_markdown(rows)
    assert md.splitlines()[0].startswith("| Method | Queries | Validity")
    assert "Deletion" not in md and "Near-KP" not in md  # groups not computed are not shown
    assert "| fgvce | 2 | 1.000 | 1.500 | 1.500 |" in md
    parsed = list(csv.DictReader(io.StringIO(evaluate.to_csv(rows))))
    assert [float(p["edits_regions"]) for p in parsed] == [r["edits_regions"] for r in rows]
    nan_row = evaluate.summarise({}, curves_by_method={"gradcam": rise.RiseCurves(np.ones((1, 3)), np.ones((1, 3)))})
    assert list(csv.DictReader(io.StringIO(evaluate.to_csv(nan_row))))[0]["validity"] == ""
    assert "| gradcam | 1 | – | – | – | 1.000 | 1.000 | 0.000 |" in evaluate.to_markdown(nan_row)


def test_write_outputs_is_complete_and_atomic(tmp_path):
    curves = {"fgvce": rise.RiseCurves(np.linspace(1, 0, 6)[None], np.linspace(0, 1, 6)[None])}
    rows = evaluate.summarise(two_methods(), curves_by_method=curves)
    files = evaluate.write_outputs(rows, tmp_path / "ev", curves)
    assert sorted(f.name for f in files) == ["curves.png", "metrics.json", "table.csv", "table.md"]
    assert (tmp_path / "ev" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved[1]["method"] == "random" and saved[1]["deletion_auc"] is None
    assert not list((tmp_path / "ev").glob(".*"))  # no temporary files left


def _write_run(directory, method, e, shard_size=1, rows=None, summary=True):
    """Store ``e`` the way the pipeline does: ShardWriter, arrays per shard, run keys in the config; only the
    first ``rows`` and no summary.json leave it as a killed run does."""
    q = len(e.success) if rows is None else rows
    write_run(directory / method, {"method": method, "region_size": e.region_size, "dataset": "digits",
                                   "split": "test", "model": None},
              id_table(e, data.load("digits", "test").ids, data.load("digits", "test").ids),  # references: test too
              {k: getattr(e, k) for k in results.EXPLANATION_ARRAYS},
              [(start, min(q, start + shard_size)) for start in range(0, q, shard_size)], summary=summary)


def test_directory_gives_the_in_memory_table(tmp_path):
    runs = two_methods()
    for m, e in runs.items():
        _write_run(tmp_path, m, e)
    assert set(results.find_runs(tmp_path)) == {"fgvce", "random"}
    rows, files = evaluate.evaluate_directory(tmp_path, use_rise=False, parts=False)
    assert rows == evaluate.summarise(runs)
    assert (tmp_path / "evaluation" / "table.md").read_text() == evaluate.to_markdown(rows)
    # one method's sub-directory alone; digits has no parts, so no part columns appear
    rows, _ = evaluate.evaluate_directory(tmp_path / "random", tmp_path / "one", use_rise=False)
    assert [r["method"] for r in rows] == ["random"] and "near_kp" not in rows[0]


def test_cli_reports_bad_directories_in_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no explain results" in err and "Traceback" not in err
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    _write_run(tmp_path, "fgvce", two_methods()["fgvce"])
    assert main(["evaluate", str(tmp_path), "--steps", "0"]) == 2
    assert main(["evaluate", str(tmp_path)]) == 2  # RISE needs the model, which the run does not name
    assert "--no-rise" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--no-rise"]) == 0
    out, err = capsys.readouterr()
    assert "| fgvce | 2 |" in out and "warning" not in err
    assert "evaluate: reading results" in err  # the progress bar


def test_cli_warns_about_a_partial_run(tmp_path, capsys):
    _write_run(tmp_path, "fgvce", two_methods()["fgvce"], rows=1, summary=False)
    assert main(["evaluate", str(tmp_path), "--no-rise"]) == 0
    out, err = capsys.readouterr()
    assert "| fgvce | 1 |" in out
    assert (f"warning: fgvce ({tmp_path / 'fgvce'}): partial: 1 query, run not finished; "
            "the evaluation covers these only") in err.splitlines()


class _PartsDataset:
    """Stand-in for a CUB Dataset: image i has part type (i % 3) on cell (i % 4, 0); image 5 has none."""

    def parts(self, i):
        if i == 5:
            return None
        def grid(shape):
            g = np.zeros((3, *shape), bool)
            g[i % 3, i % 4, 0] = True
            return g
        return SimpleNamespace(names=("a", "b", "c"), grid=grid)


def test_parts_for_runs_indexes_queries_and_referenced_images():
    e = explanations([True], [1], [[0, 0]], [[4]], [[0, 0]])
    e.query_split_index = np.array([5])
    qp, rp = evaluate._parts_for_runs(_PartsDataset(), _PartsDataset(), {"fgvce": e})["fgvce"]
    assert qp.shape == (1, 3, *GRID) and not qp.any()  # image 5 has no annotation
    assert rp.shape == (5, 3, *GRID) and rp[4, 1, 0, 0] and rp.sum() == 1  # only the referenced image


@dataclasses.dataclass(frozen=True)
class _LinearSplit:
    """Stand-in for a SplitModel (hashable, params first): logits = flattened image @ params["w"]."""

    def logits(self, params, images):
        return images.reshape(images.shape[0], -1) @ params["w"]


def test_rise_for_runs_matches_direct_curves_and_skips_maps_of_nan(capsys):
    import jax

    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(6, 16, 16, 3)).astype(np.float32)
    ds = SimpleNamespace(images=lambda idx: pixels[np.asarray(idx)])  # stand-in for Dataset.images
    split_model, params = _LinearSplit(), {"w": rng.normal(size=(16 * 16 * 3, 10)).astype(np.float32) * 0.05}
    grid = (4, 4)
    fg = explanations([True] * 3, [0] * 3, [[-1, -1]] * 3, [[-1]] * 3, [[-1, -1]] * 3,
                      phi=rng.normal(size=(3, *grid)).astype(np.float32))
    fg.query_split_index, fg.pred = np.array([3, 1, 4]), np.array([2, 7, 1])
    cve = explanations([True], [0], [[-1, -1]], [[-1]], [[-1, -1]], phi=np.full((1, *grid), np.nan, np.float32))
    got = evaluate.rise_for_runs(split_model, params, ds, {"fgvce": fg, "cve": cve}, steps=4, chunk_size=7,
                                 batch_size=2, gradcam=False)
    assert set(got) == {"fgvce"}
    assert "evaluate: fgvce deletion/insertion" in capsys.readouterr().err  # the progress bar

    def predict(x):
        return jax.nn.softmax(split_model.logits(params, x), -1)

    want = rise.deletion_insertion(predict, ds.images(fg.query_split_index), fg.query_phi, fg.pred, steps=4, chunk_size=64)
    np.testing.assert_allclose(got["fgvce"].deletion, want.deletion, atol=1e-5)
    np.testing.assert_allclose(got["fgvce"].insertion, want.insertion, atol=1e-5)


def test_directory_on_cub_format_data_adds_part_metrics(tmp_path):
    """A CUB folder (written by the data tests' helper) and a stored run whose query_split_index / ref_split_index
    point into its test / train splits: the part columns equal part_metrics on the dataset's own masks."""
    import warnings

    from test_data_cub import _write_cub

    from fgvce_jax import data
    from fgvce_jax.metrics.parts import part_metrics

    _write_cub(tmp_path / "CUB_200_2011", np.random.default_rng(0))
    name = f"cub:{tmp_path / 'CUB_200_2011'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the helper writes one corrupt image on purpose
        test, train = data.load(name, "test", image_size=32), data.load(name, "train", image_size=32)
    e = explanations([True, True], [2, 1], [[0, 0], [1, 2], [3, 3], [-1, -1]], [[1, 0], [0, -1]],
                     [[0, 1], [2, 2], [3, 0], [-1, -1]])
    e.query_split_index = np.array([1, 0])
    w = store.ShardWriter(tmp_path / "run" / "fgvce", {"method": "fgvce", "region_size": 1, "dataset": name,
                                                        "split": "test", "reference_split": "train",
                                                        "image_size": 32, "model": None})
    w.write_shard(0, 0, 2, id_table(e, test.ids, train.ids), {k: getattr(e, k) for k in results.EXPLANATION_ARRAYS})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows, _ = evaluate.evaluate_directory(tmp_path / "run", use_rise=False)
    qp = np.stack([test.parts(i).grid(GRID) for i in e.query_split_index])
    rp = np.stack([train.parts(i).grid(GRID) for i in range(len(train))])
    want = part_metrics(e, qp, rp)
    assert qp.shape[1] == 12 and qp.any() and rp.any()
    assert {k: rows[0][k] for k in want} == pytest.approx(want, nan_ok=True)


def test_directory_on_birds_adds_cause_precision_and_recall(tmp_path):
    """A stored run on ``birds`` (queries: the first test bird of class 0 taken for class 1, cause the beak, and of
    class 4 taken for class 0, cause the body), edits placed on cells chosen from the part masks:

    - fgvce: q0 edits a beak cell, q1 a cell off the body -> precision 1/2, recall (1 + 0) / 2;
    - gradient: q0 edits a beak cell and a cell on no part, q1 a body cell -> precision 2/3, recall 1;
    - random: no search succeeded -> NaN.
    The part columns are computed next to them; digits (no causes) has no cause columns."""
    from fgvce_jax.metrics.causes import cell_parts

    grid = (8, 8)
    test, train = data.load("birds", "test"), data.load("birds", "train")
    queries = np.array([np.flatnonzero(test.labels == 0)[0], np.flatnonzero(test.labels == 4)[0]])
    cells = cell_parts(np.stack([test.part_masks(i) for i in queries]), grid)  # (2, 7, 8, 8)
    beak, body = data.birds.PARTS.index("beak"), data.birds.PARTS.index("body")
    on_beak = np.argwhere(cells[0, beak])[0]
    no_part = np.argwhere(~cells[0].any(0))[0]
    on_body, off_body = np.argwhere(cells[1, body])[0], np.argwhere(~cells[1, body])[0]
    phi = np.zeros((2, *grid), np.float32)
    runs = {
        "fgvce": explanations([True, True], [1, 1], [on_beak, [-1, -1], off_body, [-1, -1]], [[0, -1], [0, -1]],
                              [[0, 0], [-1, -1], [0, 0], [-1, -1]], phi=phi, grid=grid),
        "gradient": explanations([True, True], [2, 1], [on_beak, no_part, on_body, [-1, -1]], [[0, 0], [0, -1]],
                                 [[0, 0], [0, 1], [0, 0], [-1, -1]], phi=phi, grid=grid),
        "random": explanations([False, False], [1, 1], [on_beak, [-1, -1], on_body, [-1, -1]], [[0, -1], [0, -1]],
                               [[0, 0], [-1, -1], [0, 0], [-1, -1]], phi=phi, grid=grid),
    }
    for method, e in runs.items():
        e.query_split_index, e.true, e.pred = queries, np.array([0, 4]), np.array([1, 0])
        w = store.ShardWriter(tmp_path / "run" / method, {"method": method, "region_size": 1, "dataset": "birds",
                                                          "split": "test", "reference_split": "train",
                                                          "image_size": None, "model": None})
        w.write_shard(0, 0, 2, id_table(e, test.ids, train.ids), {k: getattr(e, k) for k in results.EXPLANATION_ARRAYS})
    rows, _ = evaluate.evaluate_directory(tmp_path / "run", use_rise=False)
    got = {r["method"]: (r["cause_precision"], r["cause_recall"]) for r in rows}
    assert got["fgvce"] == pytest.approx((1 / 2, 1 / 2)) and got["gradient"] == pytest.approx((2 / 3, 1.0))
    assert all(math.isnan(v) for v in got["random"])
    assert 0 <= rows[0]["misleading"] <= 1 and "part_iou" in rows[0]  # the keypoint part metrics beside them
    md = (tmp_path / "run" / "evaluation" / "table.md").read_text().splitlines()[0]
    assert md.endswith("| Misleading ↓ | Cause precision ↑ | Cause recall ↑ |")
    assert evaluate.causes_for_runs(data.load("digits", "test"), runs) is None


def test_cause_cells_are_where_the_two_classes_differ_in_the_pixels_the_model_reads():
    """The known answer of a confusion y -> y_hat, from the pixels: draw the query's bird again as class y_hat
    under the same nuisance; the 8 x 8 cells (4 x 4 pixel blocks at 32 px, the demo's birds) in which the two
    images differ lie on a cause part of one of the two drawings. ``causes_for_runs`` (evaluate's path: the
    run's image size, queries by position, true and predicted class) must give the query's cause cells so that
    (a) every differing cell is a cause cell of the query or of the y_hat drawing, (b) edits on the differing
    cause cells score cause precision 1 and edits on cells of no part 0. A transposed or shifted grid, another
    image's masks, or the causes of another pair break (a)."""
    from fgvce_jax.data import birds
    from fgvce_jax.metrics import causes as cm

    grid, size = (8, 8), 32
    ds = data.load_as_run({"dataset": "birds", "image_size": size}, "test")
    pairs = {12: 13, 11: 7, 1: 3, 6: 4}  # beak; head; beak and eye; body and wing
    queries = np.array([np.flatnonzero(ds.labels == y)[2] for y in pairs])  # not the first images, not in order
    true, pred = ds.labels[queries], np.array([pairs[int(y)] for y in ds.labels[queries]])
    probe = explanations(np.ones(4, bool), np.ones(4), np.zeros((4, 1, 2)), np.zeros((4, 1)), np.zeros((4, 1, 2)),
                         phi=np.zeros((4, *grid), np.float32), grid=grid)
    probe.query_split_index, probe.true, probe.pred = queries, true, pred
    cells, cause = evaluate.causes_for_runs(ds, {"fgvce": probe})["fgvce"]
    on_cause = (cells & cause[:, :, None, None]).any(1)  # (4, 8, 8)
    blocks = size // grid[0]
    on, off = [], []
    for q, i in enumerate(queries):
        k = birds.sample_index(ds.ids[i])
        image, _ = birds.sample(k, size)
        np.testing.assert_array_equal(image, ds.read(i))  # the pixels the model read
        other, other_masks = birds.render(birds.CLASS_TYPES[pred[q]], birds.nuisance_of(k), size)
        differ = (image != other).any(-1).reshape(grid[0], blocks, grid[1], blocks).any((1, 3))
        other_cause = cm.cell_parts(other_masks[cause[q]], grid).any(0)
        assert differ.any() and not (differ & ~(on_cause[q] | other_cause)).any(), q
        on.append(np.argwhere(differ & on_cause[q]))
        off.append(np.argwhere(~cells[q].any(0)))
        assert len(on[-1]) and len(off[-1])
    t = max(len(c) for c in on)

    def edits_at(chosen):
        region = np.full((4, t, 2), -1)
        for q, c in enumerate(chosen):
            region[q, :len(c[:t])] = c[:t]
        e = explanations(np.ones(4, bool), [min(len(c), t) for c in chosen], region,
                         np.where(region[..., 0] >= 0, 0, -1), region, phi=np.zeros((4, *grid), np.float32), grid=grid)
        e.query_split_index, e.true, e.pred = queries, true, pred
        return evaluate.summarise({"fgvce": e}, causes_by_method=evaluate.causes_for_runs(ds, {"fgvce": e}))[0]

    assert edits_at(on)["cause_precision"] == 1.0 and edits_at(on)["cause_recall"] > 0
    assert edits_at(off)["cause_precision"] == 0.0 and edits_at(off)["cause_recall"] == 0.0


def test_paper_tables_cut_the_rows_by_method_and_column():
    """main: FG-VCE, Grad-CAM, gradient, cve with the counterfactual and RISE columns; ablation: FG-VCE, global,
    gradient, single-step, random; localisation: the part and cause columns, left out without them."""
    curves = {"gradcam": rise.RiseCurves(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))}
    runs = two_methods()
    cells = np.zeros((2, 1, *GRID), bool)
    cells[:, 0, 0, 0] = True  # the one part lies on cell (0, 0) of both queries, and is their cause
    rows = evaluate.summarise(runs, curves_by_method=curves, causes_by_method={"fgvce": (cells, np.ones((2, 1), bool))})
    tables = evaluate.paper_tables(rows)
    assert [r["method"] for r in tables["main"]] == ["fgvce", "gradcam"]
    assert [r["method"] for r in tables["ablation"]] == ["fgvce", "random"]
    assert list(tables["main"][0]) == ["method", "queries", *evaluate.CF_COLUMNS, *evaluate.RISE_COLUMNS]
    loc = {r["method"]: r for r in tables["localisation"]}
    assert list(loc["fgvce"]) == ["method", "queries", "cause_precision", "cause_recall"]
    # fgvce edits (0,0) in q0 and (1,1), (2,2) in q1: 1 of 3 cells on the cause; q0 touches it, q1 does not
    assert (loc["fgvce"]["cause_precision"], loc["fgvce"]["cause_recall"]) == pytest.approx((1 / 3, 1 / 2))
    assert math.isnan(loc["random"]["cause_precision"])
    md = evaluate.tables_markdown(tables)
    assert md.startswith("## main\n\n| Method | Queries | Validity ↑") and "## localisation" in md
    assert "localisation" not in evaluate.paper_tables(evaluate.summarise(runs))
