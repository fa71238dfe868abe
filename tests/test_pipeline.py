"""explain_split on a hand-built model and dataset: resume after an interruption gives
byte-identical results, pass 1 is cached, configs are checked, methods get sub-directories."""
import dataclasses
import shutil
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fgvce_jax import counterfactual, data, models, pipeline, store
from fgvce_jax.counterfactual import CounterfactualConfig
from fgvce_jax.data.dataset import Preprocessing, array_stamp
from fgvce_jax.errors import FgvceError
from fgvce_jax.models.base import Classifier

C = 3
PREPROCESSING = dataclasses.asdict(Preprocessing(8, 8))  # the toy checkpoint's (ModelInfo's fields)
MODEL_DIR = Path(__file__).parent  # models.load is patched; the path only has to exist
CONFIG = CounterfactualConfig(kernel=3, samples=2, max_regions=4, n_references=2, candidates_per_reference=2, t_max=3)


class PatchLinear(Classifier):
    """f: 2x2 patches -> ReLU(linear) gives an (S/2, S/2, 8) map; g: mean over H, W then linear."""

    family, arch, split_points = "resnet", "patch_linear", ("z",)

    def __init__(self, rngs: nnx.Rngs):
        self.num_classes = C
        self.w_enc = nnx.Param(jax.random.normal(rngs.params(), (12, 8)))
        self.w_out = nnx.Param(jax.random.normal(rngs.params(), (8, C)))

    def encode(self, x, at=None):
        n, h, w, c = x.shape
        p = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h // 2, w // 2, 4 * c)
        return jax.nn.relu(p @ self.w_enc[...]), {}

    def head(self, z, ctx=None, at=None, token_mask=None):
        return z.mean((1, 2)) @ self.w_out[...]


class ToyData:
    """Random 8x8 images; labels = the model's prediction, except the test images chosen
    as mistakes, whose label is the model's second choice."""

    def __init__(self, split, images, labels):
        self.name, self.split, self.splits = "toy", split, ("train", "test")
        self._x, self.labels = images, labels
        self.ids = np.asarray([f"{split}-{i}" for i in range(len(labels))])
        self.class_names = ["a", "b", "c"]
        self.preprocessing = Preprocessing(8, 8)
        self.part_names = None  # no part masks or known causes (see Dataset.part_names)

    def __len__(self):
        return len(self.labels)

    @property
    def fingerprint(self):
        return array_stamp(self._x)

    def images(self, idx):
        return self._x[np.asarray(idx)]


@pytest.fixture(scope="module")
def toy():
    model = PatchLinear(nnx.Rngs(0))
    sm, params = models.split(model)
    rng = np.random.default_rng(0)
    sets = {}
    for split, n in (("train", 48), ("test", 24)):
        x = rng.normal(size=(n, 8, 8, 3)).astype(np.float32) + rng.normal(size=(n, 1, 1, 3)).astype(np.float32)
        order = np.argsort(-np.asarray(sm.head(params, *sm.encode(params, x))), -1)
        labels = order[:, 0].copy()
        if split == "test":
            labels[::3] = order[::3, 1]  # 8 mistakes
        sets[split] = ToyData(split, x, labels)
    assert len(set(sets["train"].labels)) == C  # every class has references
    info = types.SimpleNamespace(class_names=sets["test"].class_names, default_split="z", **PREPROCESSING)
    return model, info, sets


def _patch(mp, toy):
    model, info, sets = toy
    mp.setattr(models, "load", lambda path: (model, info))
    mp.setattr(data, "load", lambda name, split, **kw: sets[split])


@pytest.fixture
def patched(toy, monkeypatch):
    _patch(monkeypatch, toy)


def _run(out, config=CONFIG, **kw):
    """All runs use 3-query shards, so the jit caches are shared between tests."""
    return pipeline.explain_split(MODEL_DIR, "toy", "test", out, config, shard_size=3, **kw)


