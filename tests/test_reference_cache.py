"""The reference-Phi cache of the pipeline (pipeline.reference_phi): a hit is byte-identical to a fresh
computation and computes nothing; a changed weight, setting, image or class misses; a damaged file is
recomputed; a reference's Phi depends on the run seed and its id only, not on the batch or method."""
import dataclasses
import shutil

import jax
import numpy as np
import pytest

from fgvce_jax import keys, models, pipeline, saliency, store
from fgvce_jax.counterfactual import FeatureBatch
from test_pipeline import CONFIG, _patch, _run, toy  # noqa: F401  (toy is a fixture)


@pytest.fixture(scope="module")
def refs(toy):  # noqa: F811
    """(split model, params, FeatureBatch of 5 train images, their ids)."""
    model, _, sets = toy
    sm, params = models.split(model)
    train = sets["train"]
    z = np.asarray(sm.encode(params, train.images(np.arange(5)))[0])
    return sm, params, FeatureBatch(z, {}, train.labels[:5], train.labels[:5], z.mean((1, 2))), train.ids[:5]


@pytest.fixture
def calls(monkeypatch):
    """The (batch size, class) of every Phi computation the pipeline makes."""
    made, real = [], pipeline.phi_and_samples

    def counted(split_model, params, batch, classes, config, **kw):
        made.append((np.shape(batch.z)[0], int(np.asarray(classes)[0])))
        return real(split_model, params, batch, classes, config, **kw)

    monkeypatch.setattr(pipeline, "phi_and_samples", counted)
    return made


def phi_of(refs, cache_dir, config=CONFIG, *, batch=None, ids=None, params=None):
    sm, p, b, i = refs
    p = p if params is None else params
    cache_dir.mkdir(parents=True, exist_ok=True)
    return pipeline.reference_phi(sm, p, b if batch is None else batch, i if ids is None else ids, config,
                                  split="train", cache_dir=cache_dir, weights=pipeline.fingerprint(p), mesh=None)


def cache_file(d):
    (path,) = d.glob("cache-reference-phi-*.npz")
    return path


def test_hit_is_byte_identical_and_computes_nothing(refs, tmp_path, calls):
    fresh = phi_of(refs, tmp_path)
    assert len(calls) == 5 and all(n == 1 for n, _ in calls)  # one reference per call
    again = phi_of(refs, tmp_path)
    assert len(calls) == 5 and again.tobytes() == fresh.tobytes()
    other_method = phi_of(refs, tmp_path, dataclasses.replace(CONFIG, method="single-step", t_max=5))
    assert len(calls) == 5 and other_method.tobytes() == fresh.tobytes()  # same saliency settings: shared
    assert phi_of(refs, tmp_path / "..", dataclasses.replace(CONFIG, method="cve")) is None


def test_phi_depends_on_seed_and_id_only(refs, tmp_path):
    """Each row is saliency.compute on that reference alone with its key (seed, Phi stream, split, id), whatever else is
    in the batch: a subset in another order, in a fresh cache, gives the same rows."""
    sm, params, batch, ids = refs
    full = phi_of(refs, tmp_path / "a")
    order = np.array([3, 0])
    sub = FeatureBatch(batch.z[order], {}, batch.labels[order], batch.preds[order], batch.pooled[order])
    part = phi_of(refs, tmp_path / "b", batch=sub, ids=ids[order])
    assert part.tobytes() == full[order].tobytes()
    alone = saliency.compute(sm, params, batch.z[3:4], {}, batch.labels[3:4], method="local", kernel=CONFIG.kernel,
                             samples=CONFIG.samples, keys=keys.image_keys(CONFIG.seed, keys.PHI, "train", ids[3:4]))
    np.testing.assert_array_equal(np.asarray(alone)[0], full[3])
    assert not np.array_equal(full, phi_of(refs, tmp_path / "c", ids=[f"x{i}" for i in ids]))


@pytest.mark.parametrize("change,recomputed", [
    ("weights", 5), ("samples", 5), ("kernel", 5), ("baseline", 5), ("seed", 5), ("image", 1), ("class", 1)])
def test_a_change_misses(refs, tmp_path, calls, capsys, change, recomputed):
    sm, params, batch, ids = refs
    before = phi_of(refs, tmp_path)
    kw, config = {}, CONFIG
    if change == "weights":
        kw["params"] = jax.tree.map(lambda a: a * 1.01, params)
    elif change in ("samples", "kernel", "seed"):
        config = dataclasses.replace(CONFIG, **{change: getattr(CONFIG, change) + 2})
    elif change == "baseline":
        config = dataclasses.replace(CONFIG, baseline="mean")
    elif change == "image":
        z = batch.z.copy()
        z[2, 0, 0, 0] += 1.0
        kw["batch"] = batch._replace(z=z)
    else:
        labels = batch.labels.copy()
        labels[2] = (labels[2] + 1) % 3
        kw["batch"] = batch._replace(labels=labels)
    del calls[:]
    after = phi_of(refs, tmp_path, config, **kw)
    assert len(calls) == recomputed
    if recomputed == 1:  # only the changed reference, with a notice; the others are reused
        assert "1 cached reference Phi maps" in capsys.readouterr().err
        assert calls[0][1] == int(kw["batch"].labels[2])
        np.testing.assert_array_equal(np.delete(after, 2, 0), np.delete(before, 2, 0))
    assert not np.array_equal(after, before)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing array"])
def test_damaged_cache_is_recomputed(refs, tmp_path, calls, capsys, damage):
    fresh = phi_of(refs, tmp_path)
    path = cache_file(tmp_path)
    data = path.read_bytes()
    if damage == "missing array":
        arrays = store.load_arrays(path)
        del arrays["fingerprints"]
        store.save_arrays(path, arrays)
    else:
        path.write_bytes({"truncate": data[:len(data) // 2], "garbage": b"not an npz" * 9, "empty": b""}[damage])
    del calls[:]
    again = phi_of(refs, tmp_path)
    assert len(calls) == 5 and "recomputing" in capsys.readouterr().err
    assert again.tobytes() == fresh.tobytes()
    assert store.load_arrays(path)["phi"].tobytes() == fresh.tobytes()  # and the file was rewritten whole


def test_pipeline_computes_reference_phi_once_across_methods_and_runs(toy, tmp_path, calls, monkeypatch):  # noqa: F811
    _patch(monkeypatch, toy)
    configs = [CONFIG, dataclasses.replace(CONFIG, method="single-step")]
    _run(tmp_path / "a", configs, limit=3)
    n_refs = sum(n == 1 for n, _ in calls)
    assert n_refs > 0 and sum(n == 3 for n, _ in calls) == 2  # one query shard per method
    assert len({c for n, c in calls if n == 1}) >= 1 and n_refs == len(set(store.load_arrays(
        cache_file(tmp_path / "a"))["ids"]))  # each reference once, for both methods
    (tmp_path / "b").mkdir()
    shutil.copy(cache_file(tmp_path / "a"), tmp_path / "b")
    del calls[:]
    _run(tmp_path / "b", configs, limit=3)
    assert all(n == 3 for n, _ in calls)  # no reference Phi computed: the cache of run a was used
    for m in ("fgvce", "single-step"):
        for f in ("shard-00000.parquet", "shard-00000.npz"):
            assert (tmp_path / "a" / m / f).read_bytes() == (tmp_path / "b" / m / f).read_bytes()
