"""Counterfactual methods as plug-ins: a toy method registered here runs through the pipeline, evaluate, report
and the CLI without touching any other file; ``random`` draws one map per query from that query's own key;
directories of another schema are refused in one line, and the package has no import cycles."""
import ast
import dataclasses
import json
import subprocess
import sys
import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_pipeline import CONFIG, MODEL_DIR, ToyData, patched, toy  # noqa: F401  (fixtures)

from fgvce_jax import evaluate, models, pipeline, report, results, store
from fgvce_jax.commands import explain as explain_command
from fgvce_jax.counterfactual import CounterfactualConfig, methods
from fgvce_jax.counterfactual.partition import partition
from fgvce_jax.errors import FgvceError


@dataclasses.dataclass(frozen=True)
class TopCellParams:
    cells: int = dataclasses.field(default=1, metadata={"help": "how many top-|Phi| cells may be replaced"})

    def validate(self):
        if self.cells < 1:
            raise FgvceError(f"--top-cell-cells must be at least 1; got {self.cells}")


class TopCell(methods.Method):
    """Replace the highest-|Phi| cell (gradient x activation) with the most similar candidate."""

    Params = TopCellParams
    saliency = "gradient"

    def query_regions(self, config, phi):
        return partition(jnp.abs(phi), region_size=1, max_regions=self.params.cells)

    def per_query(self, config, phi, regions):
        return {"top_abs_phi": np.abs(phi).reshape(len(phi), -1).max(-1).astype(np.float32)}


@pytest.fixture
def top_cell():
    methods.register("top-cell")(TopCell)
    yield
    methods.unregister("top-cell")


def _explain(out, config, **kw):
    return pipeline.explain_split(MODEL_DIR, "toy", "test", out, config, shard_size=3, **kw)


def test_a_method_registered_in_a_test_runs_through_explain_evaluate_report_and_the_cli(
        top_cell, patched, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(ToyData, "raw_image", lambda self, i: np.clip(self._x[i] * 0.2 + 0.5, 0, 1), raising=False)
    config = dataclasses.replace(CONFIG, method="top-cell", params=TopCellParams(cells=1))
    (summary,) = _explain(tmp_path / "out", config)
    assert summary.method == "top-cell" and summary.queries == 8
    table, arrays = store.read_results(tmp_path / "out" / "top-cell")
    assert (np.asarray(table.column("n_edits").to_pylist()) <= 1).all()  # one region: at most one edit
    phi = arrays["query_phi"]
    np.testing.assert_allclose(table.column("top_abs_phi").to_numpy(), np.abs(phi).reshape(8, -1).max(-1),
                               rtol=1e-6)
    for q, n in enumerate(arrays["n_edits"]):  # the edited cell is the top-|Phi| one
        if n:
            assert np.abs(phi[q])[tuple(arrays["query_region"][q, 0])] == np.abs(phi[q]).max()
    stored = store.read_manifest(tmp_path / "out" / "top-cell")["config"]
    assert stored["params.cells"] == 1 and stored["schema"] == results.SCHEMA
    with pytest.raises(FgvceError, match=r"--top-cell-cells: 1 -> 2"):
        _explain(tmp_path / "out", dataclasses.replace(config, params=TopCellParams(cells=2)))
    rows, _ = evaluate.evaluate_directory(tmp_path / "out", use_rise=False, parts=False)
    assert [r["method"] for r in rows] == ["top-cell"] and rows[0]["queries"] == 8
    page = report.write_report(tmp_path / "out", max_queries=2).read_text()
    assert "id='m-top-cell'" in page and "params.cells" in page

    parser = argparse.ArgumentParser()
    explain_command.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--dataset", "d", "--out", "o", "--method", "top-cell", "fgvce",
                              "--top-cell-cells", "3", "--t-max", "2"])
    got = explain_command.configs_from_args(args)
    assert [c.method for c in got] == ["top-cell", "fgvce"] and got[0].params == TopCellParams(cells=3)
    assert got[0].t_max == got[1].t_max == 2
    with pytest.raises(FgvceError, match="--top-cell-cells must be at least 1"):
        CounterfactualConfig(method="top-cell", params=TopCellParams(cells=0))