@pytest.fixture(scope="module")
def uninterrupted(toy, tmp_path_factory):
    """One uninterrupted run over the 8 mistakes: (out dir, summary)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "a"
    with pytest.MonkeyPatch.context() as mp:
        _patch(mp, toy)
        (summary,) = _run(out, batch_size=8)
    return out, summary


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "summary.json"}


def test_uninterrupted_run_explains_every_mistake(uninterrupted, toy):
    out, summary = uninterrupted
    test = toy[2]["test"]
    assert summary.queries == 8 and 0 <= summary.success_rate <= 1
    table, arrays = store.read_results(out / "fgvce")
    assert table.column("query_id").to_pylist() == [f"test-{i}" for i in range(0, 24, 3)]
    assert (arrays["true"] != arrays["pred"]).all() and (arrays["true"] == test.labels[::3]).all()
    assert [(s["start"], s["stop"]) for s in store.read_manifest(out / "fgvce")["shards"]] == [(0, 3), (3, 6), (6, 8)]


def test_interrupted_run_resumes_to_identical_results(tmp_path, uninterrupted, patched, monkeypatch):
    a = uninterrupted[0]
    real, calls = counterfactual.explain, []

    def explain_then_fail(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the second shard
        return real(*args, **kw)

    monkeypatch.setattr(counterfactual, "explain", explain_then_fail)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", batch_size=8)
    manifest = store.read_manifest(tmp_path / "b" / "fgvce")
    assert [s["index"] for s in manifest["shards"]] == [0]
    monkeypatch.setattr(counterfactual, "explain", real)

    def no_forward(*args, **kw):
        raise AssertionError("pass 1 should come from the cache")

    monkeypatch.setattr(pipeline, "_forward_jit", no_forward)
    _run(tmp_path / "b", batch_size=8)
    assert _files(tmp_path / "b" / "fgvce") == _files(a / "fgvce")
    for name in ("predictions-test.npz", "predictions-train.npz"):
        assert (tmp_path / "b" / name).read_bytes() == (a / name).read_bytes()


def test_predictions_match_the_model(uninterrupted, toy):
    model, _, sets = toy
    sm, params = models.split(model)
    for split, n in (("test", 24), ("train", 48)):  # batch 8 over 4 devices
        cached = store.load_arrays(uninterrupted[0] / f"predictions-{split}.npz")
        x = sets[split].images(np.arange(n))
        z = sm.encode(params, x)[0]
        np.testing.assert_allclose(cached["probs"], jax.nn.softmax(sm.head(params, z)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cached["pooled"], z.mean((1, 2)), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(cached["pred"], np.argmax(cached["probs"], -1))


def test_other_config_refused_and_methods_get_subdirectories(tmp_path, uninterrupted, patched):
    with pytest.raises(FgvceError, match=r"--t-max: 3 -> 4") as e:
        _run(uninterrupted[0], dataclasses.replace(CONFIG, t_max=4))
    assert "limit" not in str(e.value)
    with pytest.raises(FgvceError, match="each method may be given once"):
        _run(tmp_path / "o", [CONFIG, CONFIG])
    configs = [CONFIG, dataclasses.replace(CONFIG, method="random")]
    summaries = _run(tmp_path / "o", configs, limit=3)
    assert [s.method for s in summaries] == ["fgvce", "random"]
    for m in ("fgvce", "random"):
        assert store.read_results(tmp_path / "o" / m)[0].num_rows == 3


def test_given_query_ids(tmp_path, patched, capsys):
    _run(tmp_path / "o", queries=["test-9", "test-3", "test-9", "test-21"])  # a repeated id is explained once
    ids = store.read_results(tmp_path / "o" / "fgvce")[0].column("query_id").to_pylist()
    assert ids == ["test-9", "test-3", "test-21"]
    assert "notice: query id(s) given more than once are explained once: test-9\n" in capsys.readouterr().err
    assert store.read_manifest(tmp_path / "o" / "fgvce")["config"]["queries"] == ids
    with pytest.raises(FgvceError, match="correctly"):
        _run(tmp_path / "p", queries=["test-1"])


def test_a_checkpoint_without_class_names_takes_the_datasets(toy, tmp_path, monkeypatch, capsys):
    """A checkpoint converted without --class-names explains the same mistakes as one with them, with a notice;
    one with another number of outputs is refused in one line."""
    model, info, sets = toy
    monkeypatch.setattr(models, "load", lambda path: (model, types.SimpleNamespace(
        class_names=None, num_classes=C, default_split="z", **PREPROCESSING)))
    monkeypatch.setattr(data, "load", lambda name, split, **kw: sets[split])
    (summary,) = _run(tmp_path / "a")
    assert "no class names" in capsys.readouterr().err
    assert summary.queries == 8
    monkeypatch.setattr(models, "load", lambda path: (model, types.SimpleNamespace(
        class_names=None, num_classes=C + 1, default_split="z", **PREPROCESSING)))
    with pytest.raises(FgvceError, match=f"3 classes but the checkpoint has {C + 1} outputs"):
        _run(tmp_path / "b")


def test_a_failed_run_leaves_out_reusable(tmp_path, patched, capsys):
    """A run that fails before any shard (and releases its lock on the way out) does not poison --out."""
    with pytest.raises(FgvceError, match="unknown query id"):
        _run(tmp_path / "o", queries=["test-99"])
    (summary,) = _run(tmp_path / "o", limit=3)
    assert summary.queries == 3
    assert "holds no results of its earlier config" in capsys.readouterr().err


def test_a_moved_checkpoint_is_the_same_config(tmp_path, uninterrupted, patched, monkeypatch):
    out, moved = tmp_path / "copy", tmp_path / "moved"
    shutil.copytree(uninterrupted[0], out)
    moved.mkdir()

    def no_search(*args, **kw):
        raise AssertionError("every shard is done")

    monkeypatch.setattr(counterfactual, "explain", no_search)
    (summary,) = pipeline.explain_split(moved, "toy", "test", out, CONFIG, shard_size=3)
    assert summary.queries == 8
    config, before = (store.read_manifest(d / "fgvce")["config"] for d in (out, uninterrupted[0]))
    assert config == {**before, "model": str(moved)}  # the path is a note; the weights fingerprint decides


def test_a_larger_limit_reuses_the_full_shards(tmp_path, patched, monkeypatch):
    """--limit 3 then 5 (shards of 2): shard 0 is kept, the partial shard 1 and the new shard 2 are computed, and
    every shard file is byte-identical to a fresh --limit 5 run's. A smaller limit than stored is refused."""
    def explain(out, limit):
        return pipeline.explain_split(MODEL_DIR, "toy", "test", tmp_path / out, CONFIG, limit=limit, shard_size=2)

    def shards(d):
        return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*"))}

    explain("fresh", 5)
    explain("grown", 3)
    d = tmp_path / "grown" / "fgvce"
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in d.glob("shard-00000.*")}
    real, calls = counterfactual.explain, []
    monkeypatch.setattr(counterfactual, "explain", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    (summary,) = explain("grown", 5)
    assert len(calls) == 2 and summary.queries == 5
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in d.glob("shard-00000.*")} == kept
    assert len(shards(d)) == 6 and shards(d) == shards(tmp_path / "fresh" / "fgvce")
    assert store.read_manifest(d) == store.read_manifest(tmp_path / "fresh" / "fgvce")
    monkeypatch.setattr(store, "load_cache", None)  # refused before pass 1
    with pytest.raises(FgvceError, match="holds results of the first 5 queries, more than --limit 4; give a"):
        explain("grown", 4)
    assert store.read_manifest(d) == store.read_manifest(tmp_path / "fresh" / "fgvce")


