"""Result store: round trip, resume, config refusal, and interruption at every write step."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest

from fgvce_jax import store
from fgvce_jax.errors import FgvceError

CONFIG = {"method": "fgvce", "t_max": 3, "seed": 0, "shape": [8, 8]}


def _shard(i, n=4):
    """Deterministic rows for shard i: a table with list columns and two arrays."""
    rng = np.random.default_rng(i)
    ids = [f"q{i}_{j}" for j in range(n)]
    table = pa.table({
        "query_id": ids,
        "n_edits": np.arange(n, dtype=np.int32) + i,
        "edit_similarity": [list(rng.random(j).astype(np.float32)) for j in range(n)],
    })
    arrays = {"phi": rng.random((n, 8, 8)).astype(np.float32), "probs": rng.random((n, 3, 5))}
    return table, arrays


def _write_all(d, shards=(0, 1, 2), config=CONFIG):
    """Write the missing ones of ``shards`` into ``d``; the writer is returned closed (its lock released)."""
    with store.ShardWriter(d, config) as w:
        for i in shards:
            if i not in w.done:
                t, a = _shard(i)
                w.write_shard(i, 4 * i, 4 * i + 4, t, a)
    return w


def _files(d):
    return {p: (d / p).read_bytes() for p in sorted(os.listdir(d))}


def test_round_trip_in_shard_order(tmp_path):
    _write_all(tmp_path, shards=(2, 0, 1))  # written out of order, read in order
    table, arrays = store.read_results(tmp_path)
    expected = [_shard(i) for i in range(3)]
    assert table.column("query_id").to_pylist() == sum((t.column("query_id").to_pylist() for t, _ in expected), [])
    assert table.column("edit_similarity").to_pylist() == sum((t.column("edit_similarity").to_pylist() for t, _ in expected), [])
    np.testing.assert_array_equal(arrays["phi"], np.concatenate([a["phi"] for _, a in expected]))
    assert arrays["probs"].dtype == np.float64 and arrays["probs"].shape == (12, 3, 5)
    manifest = store.read_manifest(tmp_path)
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 4), (4, 8), (8, 12)]
    assert manifest["config_hash"] == store.config_hash(CONFIG)


def test_reopen_same_config_resumes(tmp_path):
    _write_all(tmp_path, shards=(0, 2))
    w = store.ShardWriter(tmp_path, dict(reversed(list(CONFIG.items()))))  # key order is irrelevant
    assert w.done == {0, 2}
    np.testing.assert_array_equal(w.done_rows(), [0, 1, 2, 3, 8, 9, 10, 11])


def _process_writers(d, config=CONFIG, n=2):
    """Writers of n processes sharing ``d``, opened as the pipeline opens them: process 0 first."""
    first = store.ShardWriter(d, config, process=0, processes=n)
    return [first] + [store.ShardWriter(d, config, process=p, processes=n) for p in range(1, n)]


def test_processes_record_their_own_shards_and_process_0_merges(tmp_path):
    d = tmp_path / "two"
    w0, w1 = _process_writers(d)
    for w, i in ((w1, 1), (w0, 0), (w1, 3), (w0, 2)):
        w.write_shard(i, 4 * i, 4 * i + 4, *_shard(i))
    assert [s["index"] for s in json.loads((d / "manifest.process-1.json").read_text())["shards"]] == [1, 3]
    assert store.read_manifest(d)["shards"] == []  # nothing is visible before the merge
    w1.merge()  # only process 0 merges
    assert store.read_manifest(d)["shards"] == []
    w0.merge()
    w0.close()
    assert not list(d.glob("manifest.process-*"))
    _write_all(tmp_path / "one", shards=(0, 1, 2, 3))
    assert _files(d) == _files(tmp_path / "one")  # the same bytes as one process writing all four


def test_shards_of_a_killed_process_are_kept_by_the_next_run(tmp_path):
    w0, w1 = _process_writers(tmp_path)
    w1.write_shard(1, 4, 8, *_shard(1))
    (tmp_path / ".shard-00003.parquet.x.tmp").write_bytes(b"half")  # process 1 killed while writing shard 3
    (tmp_path / "shard-00003.parquet").write_bytes(b"whole, but never recorded")
    w0.close()  # the run ends (killed: the kernel releases its lock)
    again = store.ShardWriter(tmp_path, CONFIG)  # resumed by one process (or process 0 of several)
    assert again.done == {1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "manifest.json", "shard-00001.npz",
                                                          "shard-00001.parquet"]
    assert [s["index"] for s in store.read_manifest(tmp_path)["shards"]] == [1]


def test_a_process_with_other_arguments_is_refused(tmp_path):
    store.ShardWriter(tmp_path, CONFIG, process=0, processes=2)
    with pytest.raises(FgvceError, match="every process must be given the same arguments"):
        store.ShardWriter(tmp_path, {**CONFIG, "t_max": 4}, process=1, processes=2)
    with pytest.raises(FgvceError, match="process 0 must open the directory first"):
        store.ShardWriter(tmp_path / "elsewhere", CONFIG, process=1, processes=2)


def test_different_config_refused_naming_keys(tmp_path):
    _write_all(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(FgvceError) as e:
        store.ShardWriter(tmp_path, {**CONFIG, "t_max": 5, "extra": 1})
    msg = str(e.value)
    assert "t_max: 3 -> 5" in msg and "extra" in msg and "seed" not in msg and "\n" not in msg
    assert _files(tmp_path) == before  # nothing touched
    w = store.ShardWriter(tmp_path, {**CONFIG, "t_max": 5}, overwrite=True)
    assert w.done == set() and store.read_results(tmp_path)[0].num_rows == 0
    assert not list(tmp_path.glob("shard-*"))


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(FgvceError, match="not a valid fgvce manifest"):
        store.ShardWriter(tmp_path, CONFIG)
    with pytest.raises(FgvceError, match="no manifest.json"):
        store.read_results(tmp_path / "missing")


def test_exception_mid_write_leaves_nothing_visible(tmp_path, monkeypatch):
    reference = tmp_path / "ref"
    _write_all(reference)
    d = tmp_path / "run"
    w = store.ShardWriter(d, CONFIG)
    w.write_shard(0, 0, 4, *_shard(0))
    real_savez = np.savez

    def failing_savez(f, **arrays):
        f.write(b"partial bytes")
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    t, a = _shard(1)
    with pytest.raises(RuntimeError):
        w.write_shard(1, 4, 8, t, a)
    monkeypatch.setattr(np, "savez", real_savez)
    assert store.read_results(d)[0].num_rows == 4  # shard 1 not visible
    assert not list(d.glob(".*.tmp"))  # temp file removed
    w.close()
    assert _write_all(d, shards=()).done == {0}
    _write_all(d)
    assert _files(d) == _files(reference)  # byte-identical once finished


_CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import test_store
    from fgvce_jax import store
    kill_at, calls = int(sys.argv[2]), [0]
    def tick(real):
        def wrapped(*a, **k):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        return wrapped
    os.fsync, os.replace = tick(os.fsync), tick(os.replace)
    test_store._write_all(__import__("pathlib").Path(sys.argv[1]))
""")


