"""Result rows (results.results_table), run completeness, the report's figures and its HTML, on
hand-built explanations."""
import collections
import html.parser
import json
import os
import re
import struct
import types

import numpy as np
import pytest

from fgvce_jax import completeness, figures, report, results
from fgvce_jax.cli import main
from fgvce_jax.errors import FgvceError
from fgvce_jax.metrics import edited_cells

from fake_explanations import write_run

Q, T, C, G = 3, 3, 4, 4  # queries, edit slots, classes, grid side


def _dataset(split, n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)
    return types.SimpleNamespace(name="toy", split=split, ids=np.asarray([f"{split}{i}" for i in range(n)]),
                                 labels=rng.integers(0, C, n), class_names=["cat", "dog", "owl", "fox"],
                                 raw_image=lambda i: images[i], part_names=None)


def _written(query_region, ref_region, n_edits, region_size):
    """(Q, T, G, G) bool: the query cells each edit wrote (its pairs inside the grid on both sides)."""
    qc, _, valid = edited_cells(query_region, ref_region, n_edits, region_size, (G, G))
    mask = np.zeros((Q, T, G, G), bool)
    q, t, k = np.nonzero(valid)
    mask[q, t, qc[q, t, k, 0], qc[q, t, k, 1]] = True
    return mask


def _explanations(seed=1):
    rng = np.random.default_rng(seed)
    n_edits = np.array([2, 3, 0], np.int32)
    used = np.arange(T)[None] < n_edits[:, None]
    region = np.where(used[..., None], rng.integers(0, G, (Q, T, 2)), -1).astype(np.int32)
    probs = rng.dirichlet(np.ones(C), (Q, T)).astype(np.float32)
    ref_region = np.where(used[..., None], rng.integers(0, G, (Q, T, 2)), -1).astype(np.int32)
    return types.SimpleNamespace(
        success=np.array([True, False, False]), n_edits=n_edits, reason=np.array([0, 1, 3]),
        true=np.array([1, 2, 0]), pred=np.array([3, 0, 1]), query_region=region,
        ref_row=np.where(used, rng.integers(0, 2, (Q, T)), -1).astype(np.int32),
        ref_region=ref_region,
        similarity=np.where(used, rng.random((Q, T)), np.nan).astype(np.float32),
        probs=np.where(used[..., None], probs, np.nan), probs_before=rng.dirichlet(np.ones(C), Q).astype(np.float32),
        edit_mask=_written(region, ref_region, n_edits, 3), query_phi=rng.normal(size=(Q, G, G)).astype(np.float32),
        region_size=3, method="fgvce")


def test_results_table_rows_match_the_explanations():
    ex, qds, rds = _explanations(), _dataset("test", 10, 2), _dataset("train", 8, 3)
    query_idx, ref_idx = np.array([7, 2, 5]), np.array([4, 6])
    table, arrays = results.results_table(ex, query_idx, qds, ref_idx, rds)
    rows = table.to_pylist()
    for q, row in enumerate(rows):
        n = int(ex.n_edits[q])
        assert row["query_id"] == f"test{query_idx[q]}" and row["n_edits"] == n
        assert row["true_name"] == qds.class_names[ex.true[q]] and row["pred_name"] == qds.class_names[ex.pred[q]]
        assert row["edit_ref_id"] == [f"train{ref_idx[ex.ref_row[q, t]]}" for t in range(n)]
        assert row["edit_query_row"] == ex.query_region[q, :n, 0].tolist()
        np.testing.assert_allclose(row["edit_p_true"], [ex.probs[q, t, ex.true[q]] for t in range(n)], rtol=1e-6)
        np.testing.assert_allclose(row["edit_p_pred"], [ex.probs[q, t, ex.pred[q]] for t in range(n)], rtol=1e-6)
        assert row["p_true_before"] == pytest.approx(ex.probs_before[q, ex.true[q]])
    assert [r["reason"] for r in rows] == ["success", "t_max reached", "no references"]
    np.testing.assert_array_equal(arrays["ref_split_index"], np.where(ex.ref_row >= 0, ref_idx[np.maximum(ex.ref_row, 0)], -1))
    assert all(len(a) == Q for a in arrays.values())