def test_random_references_do_not_depend_on_the_limit_or_the_shard_size(tmp_path, patched, monkeypatch):
    """--reference-mode random ranks each reference by a draw from its own key: --limit 2 then 8 reuses shard 0
    and gives the files of a fresh run; shards of 3 give every query the same edits; another seed draws other
    references; a directory whose config lacks the draws' note (written before) is refused, naming it."""
    config = dataclasses.replace(CONFIG, reference_mode="random")

    def explain(out, limit=None, shard_size=2, c=config):
        return pipeline.explain_split(MODEL_DIR, "toy", "test", tmp_path / out, c, limit=limit, shard_size=shard_size)

    def shards(d):
        return {p.name: p.read_bytes() for p in sorted((tmp_path / d / "fgvce").glob("shard-*"))}

    def edits(d):
        table, arrays = store.read_results(tmp_path / d / "fgvce")
        return {q: (n, tuple(r[:n]), tuple(map(tuple, c[:n]))) for q, n, r, c in zip(
            table.column("query_id").to_pylist(), arrays["n_edits"], arrays["ref_split_index"], arrays["ref_region"])}

    explain("fresh", 8)
    explain("grown", 2)
    assert shards("grown")["shard-00000.npz"] == shards("fresh")["shard-00000.npz"]
    real, calls = counterfactual.explain, []
    monkeypatch.setattr(counterfactual, "explain", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    explain("grown", 8)
    assert len(calls) == 3 and shards("grown") == shards("fresh")
    monkeypatch.setattr(counterfactual, "explain", real)
    explain("by3", shard_size=3)
    base = edits("fresh")
    assert len(base) == 8 and edits("by3") == base and any(n for n, _, _ in base.values())
    assert store.read_manifest(tmp_path / "fresh" / "fgvce")["config"]["reference_draws"].startswith("uniform(")
    explain("seed", c=dataclasses.replace(config, seed=1))
    assert edits("seed") != base
    d = tmp_path / "grown" / "fgvce"
    manifest = store.read_manifest(d)
    del manifest["config"]["reference_draws"]
    manifest["config_hash"] = store.config_hash({k: v for k, v in manifest["config"].items() if k != "model"})
    store.atomic_write_json(d / "manifest.json", manifest)
    with pytest.raises(FgvceError, match=r"reference draws: '<unset>' -> 'uniform\("):
        explain("grown", 8)


def test_shard_inputs_are_the_shards_queries_and_rows_alone():
    q = ["test-0", "test-3"]
    assert pipeline.shard_inputs(q, 2) == pipeline.shard_inputs(list(q), 2)
    assert pipeline.shard_inputs(q, 2) != pipeline.shard_inputs(q, 3)
    assert pipeline.shard_inputs(q, 2) != pipeline.shard_inputs(q[:1], 2)
    assert pipeline.shard_inputs(q, 2) != pipeline.shard_inputs(q[::-1], 2)


def test_tolerance_sampling_reports_the_samples_it_used(tmp_path, patched, capsys):
    """--phi-tolerance: one line per pass with the mean samples per window. A tiny tolerance samples every
    window up to --samples (32) unless its samples all agree; a huge one stops after the two rounds it always takes (2 x 8 samples)."""
    def mean_used(tolerance):
        config = dataclasses.replace(CONFIG, samples=32, phi_tolerance=tolerance)
        _run(tmp_path / str(tolerance), config, limit=3)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "--phi-tolerance" in line and "samples per window" in line]
        assert [line.split(":")[0] for line in lines] == ["pass 3", "pass 4"], err
        return [float(line.split(" used ")[1].split()[0]) for line in lines]

    tiny = mean_used(1e-9)  # only a window whose samples all agree (standard error 0) may stop before 32
    assert all(30.0 < v <= 32.0 for v in tiny) and 32.0 in tiny, tiny
    assert mean_used(1e6) == [16.0, 16.0]