def test_cve_stores_the_region_size_it_ran_with_and_no_setting_it_ignores(patched, tmp_path):  # noqa: F811
    config = dataclasses.replace(CONFIG, method="cve", region_size=2, samples=7)
    _explain(tmp_path / "out", config, limit=3)
    stored = store.read_manifest(tmp_path / "out" / "cve")["config"]
    table, _ = store.read_results(tmp_path / "out" / "cve")
    assert stored["region_size"] == 1 and set(table.column("region_size").to_pylist()) == {1}
    assert stored["selection"] == "joint" and stored["lam"] == 0.0
    assert "samples" not in stored and "kernel" not in stored
    (summary,) = _explain(tmp_path / "out", dataclasses.replace(config, samples=9), limit=3)  # ignored: reused
    assert summary.queries == 3


def _random_maps(out, **kw):
    _explain(out, dataclasses.replace(CONFIG, method="random", seed=5), **kw)
    table, arrays = store.read_results(out / "random")
    return dict(zip(table.column("query_id").to_pylist(), arrays["query_phi"]))


def test_random_draws_one_map_per_query_whatever_the_shards_or_the_limit(patched, tmp_path):  # noqa: F811
    base = _random_maps(tmp_path / "a")
    assert len(base) == 8
    maps = np.stack(list(base.values()))
    assert len({m.tobytes() for m in maps}) == 8  # every query its own map, also across shards
    assert (maps > 0).all() and (maps <= 1).all()
    for name, kw in (("again", {}), ("shards", {"shard_size": 2}), ("limit", {"limit": 5})):
        if "shard_size" in kw:
            pipeline.explain_split(MODEL_DIR, "toy", "test", tmp_path / name,
                                   dataclasses.replace(CONFIG, method="random", seed=5), shard_size=2)
            table, arrays = store.read_results(tmp_path / name / "random")
            other = dict(zip(table.column("query_id").to_pylist(), arrays["query_phi"]))
        else:
            other = _random_maps(tmp_path / name, **kw)
        assert other and all(other[q].tobytes() == base[q].tobytes() for q in other), name
    _explain(tmp_path / "seed", dataclasses.replace(CONFIG, method="random", seed=6))
    table, arrays = store.read_results(tmp_path / "seed" / "random")
    assert not np.array_equal(arrays["query_phi"], maps)