def test_killed_at_every_write_step_resumes_identically(tmp_path):
    """SIGKILL the writer before its k-th fsync/rename, for every k; the re-run must match."""
    reference = tmp_path / "ref"
    _write_all(reference)
    expected = _files(reference)
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=os.path.dirname(__file__)))
    k, killed = 0, 0
    while True:
        k += 1
        d = tmp_path / f"run{k}"
        proc = subprocess.run([sys.executable, str(script), str(d), str(k)], capture_output=True)
        if proc.returncode == 0:
            break
        assert proc.returncode == -9, proc.stderr.decode()
        killed += 1
        if (d / "manifest.json").exists():  # whatever is visible is complete and listed
            manifest = json.loads((d / "manifest.json").read_text())
            n = store.read_results(d)[0].num_rows
            assert n == 4 * len(manifest["shards"])
        _write_all(d)
        assert _files(d) == expected, f"kill before write step {k}"
    assert killed >= 9  # 4 manifests + 3 shards x 2 files, each with fsync + rename


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_and_directories_get_the_modes_of_the_umask(tmp_path, mask):
    """Results are readable by others under umask 022 (0644 files, 0755 directories), private under 077."""
    old = os.umask(mask)
    try:
        w = store.ShardWriter(tmp_path / "out" / "fgvce", CONFIG)
        w.write_shard(0, 0, 4, *_shard(0))
        store.save_arrays(w.cache_path("x"), {"key": np.asarray("k")})
    finally:
        os.umask(old)
    d = tmp_path / "out" / "fgvce"
    for p in (d / "shard-00000.parquet", d / "shard-00000.npz", d / "manifest.json", d / "cache-x.npz", d / ".lock"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p.name
    w.close()
    for p in (d, d.parent):
        assert p.stat().st_mode & 0o777 == 0o777 & ~mask


def test_a_manifest_without_shards_is_taken_over_by_another_config(tmp_path, capsys):
    """A failed run (no shard written) does not poison the directory; one with results still refuses."""
    store.ShardWriter(tmp_path, CONFIG).close()
    w = store.ShardWriter(tmp_path, {**CONFIG, "t_max": 5})
    err = capsys.readouterr().err
    assert "holds no results of its earlier config (t_max: 3 -> 5); reusing it" in err and err.count("\n") == 1
    assert store.read_manifest(tmp_path)["config"]["t_max"] == 5
    w.write_shard(0, 0, 4, *_shard(0))
    w.close()
    with pytest.raises(FgvceError, match="different config"):
        store.ShardWriter(tmp_path, CONFIG)
    w0, w1 = _process_writers(tmp_path / "two", {**CONFIG, "t_max": 5})
    w1.write_shard(1, 4, 8, *_shard(1))  # listed only in process 1's manifest (a killed run)
    w0.close()
    with pytest.raises(FgvceError, match="different config"):
        store.ShardWriter(tmp_path / "two", CONFIG)


def test_notes_are_stored_but_not_compared(tmp_path):
    with store.ShardWriter(tmp_path, CONFIG, notes={"model": "/old/place"}) as w:
        w.write_shard(0, 0, 4, *_shard(0))
    with store.ShardWriter(tmp_path, CONFIG, notes={"model": "/new/place"}) as w:
        assert w.done == {0}
    manifest = store.read_manifest(tmp_path)
    assert manifest["config"] == {**CONFIG, "model": "/new/place"}
    assert manifest["config_hash"] == store.config_hash(CONFIG)


def test_retain_forgets_shards_whose_rows_or_inputs_changed(tmp_path):
    with store.ShardWriter(tmp_path, CONFIG) as w:
        for i, inputs in ((0, "a"), (1, "b"), (2, "c")):
            w.write_shard(i, 4 * i, 4 * i + 4, *_shard(i), inputs=inputs)
    with store.ShardWriter(tmp_path, CONFIG) as w:
        assert w.retain({0: (0, 4, "a"), 1: (4, 8, "B"), 2: (8, 10, "c")}) == [1, 2]
        assert w.done == {0}
        assert [(s["index"], s["inputs"]) for s in store.read_manifest(tmp_path)["shards"]] == [(0, "a")]
        assert w.retain({0: (0, 4, "a")}) == []


def test_overwrite_removes_the_old_summary(tmp_path):
    """A summary.json left from the replaced config would give a killed --overwrite run the old query count."""
    _write_all(tmp_path)
    (tmp_path / "summary.json").write_text('{"queries": 12}')
    with store.ShardWriter(tmp_path, {**CONFIG, "t_max": 9}, overwrite=True):
        assert not (tmp_path / "summary.json").exists()