@pytest.mark.parametrize("field, value", [("outside", "present"), ("stratified", True)])
def test_local_phi_options_run_through_explain_and_are_stored_only_when_set(tmp_path, patched, toy, field, value):
    """--outside present (the players outside each window kept at the query's features) and --stratified (size-
    stratified draws): the stored query Phi is saliency.compute's with that option (from the query's own key), it
    differs from the default run's, and the stored config names it; the default is not stored, so older
    directories still match."""
    from fgvce_jax import keys as run_keys
    from fgvce_jax import saliency

    default = dataclasses.replace(CONFIG, screen_samples=None, samples=4)
    _run(tmp_path / "default", default, limit=3)
    _run(tmp_path / "set", dataclasses.replace(default, **{field: value}), limit=3)
    assert store.read_manifest(tmp_path / "set" / "fgvce")["config"][field] == value
    assert field not in store.read_manifest(tmp_path / "default" / "fgvce")["config"]
    table, arrays = store.read_results(tmp_path / "set" / "fgvce")
    model, _, sets = toy
    sm, params = models.split(model)
    idx = arrays["query_split_index"]
    z, ctx = sm.encode(params, jnp.asarray(sets["test"].images(idx)))
    want = saliency.compute(sm, params, z, ctx, jnp.asarray(arrays["pred"]), method="local", kernel=3, samples=4,
                            keys=run_keys.image_keys(0, run_keys.PHI, "test", sets["test"].ids[idx]), **{field: value})
    np.testing.assert_allclose(arrays["query_phi"], want, rtol=1e-5, atol=1e-7)
    other = store.read_results(tmp_path / "default" / "fgvce")[1]["query_phi"]
    assert not np.allclose(other, arrays["query_phi"])


