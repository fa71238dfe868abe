"""End to end through the `fgvce` command on digits with a small budget:
train -> explain -> report, a killed explain that resumes identically, CLI errors, and the same run split
over two jax.distributed processes (whole and killed in one process)."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgvce_jax import cli, data, store

DOCS = Path(__file__).parent.parent / "docs" / "output_format.md"
EXPLAIN = ["--dataset", "digits", "--split", "test", "--limit", "5", "--samples", "4", "--t-max", "4",
           "--references", "3", "--max-regions", "6", "--shard-size", "1", "--batch-size", "256"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """train (2 epochs) -> explain (5 mistakes) -> report, through cli.main."""
    d = tmp_path_factory.mktemp("e2e")
    assert cli.main(["train", "--arch", "resnet_tiny", "--dataset", "digits", "--epochs", "2",
                     "--out", str(d / "model")]) == 0
    assert cli.main(["explain", "--model", str(d / "model"), "--out", str(d / "explanations"), *EXPLAIN]) == 0
    assert cli.main(["report", str(d / "explanations")]) == 0
    return d


def _documented_columns():
    section = DOCS.read_text().split("## Parquet columns")[1].split("##")[0]
    names = []
    for cell in re.findall(r"^\| (`[^|]+`) \|", section, re.M):
        names += re.findall(r"`([^`]+)`", cell)
    return names


def test_explain_and_report_produce_the_documented_files(run_dir):
    out = run_dir / "explanations"
    assert (out / "predictions-test.npz").exists() and (out / "predictions-train.npz").exists()
    assert any(out.glob("cache-reference-phi-*.npz"))
    for name in ("manifest.json", "summary.json", "shard-00000.parquet", "shard-00000.npz"):
        assert (out / "fgvce" / name).exists(), name
    table, arrays = store.read_results(out / "fgvce")
    assert table.num_rows == 5
    assert table.column_names == _documented_columns()
    for name in re.findall(r"`(\w+) \(Q", DOCS.read_text()):
        assert arrays[name].shape[0] == 5, name
    assert any(table.column("success").to_pylist()), "no successful counterfactual"
    page = out / "report.html"
    srcs = re.findall(r"<img src='([^']+)'", page.read_text())
    assert len(srcs) == 5 and all((page.parent / s).is_file() for s in srcs)


def _explain_cmd(model, out):
    return [sys.executable, "-m", "fgvce_jax.cli", "explain", "--model", str(model), "--out", str(out), *EXPLAIN]


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "summary.json"}


def test_killed_explain_resumes_to_identical_results(run_dir, tmp_path):
    out = tmp_path / "killed"
    # The same devices and matmul precision as this process (tests/conftest.py), so the numbers match.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    proc = subprocess.Popen(_explain_cmd(run_dir / "model", out), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest, deadline = out / "fgvce" / "manifest.json", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and store.read_manifest(out / "fgvce")["shards"]:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "explain finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(store.read_manifest(out / "fgvce")["shards"])
    assert 1 <= done < 5
    rerun = subprocess.run(_explain_cmd(run_dir / "model", out), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _files(out / "fgvce") == _files(run_dir / "explanations" / "fgvce")


def _error(capsys, argv):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_cli_errors_are_one_clear_line(run_dir, tmp_path, capsys):
    model, out = str(run_dir / "model"), str(run_dir / "explanations")
    assert "unknown dataset 'nope'" in _error(capsys, ["explain", "--model", model, "--dataset", "nope", "--out", str(tmp_path)])
    assert "does not exist" in _error(capsys, ["explain", "--model", str(tmp_path / "none"), "--dataset", "digits",
                                               "--out", str(tmp_path)])
    assert "unknown split point 'layer9'" in _error(capsys, ["explain", "--model", model, "--dataset", "digits",
                                                             "--at", "layer9", "--out", str(tmp_path)])
    assert "unknown arch 'resnet9'" in _error(capsys, ["train", "--arch", "resnet9", "--out", str(tmp_path / "m")])
    line = _error(capsys, ["explain", "--model", model, "--out", out, *EXPLAIN, "--t-max", "5"])
    assert "--t-max: 4 -> 5" in line and "--overwrite" in line
    line = _error(capsys, ["explain", "--model", model, "--out", out, *EXPLAIN, "--references", "7", "--candidates", "2"])
    assert "--candidates: 4 -> 2; --references: 3 -> 7" in line and "n_references" not in line
    assert "no explain results" in _error(capsys, ["report", str(tmp_path)])
    for lam in ("nan", "inf", "-inf"):
        assert "--lam) must be a finite number" in _error(capsys, ["explain", "--model", model, "--out",
                                                                   str(tmp_path / "x"), *EXPLAIN, f"--lam={lam}"])
    assert not (tmp_path / "x").exists()
    base = ["explain", "--model", model, "--dataset", "digits", "--out", str(tmp_path / "y")]
    assert "n_references (--references) must be a positive integer; got 0" in _error(capsys, base + ["--references", "0"])
    assert "(--screen) must be an even integer of at least 2 (0 on the command line: off); got 3" in _error(
        capsys, base + ["--screen", "3"])
    assert "--screen and --phi-tolerance cannot be combined" in _error(capsys, base + ["--screen", "4",
                                                                                       "--phi-tolerance", "0.1"])
    (tmp_path / "a_file").write_text("mine")
    assert "is an existing file; give a directory (--out)" in _error(capsys, base[:-1] + [str(tmp_path / "a_file")])
    assert (tmp_path / "a_file").read_text() == "mine"
    assert "--coordinator needs --num-processes and --process-id" in _error(capsys, base + ["--coordinator", "h:1"])
    assert "--process-id must be in [0, 2)" in _error(capsys, base + ["--coordinator", "h:1", "--num-processes", "2",
                                                                      "--process-id", "2"])


def test_file_system_errors_are_one_line_with_the_path(tmp_path, capsys, monkeypatch):
    """A full disk, a permission or a path that is a file, wherever it happens: the error and the file, one
    line, exit 2 (and for a full disk, that re-running resumes); other OS errors still show their traceback."""
    import errno

    from fgvce_jax.commands import report

    def failing(err):
        def run(args):
            raise OSError(err, os.strerror(err), str(tmp_path / "out" / "shard-00000.parquet"))
        return run

    monkeypatch.setattr(report, "run", failing(errno.ENOSPC))
    line = _error(capsys, ["report", str(tmp_path)])
    assert line.startswith("fgvce report: error: No space left on device: ") and "shard-00000.parquet" in line
    assert "re-run the same command" in line
    monkeypatch.setattr(report, "run", failing(errno.EACCES))
    assert "Permission denied: " in _error(capsys, ["report", str(tmp_path)])
    monkeypatch.setattr(report, "run", failing(errno.EIO))
    with pytest.raises(OSError):
        cli.main(["report", str(tmp_path)])


# --------------------------------------------------------------------------- several processes
def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_processes(model, out, n=2):
    """``n`` explain processes of one jax.distributed run on localhost (gloo), 2 fake CPU devices each."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    dist = ["--coordinator", f"localhost:{_free_port()}", "--num-processes", str(n)]
    return [subprocess.Popen(_explain_cmd(model, out) + dist + ["--process-id", str(i)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]


def _finish(procs):
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return [o[1] for o in outs]


def _run_files(d):
    """Every result and cache file of an explain directory (not the timing in summary.json)."""
    return {**{p.name: p.read_bytes() for p in sorted(d.glob("*.npz"))}, **_files(d / "fgvce")}


def test_two_processes_write_what_one_process_writes(run_dir, tmp_path):
    """A 2-process jax.distributed run (2 devices each) leaves byte-identical shards, manifest, predictions
    and reference-Phi cache to the one-process run on 4 devices, and no process manifest."""
    out = tmp_path / "two"
    err = _finish(_start_processes(run_dir / "model", out))
    plan = err[0].index("plan: fgvce: 5 queries in 5 shards of 1 (0 done)")
    assert plan < err[0].index("plan: pass 3:") < err[0].index("pass 3: Phi of")  # the plan comes first
    assert "plan:" not in err[1]  # process 0 speaks for the run
    assert "\r" not in err[0] and "\x1b" not in err[0]  # stderr is a pipe: plain lines, no redraws
    assert _run_files(out) == _run_files(run_dir / "explanations")
    assert not list((out / "fgvce").glob("manifest.process-*"))
    assert json.loads((out / "fgvce" / "summary.json").read_text())["queries"] == 5


def test_a_process_killed_in_a_two_process_run_resumes(run_dir, tmp_path):
    out = tmp_path / "killed2"
    procs = _start_processes(run_dir / "model", out)
    own = out / "fgvce" / "manifest.process-1.json"
    deadline = time.time() + 240
    while time.time() < deadline and procs[1].poll() is None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(own.read_text())["shards"]:
                break
        time.sleep(0.02)
    assert procs[1].poll() is None, "process 1 finished before it could be killed"
    for p in procs[::-1]:  # process 1 first; process 0 would wait for it at the end
        p.kill()
        p.communicate()
    written = {s["index"] for f in (out / "fgvce").glob("manifest.process-*.json")
               for s in json.loads(f.read_text())["shards"]}
    assert written and len(written) < 5
    err = _finish(_start_processes(run_dir / "model", out))[0]
    assert f"{len(written)} of 5 shards were done already" in err
    assert _run_files(out) == _run_files(run_dir / "explanations")


def _export_digits(root, sizes):
    """The first ``sizes[split]`` images of each digits split as a ``folder:`` dataset, the way a user exports
    them: ROOT/<split>/<class>/<index>.png with the original 8 x 8 pixels (PNG is lossless)."""
    for split, n in sizes.items():
        ds = data.load("digits", split)
        for i, (image_id, label) in enumerate(zip(ds.ids[:n], ds.labels[:n])):
            path = root / split / str(label) / f"{int(image_id.split('/')[1]):04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ds.read(i)).save(path)


def test_a_folder_export_is_read_as_the_model_was_trained_and_a_replaced_image_is_noticed(run_dir, tmp_path,
                                                                                          capsys):
    """digits exported as PNGs and read through ``folder:`` are predicted exactly as through ``digits``: the
    checkpoint's preprocessing replaces the folder's ImageNet default, and a notice names the change. Then one
    PNG is replaced in place by another digit: adding to the results is refused in one line naming the dataset
    and --overwrite, the report refuses the stale results, and another method's run recomputes the predictions
    cache with a notice, predicting the new image as digits predicts it. (Part of the splits, and the cheap
    methods cve and random, to keep it short.)"""
    root, out = tmp_path / "digits-png", tmp_path / "explanations"
    _export_digits(root, {"train": 300, "test": 150})
    name = f"folder:{root}"
    argv = ["explain", "--model", str(run_dir / "model"), "--out", str(out),
            *[name if a == "digits" else a for a in EXPLAIN], "--limit", "1", "--method", "cve", "--batch-size", "32"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert (f"notice: {name} is read with the model's preprocessing, not the dataset's default "
            "(resize 37 -> 32; mean (0.485, 0.456, 0.406) -> (0.3055") in err
    digits_ids = data.load("digits", "test").ids.tolist()
    folder_ids = data.load(name, "test").ids  # test/<class>/<index>.png
    at = np.array([digits_ids.index(f"digits/{int(Path(i).stem)}") for i in folder_ids])  # folder -> digits row
    expected = np.load(run_dir / "explanations" / "predictions-test.npz")  # of all digits test images
    got = np.load(out / "predictions-test.npz")
    np.testing.assert_array_equal(got["pred"], expected["pred"][at])
    np.testing.assert_allclose(got["probs"], expected["probs"][at], atol=1e-5)  # another batch shape: not bit-equal

    k = 0  # replace folder image k by the first exported digit (digits row j) that the model predicts otherwise
    other = next(m for m in range(len(at)) if expected["pred"][at[m]] != expected["pred"][at[k]])
    j = at[other]
    (root / folder_ids[k]).write_bytes((root / folder_ids[other]).read_bytes())
    line = _error(capsys, argv)
    assert f"the images of {name} (content fingerprint by split)" in line and "--overwrite" in line
    assert "changed since the explain run" in _error(capsys, ["report", str(out)])
    assert cli.main([*argv, "--method", "random"]) == 0
    assert f"cache {out / 'predictions-test.npz'} is stale" in capsys.readouterr().err
    again = np.load(out / "predictions-test.npz")
    assert again["pred"][k] == expected["pred"][j]
    np.testing.assert_array_equal(np.delete(again["pred"], k), np.delete(got["pred"], k))


def test_explain_ends_with_the_confusions_and_where_to_look(run_dir, capsys):
    out = run_dir / "explanations"
    assert cli.main(["explain", "--model", str(run_dir / "model"), "--out", str(out), *EXPLAIN]) == 0  # all done
    lines = capsys.readouterr().out.splitlines()
    table, _ = store.read_results(out / "fgvce")
    pairs = {}
    for t, p in zip(table.column("true_name").to_pylist(), table.column("pred_name").to_pylist()):
        pairs[(t, p)] = pairs.get((t, p), 0) + 1
    confusions = next(line for line in lines if line.startswith("confusions explained"))
    for (t, p), n in pairs.items():
        assert f"{t} -> {p}: {n}" in confusions
    assert lines[-1] == f"results in {out} (read them with `fgvce report {out}`)"


def test_demo_runs_and_its_overwrite_replaces_results_of_other_settings(tmp_path, capsys):
    """`fgvce demo` (1 epoch, 2 mistakes) writes the model, the explanations and the page; results of other
    settings in its --out are refused with a line naming --overwrite, which demo accepts and which replaces them."""
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--epochs", "1", "--limit", "2"]
    assert cli.main(argv) == 0
    assert (out / "report.html").exists() and (out / "model").is_dir()
    manifest = out / "explanations" / "fgvce" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["config"]["t_max"], doc["config_hash"] = 99, "0" * 16  # as if written by other settings
    manifest.write_text(json.dumps(doc))
    capsys.readouterr()
    line = _error(capsys, argv)
    assert "--t-max: 99 -> 8" in line and "--overwrite" in line
    assert cli.main([*argv, "--overwrite"]) == 0
    assert "reusing the model" in capsys.readouterr().out
    assert json.loads(manifest.read_text())["config"]["t_max"] == 8
