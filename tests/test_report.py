"""Result rows (pipeline.results_table) and the HTML report, on hand-built explanations."""
import re
import types

import numpy as np
import pytest

from fgvce_jax import pipeline, report, store
from fgvce_jax.errors import FgvceError

Q, T, C, G = 3, 3, 4, 4  # queries, edit slots, classes, grid side


def _dataset(split, n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)
    return types.SimpleNamespace(name="toy", split=split, ids=np.asarray([f"{split}{i}" for i in range(n)]),
                                 labels=rng.integers(0, C, n), class_names=["cat", "dog", "owl", "fox"],
                                 raw_image=lambda i: images[i])


def _explanations():
    rng = np.random.default_rng(1)
    n_edits = np.array([2, 3, 0], np.int32)
    used = np.arange(T)[None] < n_edits[:, None]
    region = np.where(used[..., None], rng.integers(0, G, (Q, T, 2)), -1).astype(np.int32)
    probs = rng.dirichlet(np.ones(C), (Q, T)).astype(np.float32)
    return types.SimpleNamespace(
        success=np.array([True, False, False]), n_edits=n_edits, reason=np.array([0, 1, 3]),
        true=np.array([1, 2, 0]), pred=np.array([3, 0, 1]), query_region=region,
        ref_index=np.where(used, rng.integers(0, 2, (Q, T)), -1).astype(np.int32),
        ref_region=np.where(used[..., None], rng.integers(0, G, (Q, T, 2)), -1).astype(np.int32),
        similarity=np.where(used, rng.random((Q, T)), np.nan).astype(np.float32),
        probs=np.where(used[..., None], probs, np.nan), probs_before=rng.dirichlet(np.ones(C), Q).astype(np.float32),
        edit_mask=np.zeros((Q, T, G, G), bool), query_phi=rng.normal(size=(Q, G, G)).astype(np.float32),
        region_size=3, method="fgvce")


def test_results_table_rows_match_the_explanations():
    ex, qds, rds = _explanations(), _dataset("test", 10, 2), _dataset("train", 8, 3)
    query_idx, ref_idx = np.array([7, 2, 5]), np.array([4, 6])
    table, arrays = pipeline.results_table(ex, query_idx, qds, ref_idx, rds)
    rows = table.to_pylist()
    for q, row in enumerate(rows):
        n = int(ex.n_edits[q])
        assert row["query_id"] == f"test{query_idx[q]}" and row["n_edits"] == n
        assert row["true_name"] == qds.class_names[ex.true[q]] and row["pred_name"] == qds.class_names[ex.pred[q]]
        assert row["edit_ref_id"] == [f"train{ref_idx[ex.ref_index[q, t]]}" for t in range(n)]
        assert row["edit_query_row"] == ex.query_region[q, :n, 0].tolist()
        np.testing.assert_allclose(row["edit_p_true"], [ex.probs[q, t, ex.true[q]] for t in range(n)], rtol=1e-6)
        np.testing.assert_allclose(row["edit_p_pred"], [ex.probs[q, t, ex.pred[q]] for t in range(n)], rtol=1e-6)
        assert row["p_true_before"] == pytest.approx(ex.probs_before[q, ex.true[q]])
    assert [r["reason"] for r in rows] == ["success", "t_max reached", "no references"]
    np.testing.assert_array_equal(arrays["ref_index"], np.where(ex.ref_index >= 0, ref_idx[np.maximum(ex.ref_index, 0)], -1))
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
    qb, rb, ok = report.region_boxes(qr, rr, 3, 3, (4, 4))
    assert ok.all()
    for t in range(3):
        bq, br = _brute_boxes(tuple(qr[t]), tuple(rr[t]), 3, (4, 4))
        assert qb[t].tolist() == bq and rb[t].tolist() == br


def test_report_html_references_existing_pngs(tmp_path, monkeypatch):
    ex, qds, rds = _explanations(), _dataset("test", 10, 2), _dataset("train", 8, 3)
    table, arrays = pipeline.results_table(ex, np.array([7, 2, 5]), qds, np.array([4, 6]), rds)
    config = {"dataset": "toy", "split": "test", "reference_split": "train", "image_size": 16,
              "method": "fgvce", "region_size": 3}
    writer = store.ShardWriter(tmp_path / "out" / "fgvce", config)
    writer.write_shard(0, 0, 2, table.slice(0, 2), {k: v[:2] for k, v in arrays.items()})
    writer.write_shard(1, 2, 3, table.slice(2, 1), {k: v[2:] for k, v in arrays.items()})
    from fgvce_jax import data

    monkeypatch.setattr(data, "load", lambda name, split, image_size=None: qds if split == "test" else rds)
    page = report.write_report(tmp_path / "out")
    text = page.read_text()
    srcs = re.findall(r"<img src='([^']+)'", text)
    assert len(srcs) == Q
    for src in srcs:
        png = page.parent / src
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cat predicted as owl" not in text and "dog predicted as fox" in text
    assert "fixed after 2 edit(s)" in text and "not fixed (t_max reached, 3 edit(s))" in text
    assert not [p for p in page.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    # Re-running replaces the figures; a max of 1 query draws one.
    page = report.write_report(tmp_path / "out", max_queries=1)
    assert len(re.findall(r"<img src='([^']+)'", page.read_text())) == 1
    assert len(list((page.parent / "report_files" / "fgvce").iterdir())) == 1
    with pytest.raises(FgvceError, match="no explain results"):
        report.write_report(tmp_path)
    # The metrics table of `fgvce evaluate` is included when it exists.
    (tmp_path / "out" / "evaluation").mkdir()
    (tmp_path / "out" / "evaluation" / "metrics.json").write_text('[{"method": "fgvce", "del_ins": 0.25}]')
    assert "<td>0.250</td>" in report.write_report(tmp_path / "out").read_text()