def test_screening_runs_through_explain_says_so_and_keys_its_own_cache(tmp_path, patched, capsys):
    """--screen: the plan line says what each map keeps (4 x 4 maps: margin 1 x K 4 query, x 2 reference
    windows), the stored config and the reference cache are the screened ones, and Phi differs from the
    unscreened run; a screen that would not save evaluations is reported off and gives the unscreened Phi."""
    full = dataclasses.replace(CONFIG, samples=8, screen_samples=None)
    screened = dataclasses.replace(full, screen_samples=2, screen_margin=1)
    _run(tmp_path / "full", full, limit=3)
    _run(tmp_path / "screened", screened, limit=3)
    err = capsys.readouterr().err
    assert "(screened: 2 samples per window first, then 8 at the top 4 of 16 query and the top 2 of 16 " \
           "reference windows)" in err, err
    stored = store.read_manifest(tmp_path / "screened" / "fgvce")["config"]
    assert stored["screen_samples"] == 2 and stored["screen_margin"] == 1
    assert "screen_samples" not in store.read_manifest(tmp_path / "full" / "fgvce")["config"]
    a, b = (store.read_results(tmp_path / d / "fgvce")[1]["query_phi"] for d in ("full", "screened"))
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert len(list((tmp_path / "screened").glob("cache-reference-phi-*.npz"))) == 1

    wide = dataclasses.replace(full, screen_samples=6, screen_margin=4)  # 16 x 6 + 16 x 8 > 16 x 8
    _run(tmp_path / "wide", wide, limit=3)
    assert "(--screen 6 would not save evaluations on this map: off)" in capsys.readouterr().err
    np.testing.assert_array_equal(store.read_results(tmp_path / "wide" / "fgvce")[1]["query_phi"], a)


def test_a_damaged_shard_is_named_then_recomputed_alone_to_identical_results(tmp_path, uninterrupted, patched,
                                                                                capsys):
    """Truncate one shard's Parquet file and flip a byte of another's npz: reading the results names the file;
    the next explain says which shards it recomputes, computes only those, and ends byte-identical."""
    a = uninterrupted[0]
    b = tmp_path / "b"
    shutil.copytree(a, b)
    parquet, npz = b / "fgvce" / "shard-00001.parquet", b / "fgvce" / "shard-00002.npz"
    parquet.write_bytes(parquet.read_bytes()[:50])
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz.write_bytes(bytes(raw))
    with pytest.raises(FgvceError, match=r"shard-00001.parquet is damaged \(its bytes differ from those written\); "
                                         r"re-run `fgvce explain`"):
        store.read_results(b / "fgvce")
    capsys.readouterr()
    real, calls = counterfactual.explain, []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(counterfactual, "explain", lambda *args, **kw: calls.append(1) or real(*args, **kw))
        _run(b, batch_size=8)
    err = capsys.readouterr().err
    assert "shard-00001.parquet is damaged" in err and "shard 1 will be computed again" in err
    assert "shard-00002.npz is damaged" in err and "shard 2 will be computed again" in err
    assert len(calls) == 2  # shards 1 and 2 only
    assert _files(b / "fgvce") == _files(a / "fgvce")


def test_a_split_that_lost_an_image_is_predicted_again_not_read_from_the_stale_cache(toy, tmp_path, monkeypatch,
                                                                                     capsys):
    """Pass 1's cache is keyed by the split's content: after one test image is removed, the cached
    predictions (one row per old image) are not used (a notice says so), adding to the old results is refused
    naming the data, and a run of another method equals a fresh one on the smaller split."""
    model, info, sets = toy
    _patch(monkeypatch, toy)
    _run(tmp_path / "a", limit=3)
    t = sets["test"]
    smaller = ToyData("test", t._x[1:], t.labels[1:])
    smaller.ids = t.ids[1:]
    monkeypatch.setattr(data, "load", lambda name, split, **kw: smaller if split == "test" else sets[split])
    with pytest.raises(FgvceError, match=r"different config \(the images of toy \(content fingerprint by split\)"):
        _run(tmp_path / "a", limit=3)
    capsys.readouterr()
    (again,) = _run(tmp_path / "a", dataclasses.replace(CONFIG, method="cve"), limit=3)
    assert "predictions-test.npz is stale" in capsys.readouterr().err
    (fresh,) = _run(tmp_path / "b", dataclasses.replace(CONFIG, method="cve"), limit=3)
    assert (again.queries, again.success_rate, again.mean_edits) == (fresh.queries, fresh.success_rate,
                                                                     fresh.mean_edits)
    cached = np.load(tmp_path / "a" / "predictions-test.npz")
    assert len(cached["pred"]) == len(smaller)