def _brute_boxes(centre_q, centre_r, r, grid):
    """Bounding boxes of the cell pairs that stay inside the grid on both sides (loops)."""
    d = range(-(r // 2), r - r // 2)
    pairs = [((centre_q[0] + i, centre_q[1] + j), (centre_r[0] + i, centre_r[1] + j)) for i in d for j in d]
    pairs = [(a, b) for a, b in pairs if all(0 <= v < g for v, g in zip(a + b, grid + grid))]
    box = lambda cells: [min(c[0] for c in cells), min(c[1] for c in cells), max(c[0] for c in cells), max(c[1] for c in cells)]
    return box([a for a, _ in pairs]), box([b for _, b in pairs])


def test_region_boxes_match_brute_force():
    qr = np.array([[0, 0], [2, 3], [3, 1]])
    rr = np.array([[2, 3], [0, 0], [1, 1]])
    qb, rb, ok = figures.region_boxes({"query_region": qr, "ref_region": rr, "n_edits": 3, "region_size": 3}, (4, 4))
    assert ok.all()
    for t in range(3):
        bq, br = _brute_boxes(tuple(qr[t]), tuple(rr[t]), 3, (4, 4))
        assert qb[t].tolist() == bq and rb[t].tolist() == br


def test_counterfactual_image_pastes_reference_cells_in_edit_order():
    # 10 px over 4 cells: pixel edges 0, 2, 5, 8, 10 (cells of 2 and 3 px).
    assert figures.cell_edges(4, 10).tolist() == [0, 2, 5, 8, 10]
    query = np.zeros((10, 10, 3), np.uint8)
    ref_a, ref_b = np.full((10, 10, 3), 7, np.uint8), np.arange(300, dtype=np.uint8).reshape(10, 10, 3)
    row = {"n_edits": 2, "region_size": 1, "edit_ref_split_index": [4, 9],
           "query_region": np.array([[1, 2], [1, 2], [-1, -1]]), "ref_region": np.array([[0, 0], [3, 0], [-1, -1]])}
    out = figures.counterfactual_image(query, {4: ref_a, 9: ref_b}, row, (4, 4))
    changed = out.any(-1)
    assert changed[2:5, 5:8].all() and changed.sum() == 9  # query cell (1, 2) only
    # the second edit (reference 9, cell (3, 0): rows 8-9, cols 0-1) overwrote the first, resampled 2 -> 3 px
    np.testing.assert_array_equal(out[2:5, 5:8], ref_b[np.ix_([8, 8, 9], [0, 0, 1])])
    assert query.sum() == 0  # the input is not modified
    # a 3x3 region at the corner: only the cells inside the map on both sides are pasted (2x2 of them)
    corner = dict(row, n_edits=1, region_size=3, edit_ref_split_index=[4], query_region=np.array([[0, 0]]),
                  ref_region=np.array([[2, 2]]))
    out = figures.counterfactual_image(query, {4: ref_a}, corner, (4, 4))
    assert out.any(-1).sum() == 25 and (out[:5, :5] == 7).all()
    # with the run's edit_mask only the cells the edit wrote are pasted
    written = np.zeros((1, 4, 4), bool)
    written[0, 1, 1] = True
    out = figures.counterfactual_image(query, {4: ref_a}, dict(corner, edit_mask=written), (4, 4))
    assert out.any(-1).sum() == 9 and (out[2:5, 2:5] == 7).all()


def test_phi_norm_is_centred_at_zero():
    norm = figures.phi_norm(np.array([[0.5, -0.1], [0.2, 0.0]]))
    assert (norm.vmin, norm.vmax) == (-0.5, 0.5) and norm(0.0) == 0.5
    assert figures.phi_norm(np.zeros((2, 2))).vmax == 1.0
    assert figures.phi_norm(np.full((2, 2), np.nan)) is None


def _stored(tmp_path, config=None, shards=((0, 2), (2, 3)), **kwargs):
    ex, qds, rds = _explanations(), _dataset("test", 10, 2), _dataset("train", 8, 3)
    table, arrays = results.results_table(ex, np.array([7, 2, 5]), qds, np.array([4, 6]), rds)
    return write_run(tmp_path / "run", {"method": "fgvce", **(config or {})}, table, arrays, list(shards), **kwargs)


@pytest.mark.parametrize("shards, kwargs, config, line", [
    (((0, 2), (2, 3)), {}, {}, "complete: 3 queries"),
    (((0, 2), (2, 3)), {"summary": False}, {}, "partial: 3 queries, run not finished"),
    (((0, 2),), {"summary": False}, {}, "partial: 2 queries, run not finished"),
    (((0, 2),), {"summary": False}, {"queries": ["a", "b", "c", "d"], "limit": 3}, "partial: 2 of 3 queries"),
    (((0, 1), (2, 3)), {"queries": 3}, {}, "partial: 2 of 3 queries"),  # a gap (summary of an older run)
    (((0, 2),), {"queries": 3}, {}, "partial: 2 of 3 queries"),
    ((), {"summary": False}, {}, "partial: 0 queries, run not finished"),  # killed before its first shard
])
def test_completeness_from_shards_summary_and_config(tmp_path, shards, kwargs, config, line):
    c = completeness.completeness(_stored(tmp_path, config, shards, **kwargs))
    assert c.line() == line and c.partial == line.startswith("partial")


def test_process_manifests_or_a_damaged_summary_make_a_run_partial(tmp_path, capsys):
    run = _stored(tmp_path)
    (run / "summary.json").write_text("{")
    assert completeness.completeness(run).line() == "partial: 3 queries, run not finished"
    run = _stored(tmp_path / "b")
    (run / "manifest.process-1.json").write_text((run / "manifest.json").read_text())
    assert completeness.completeness(run).line() == "partial: 3 queries, run not finished"
    completeness.warn_partial({"fgvce": run}, "the report")
    assert capsys.readouterr().err.strip() == (f"warning: fgvce ({run}): partial: 3 queries, run not finished; "
                                               "the report covers these only")


class _Page(html.parser.HTMLParser):
    """What the tests read from the report: ids in order, img sources, local links, index groups,
    warnings (with the id of the section they are in) and header cells."""

    def __init__(self, text):
        super().__init__()
        self.ids, self.srcs, self.links, self.groups, self.heads = [], [], [], [], []
        self.warnings, self.sections, self._stack, self._text = [], [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "section" and a.get("id", "").startswith("m-"):
            self.sections.append(a["id"][2:])
        if tag == "img":
            self.srcs.append(a["src"])
        if tag == "a" and a.get("href", "").startswith("#"):
            self.links.append(a["href"][1:])
        if tag == "li" and a.get("class") == "group":
            self.groups.append(a)
        if a.get("class") == "warn" or tag == "th":
            self._text = [tag, self.sections[-1] if self.sections else None, ""]

    def handle_data(self, data):
        if self._text:
            self._text[2] += data

    def handle_endtag(self, tag):
        if self._text and tag == self._text[0]:
            (self.heads.append(self._text[2]) if tag == "th" else self.warnings.append(tuple(self._text[1:])))
            self._text = None


def _png_width(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[16:20])[0]


def _write_methods(root, partial_random=True):
    """random (partial: 2 of its 3 rows written, no summary), cve (no Phi) and fgvce, each of 3 queries."""
    qds, rds = _dataset("test", 10, 2), _dataset("train", 8, 3)
    config = {"dataset": "toy", "split": "test", "reference_split": "train", "image_size": 16}
    rows = {}
    for seed, method in enumerate(("random", "cve", "fgvce")):
        ex = _explanations(seed)
        if method == "cve":
            ex.query_phi, ex.region_size = np.full_like(ex.query_phi, np.nan), 1
            ex.edit_mask = _written(ex.query_region, ex.ref_region, ex.n_edits, 1)
        table, arrays = results.results_table(ex, np.array([7, 2, 5]), qds, np.array([4, 6]), rds)
        partial = partial_random and method == "random"
        write_run(root / method, {**config, "method": method, "region_size": ex.region_size}, table, arrays,
                  [(0, 2)] if partial else [(0, 2), (2, 3)], summary=not partial)
        rows[method] = table.to_pylist()[:2 if partial else 3]
    return rows, qds, rds


def test_report_page_structure(tmp_path, monkeypatch, capsys):
    from fgvce_jax import data

    rows, qds, rds = _write_methods(tmp_path / "out")
    monkeypatch.setattr(data, "load", lambda name, split, **kw: qds if split == "test" else rds)
    path = report.write_report(tmp_path / "out")
    err = capsys.readouterr().err
    assert f"warning: random ({tmp_path / 'out' / 'random'}): partial: 2 queries, run not finished" in err
    assert "report: fgvce figures" in err  # the progress bar
    text = path.read_text()
    page = _Page(text)
    assert page.sections == ["fgvce", "cve", "random"]  # the fixed method order
    # every figure exists, is a PNG sized for a 1200 px page; one per query
    assert len(page.srcs) == sum(len(r) for r in rows.values())
    for src in page.srcs:
        assert 800 <= _png_width(path.parent / src) <= 1200
    # every local link has its target; every query has its section and anchor
    assert set(page.links) <= set(page.ids) and len(page.ids) == len(set(page.ids))
    for method, method_rows in rows.items():
        anchors = [i for i in page.ids if i.startswith(f"{method}-q")]
        assert anchors == [f"{method}-q{i}" for i in range(len(method_rows))]
        for i, row in enumerate(method_rows):
            section = text.split(f"id='{method}-q{i}'")[1].split("</section>")[0]
            assert f"data-fixed='{'yes' if row['success'] else 'no'}'" in section
            assert section.count("<tr>") == 2 + row["n_edits"]  # header, the unedited query, one per edit
            want = "fixed after" if row["success"] else "not fixed"
            assert want in section and f"margin {report.margin(row):+.3f}" in section
            assert all(f"{s:.3f}" in section for s in row["edit_similarity"])
    # the index: per method, the (true, pred) groups and their counts are those of the results
    for method in rows:
        section = text.split(f"<section id='m-{method}'>")[1].split("<section id='m-")[0]
        got = {(g["data-true"], g["data-pred"]): (int(g["data-count"]), int(g["data-fixed"])) for g in _Page(section).groups}
        want = collections.Counter((r["true_name"], r["pred_name"]) for r in rows[method])
        fixed = collections.Counter((r["true_name"], r["pred_name"]) for r in rows[method] if r["success"])
        assert got == {k: (n, fixed[k]) for k, n in want.items()}
    # the partial warning: at the top and in random's section only
    assert [w[0] for w in page.warnings] == [None, "random"]
    assert "random: partial: 2 queries, run not finished" in page.warnings[0][1]
    # metric columns in words, with the better direction; no claim that failed searches found a cause
    assert "Validity (higher is better)" in page.heads and "Edits (regions) (lower is better)" in page.heads
    assert "edits_regions" not in page.heads
    assert "caused the mistake" not in text and "explain nothing" in text
    assert "<script" not in text and "http" not in text  # works offline
    # a complete directory: no warning
    _write_methods(tmp_path / "done", partial_random=False)
    assert not _Page(report.write_report(tmp_path / "done").read_text()).warnings
    assert "warning" not in capsys.readouterr().err


def test_report_redraws_and_includes_the_evaluation(tmp_path, monkeypatch):
    from fgvce_jax import data

    _, qds, rds = _write_methods(tmp_path / "out", partial_random=False)
    monkeypatch.setattr(data, "load", lambda name, split, **kw: qds if split == "test" else rds)
    page = report.write_report(tmp_path / "out", max_queries=1)
    assert len(_Page(page.read_text()).srcs) == 3
    assert len(list((page.parent / "report_files" / "fgvce").iterdir())) == 1
    text = page.read_text()
    assert text.count("2 more queries not drawn") == 3 and sum(map(int, re.findall(r"\(\+(\d) not drawn\)", text))) == 6
    assert not [p for p in page.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    mask = os.umask(0o022)
    os.umask(mask)
    assert (page.parent / "report_files").stat().st_mode & 0o777 == 0o777 & ~mask  # readable by others
    with pytest.raises(FgvceError, match="no explain results"):
        report.write_report(tmp_path)
    # The metrics table of `fgvce evaluate` is included when it exists, its columns in words.
    (tmp_path / "out" / "evaluation").mkdir()
    (tmp_path / "out" / "evaluation" / "metrics.json").write_text('[{"method": "fgvce", "del_ins": 0.25}]')
    text = report.write_report(tmp_path / "out").read_text()
    assert "<td>0.250</td>" in text and "<th>Del-Ins (higher is better)</th>" in text


def test_cli_warns_about_a_partial_run(tmp_path, monkeypatch, capsys):
    from fgvce_jax import data

    _, qds, rds = _write_methods(tmp_path / "out")
    write_run(tmp_path / "out" / "global", {"method": "global"}, None, {}, [], summary=False)  # no shard yet
    monkeypatch.setattr(data, "load", lambda name, split, **kw: qds if split == "test" else rds)
    assert main(["report", str(tmp_path / "out"), "--max-queries", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 2 and "random" in err and "partial: 2 queries" in err
    assert "global" in err and "partial: 0 queries" in err
    text = (tmp_path / "out" / "report.html").read_text()
    page = _Page(text)
    assert page.sections == ["fgvce", "cve", "global", "random"] and len(page.srcs) == 3
    assert "<td>global</td><td>0</td><td>partial: 0 queries, run not finished</td><td>–</td>" in text


def test_report_html_that_is_a_directory_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    from fgvce_jax import data

    _, qds, rds = _write_methods(tmp_path / "out", partial_random=False)
    monkeypatch.setattr(data, "load", lambda name, split, **kw: qds if split == "test" else rds)
    (tmp_path / "pages").mkdir()
    assert main(["report", str(tmp_path / "out"), "--html", str(tmp_path / "pages")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a directory; give the page's file name" in err[0], err
    assert list((tmp_path / "pages").iterdir()) == [] and not list(tmp_path.glob("*_files"))


def _shifted(ds, extra: int = 2):
    """``ds`` with ``extra`` new images in front (every old image moves ``extra`` positions on) -- as when
    images are added to a folder dataset after the explain run."""
    rng = np.random.default_rng(99)
    new = rng.integers(0, 255, (extra, 16, 16, 3), dtype=np.uint8)
    old = ds.raw_image
    return types.SimpleNamespace(name=ds.name, split=ds.split, ids=np.asarray([f"new{i}" for i in range(extra)]
                                                                              + list(ds.ids)),
                                 labels=np.concatenate([np.zeros(extra, int), ds.labels]), class_names=ds.class_names,
                                 raw_image=lambda i: new[i] if i < extra else old(i - extra), part_names=None)


def test_report_and_evaluate_find_images_by_id_when_the_dataset_changed(tmp_path, monkeypatch):
    """Images added in front of a split move every stored position; the report still draws each query's and
    reference's own image, and evaluate re-derives the positions from the ids. An id that is gone is refused."""
    from fgvce_jax import data, evaluate

    rows, qds, rds = _write_methods(tmp_path / "out", partial_random=False)
    drawn = []
    monkeypatch.setattr(report, "query_figure", lambda path, image, phi, row, refs: (
        drawn.append((row["query_id"], image, {r: refs[r] for r in refs})), path.write_bytes(b"png")))
    new_q, new_r = _shifted(qds), _shifted(rds)
    monkeypatch.setattr(data, "load", lambda name, split, **kw: new_q if split == "test" else new_r)
    report.write_report(tmp_path / "out", max_queries=3)
    assert len(drawn) == 9
    for qid, image, refs in drawn:
        np.testing.assert_array_equal(image, qds.raw_image(int(qid.removeprefix("test"))))  # its own image
        for r, img in refs.items():
            np.testing.assert_array_equal(img, rds.raw_image(r))  # edit_ref_split_index is the old position
    e, _ = results.load_run(tmp_path / "out" / "fgvce")
    moved = evaluate.by_id(e, new_q, new_r)
    np.testing.assert_array_equal(moved.query_split_index, e.query_split_index + 2)
    np.testing.assert_array_equal(moved.ref_split_index, np.where(e.ref_split_index >= 0, e.ref_split_index + 2, -1))
    gone = types.SimpleNamespace(name="toy", split="test", ids=qds.ids[:5])  # queries "test7", "test5" are gone
    with pytest.raises(FgvceError, match=r"2 query images of the stored results are no longer in toy test "
                                         r"\(e.g. 'test7'\): the dataset changed"):
        evaluate.by_id(e, gone)


def test_report_on_birds_outlines_the_parts_and_names_those_each_edit_touched(tmp_path):
    """One query (the first test bird of class 0, predicted as class 1: they differ in the beak) with three
    edits on an 8 x 8 grid: a cell holding beak pixels and no other part, a cell on no part, a cell on the body
    and the wing only. Its section lists "beak", "no part" and "body, wing" in edit order, the legend names
    the seven parts with the beak marked as the difference, and the parts figure has the beak's outline colour."""
    from fgvce_jax import data
    from fgvce_jax.data import birds
    from fgvce_jax.metrics.causes import cell_parts

    qds, rds = data.load("birds", "test"), data.load("birds", "train")
    query, grid = int(np.flatnonzero(qds.labels == 0)[0]), (8, 8)
    masks = qds.part_masks(query)
    cells = cell_parts(masks, grid)
    names = list(birds.PARTS)

    def cell_on(parts):
        want = np.isin(np.arange(len(names)), [names.index(p) for p in parts])
        return np.argwhere((cells == want[:, None, None]).all(0))[0]

    beak_cell, empty_cell, body_wing = cell_on(["beak"]), cell_on([]), cell_on(["body", "wing"])
    edges = figures.cell_edges(8, 64)  # the beak cell holds beak pixels: checked on the pixels themselves
    assert masks[names.index("beak"), edges[beak_cell[0]]:edges[beak_cell[0] + 1],
                 edges[beak_cell[1]]:edges[beak_cell[1] + 1]].any()
    region = np.array([[beak_cell, empty_cell, body_wing]], np.int32)
    probs = np.full((1, 3, 16), 1 / 16, np.float32)
    edit_mask = np.zeros((1, 3, *grid), bool)
    edit_mask[0, np.arange(3), region[0, :, 0], region[0, :, 1]] = True
    ex = types.SimpleNamespace(
        success=np.array([True]), n_edits=np.array([3], np.int32), reason=np.array([0]), true=np.array([0]),
        pred=np.array([1]), query_region=region, ref_row=np.zeros((1, 3), np.int32), ref_region=region,
        similarity=np.full((1, 3), 0.5, np.float32), probs=probs, probs_before=probs[:, 0],
        edit_mask=edit_mask, query_phi=np.zeros((1, *grid), np.float32), region_size=1, method="fgvce")
    table, arrays = results.results_table(ex, np.array([query]), qds, np.array([0]), rds)
    write_run(tmp_path / "out" / "fgvce", {"dataset": "birds", "split": "test", "reference_split": "train",
                                            "image_size": None, "method": "fgvce", "region_size": 1}, table, arrays,
              [(0, 1)])
    path = report.write_report(tmp_path / "out")
    section = path.read_text().split("id='fgvce-q0'")[1].split("</section>")[0]
    touched = re.findall(r"<tr>(?:<td>[^<]*</td>){7}<td>([^<]*)</td></tr>", section)
    assert touched == ["–", "beak", "no part", "body, wing"]  # the unedited query, then the three edits
    assert "<th>parts touched</th>" in section
    assert "<b>beak (differs)</b>" in section and "body (differs)" not in section
    assert all(name in section for name in names)
    png = path.parent / "report_files" / "fgvce" / "q00000_parts.png"
    assert f"src='report_files/fgvce/q00000_parts.png'" in section and _png_width(png) == 256
    from PIL import Image

    beak_rgb = tuple(int(figures._COLOURS[names.index("beak")][i:i + 2], 16) for i in (1, 3, 5))
    assert (np.asarray(Image.open(png))[..., :3] == beak_rgb).all(-1).any()