def test_a_directory_of_another_schema_reads_or_is_refused_in_one_line(patched, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(ToyData, "raw_image", lambda self, i: np.clip(self._x[i] * 0.2 + 0.5, 0, 1), raising=False)
    _explain(tmp_path / "out", CONFIG, limit=3)
    run = tmp_path / "out" / "fgvce"
    now, _ = results.load_run(run)
    manifest = json.loads((run / store.MANIFEST).read_text())
    del manifest["config"]["schema"]  # as written before schema versions: 1, with version 1's field names
    old_name = {new: old for old, new in results.RENAMED_IN_2.items()}
    for shard in manifest["shards"]:
        parquet, npz = run / f"{shard['name']}.parquet", run / f"{shard['name']}.npz"
        table = pq.read_table(parquet)
        pq.write_table(table.rename_columns([old_name.get(c, c) for c in table.column_names]), parquet)
        np.savez(npz, **{old_name.get(k, k): v for k, v in store.load_arrays(npz).items()})
        shard["sha256"] = {"parquet": store.file_digest(parquet), "npz": store.file_digest(npz)}
    (run / store.MANIFEST).write_text(json.dumps(manifest))
    assert "edit_ref_index" in pq.read_table(run / "shard-00000.parquet").column_names
    e, config = results.load_run(run)  # schema 1 still reads, in version 2's names
    assert len(e.success) == 3 and "schema" not in config
    for name in ("query_split_index", "ref_split_index", "ref_id", "query_id", "n_edits"):
        np.testing.assert_array_equal(getattr(e, name), getattr(now, name))
    config_1, table_1, _ = results.read(run)
    assert "edit_ref_split_index" in table_1.column_names and "edit_ref_index" not in table_1.column_names
    assert "Validity" in report.write_report(tmp_path / "out", max_queries=3).read_text()  # draws its edits too
    with pytest.raises(FgvceError, match=r"holds results of explain-output schema 1; this fgvce writes schema 2") as err:
        _explain(tmp_path / "out", CONFIG, limit=3)
    assert "\n" not in str(err.value)
    manifest["config"]["schema"] = 99
    (run / store.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FgvceError, match="holds explain-output schema 99; this fgvce reads schemas 1, 2"):
        results.load_run(run)


@dataclasses.dataclass(frozen=True)
class GradStepsParams:
    step: float = dataclasses.field(default=0.5, metadata={"help": "size of each signed-gradient step"})
    steps: int = dataclasses.field(default=4, metadata={"help": "most steps"})

    def validate(self):
        if not self.step > 0:
            raise FgvceError(f"--grad-steps-step must be positive; got {self.step}")


class GradSteps(methods.RenderingMethod):
    """A toy rendering method: signed-gradient steps on log p(true) - log p(pred) in pixel space until the
    classifier predicts the true class (FGSM-like); its 'model' is the classifier itself."""

    Params = GradStepsParams
    needs = "gradient of the classifier"
    metric_columns = {"path_l2": "Path L2 ↓"}

    def prepare(self, split_model, params, dataset):
        def margin(x, t, s):
            logp = jax.nn.log_softmax(split_model.logits(params, x[None])[0])
            return logp[t] - logp[s]
        return jax.jit(jax.vmap(jax.grad(margin)))

    def explain_batch(self, grad, split_model, params, images, true, pred, keys):
        x, path, p_true = jnp.asarray(images), [], []
        for _ in range(self.params.steps):
            x = x + self.params.step * jnp.sign(grad(x, jnp.asarray(true), jnp.asarray(pred)))
            probs = jax.nn.softmax(split_model.logits(params, x), -1)
            path.append(np.asarray(x))
            p_true.append(np.asarray(probs)[np.arange(len(true)), true])
        path, p_true = np.stack(path, 1), np.stack(p_true, 1)
        flipped = np.asarray(jax.nn.softmax(split_model.logits(params, jnp.asarray(path.reshape(-1, *images.shape[1:]))))
                             ).argmax(-1).reshape(len(true), -1) == np.asarray(true)[:, None]
        success = flipped.any(1)
        n_edits = np.where(success, flipped.argmax(1) + 1, self.params.steps)
        final = path[np.arange(len(true)), n_edits - 1]
        return methods.Rendered(success=success, reason=np.where(success, "flipped", "never_t"), n_edits=n_edits,
                                columns={"p_true_path": p_true,
                                         "l2": np.sqrt(((final - images) ** 2).sum((1, 2, 3)))},
                                arrays={"path": path})

    def metrics(self, split_model, params, dataset, stored):
        l2 = stored.arrays["l2"][stored.success]
        return {"path_l2": float(l2.mean()) if l2.size else float("nan")}

    def overview(self):
        return [methods.Figure("the step size, as a grey level", np.full((4, 4, 3), int(255 * self.params.step),
                                                                         np.uint8))]

    def figures(self, row, arrays, query_image):
        frames = (np.clip(arrays["path"] * 0.2 + 0.5, 0, 1) * 255).astype(np.uint8)
        return [methods.Figure("the query", (query_image * 255).astype(np.uint8)),
                methods.Figure("the path, step by step", frames)]


@pytest.fixture
def grad_steps():
    methods.register("grad-steps")(GradSteps)
    yield
    methods.unregister("grad-steps")


def test_a_rendering_method_registered_in_a_test_runs_through_explain_evaluate_report_and_the_cli(
        grad_steps, patched, toy, tmp_path, monkeypatch):  # noqa: F811
    """The hook for methods that explain with a model of their own (Mirror-CFE's decoder, GLANCE's generator):
    its rows, columns and arrays are stored, the stored counterfactuals really are classified as the true class
    exactly where it says success, the shard size does not change them, and evaluate and report show its metrics
    and figures (a GIF for the path)."""
    monkeypatch.setattr(ToyData, "raw_image", lambda self, i: np.clip(self._x[i] * 0.2 + 0.5, 0, 1), raising=False)
    config = dataclasses.replace(CONFIG, method="grad-steps", params=GradStepsParams(step=0.05, steps=4))
    (summary,) = _explain(tmp_path / "out", config)
    assert summary.method == "grad-steps" and summary.queries == 8
    stored, cfg = results.load_run(tmp_path / "out" / "grad-steps")
    assert isinstance(stored, results.StoredRendered) and cfg["flow"] == "render" and cfg["params.steps"] == 4
    assert "samples" not in cfg and "n_references" not in cfg  # it uses none of the swap engine's settings
    model, _, sets = toy
    sm, params = models.split(model)
    final = stored.arrays["path"][np.arange(8), stored.n_edits - 1]
    pred = np.asarray(sm.logits(params, jnp.asarray(final))).argmax(-1)
    np.testing.assert_array_equal(pred == stored.true, stored.success)  # an independent check of its claim
    assert 0 < stored.success.sum() < 8 and (stored.n_edits >= 1).all() and (stored.n_edits <= 4).all()
    np.testing.assert_array_equal(stored.pred, np.asarray(sm.logits(params, jnp.asarray(
        sets["test"].images(stored.query_split_index)))).argmax(-1))
    assert stored.table.column("p_true_path").type == pa.list_(pa.float32())
    pipeline.explain_split(MODEL_DIR, "toy", "test", tmp_path / "s8", config, shard_size=8)
    other, _ = results.load_run(tmp_path / "s8" / "grad-steps")
    for k in ("path", "l2", "success", "n_edits"):
        np.testing.assert_array_equal(other.arrays[k], stored.arrays[k])
    (again,) = _explain(tmp_path / "out", config)  # every shard done: reused
    assert again.queries == 8

    rows, files = evaluate.evaluate_directory(tmp_path / "out", use_rise=False, parts=False)
    (row,) = rows
    assert row["method"] == "grad-steps" and row["validity"] == stored.success.mean()
    assert row["path_l2"] == pytest.approx(stored.arrays["l2"][stored.success].mean())
    assert "Path L2 ↓" in (tmp_path / "out" / "evaluation" / "table.md").read_text()
    page = report.write_report(tmp_path / "out", max_queries=2).read_text()
    assert "id='m-grad-steps'" in page and "the path, step by step" in page and "Path L2 (lower is better)" in page
    assert page.count("<figcaption>the step size, as a grey level") == 1 and "6 more queries not drawn" in page
    gifs = sorted((tmp_path / "out" / "report_files" / "grad-steps").glob("*.gif"))
    assert len(gifs) == 2
    from PIL import Image
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == 4

    parser = argparse.ArgumentParser()
    explain_command.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--dataset", "d", "--out", "o", "--method", "grad-steps",
                              "--grad-steps-step", "0.25"])
    (got,) = explain_command.configs_from_args(args)
    assert got.params == GradStepsParams(step=0.25, steps=4) and got.params != config.params
    with pytest.raises(FgvceError, match="--grad-steps-step must be positive"):
        CounterfactualConfig(method="grad-steps", params=GradStepsParams(step=0.0))


def _imports(path: Path, modules, top_level_only: bool) -> set[str]:
    """The package modules a file imports (at module level only, or anywhere): ``from p import x`` imports the
    module ``p.x`` where there is one, else ``p``."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return found & set(modules)


def _modules():
    root = Path(__file__).parents[1] / "fgvce_jax"
    out = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def test_the_package_has_no_import_cycles_and_evaluate_and_report_do_not_import_the_pipeline():
    modules = _modules()
    graph = {m: _imports(p, modules, True) - {m} for m, p in modules.items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    for m in ("fgvce_jax.evaluate", "fgvce_jax.report", "fgvce_jax.results"):
        assert "fgvce_jax.pipeline" not in _imports(modules[m], modules, False), m


def test_methods_are_listed_fgvce_first_whichever_method_module_is_imported_first():
    """The registry's order is the order of tables and reports; importing one method's module first (here
    ``cve``, first in sorted order) must not change it. A fresh interpreter, so that nothing is imported yet."""
    code = ("import fgvce_jax.counterfactual.methods.cve, fgvce_jax.evaluate as e; "
            "print(','.join(e.method_order()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "fgvce,cve,global,gradient,single-step,random,mirror,glance,gradcam"
