"""One writer per output directory: a second run (another process) fails at once naming the holder's PID, the
CLI exits 2, a lock left by a killed run blocks nothing, and processes > 0 of a distributed run never lock."""
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fgvce_jax
from fgvce_jax import cli, store
from fgvce_jax.errors import FgvceError
from test_pipeline import MODEL_DIR, _patch, toy  # noqa: F401  (toy is a fixture)

CONFIG = {"method": "fgvce", "t_max": 3}
_HOLDER = textwrap.dedent("""
    import sys, time
    from fgvce_jax import store
    w = store.ShardWriter(sys.argv[1], {config!r})
    print("locked", flush=True)
    time.sleep(120)
""").format(config=CONFIG)


@pytest.fixture
def holder(tmp_path):
    """Start a process that opens a ShardWriter on a directory and sleeps: (directory, process)."""
    d = tmp_path / "out" / "fgvce"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(fgvce_jax.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(d)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline() == "locked\n"
        yield d, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_writer_fails_at_once_naming_the_holder(holder):
    d, proc = holder
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(FgvceError) as e:
        store.ShardWriter(d, CONFIG)
    msg = str(e.value)
    assert f"PID {proc.pid} " in msg and "wait for it to end" in msg and "\n" not in msg
    with pytest.raises(FgvceError, match=f"PID {proc.pid} "):
        store.ShardWriter(d, CONFIG, overwrite=True)  # --overwrite does not break the lock either
    assert sorted(p.name for p in d.iterdir()) == before
    # a process > 0 of the holder's distributed run joins without locking
    assert store.ShardWriter(d, CONFIG, process=1, processes=2).done == set()


def test_the_cli_exits_2_with_one_line(holder, toy, monkeypatch, capsys):  # noqa: F811
    d, proc = holder
    _patch(monkeypatch, toy)
    assert cli.main(["explain", "--model", str(MODEL_DIR), "--dataset", "toy", "--out", str(d.parent)]) == 2
    err = capsys.readouterr().err
    assert f"is being written by another fgvce run (PID {proc.pid} " in err
    assert err.startswith("fgvce explain: error: ") and err.count("\n") == 1


def test_a_killed_holder_leaves_no_lock(holder):
    d, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (d / store.LOCK).read_text().startswith(f"PID {proc.pid} ")  # the stale file stays ...
    with store.ShardWriter(d, CONFIG):  # ... and blocks nothing
        assert (d / store.LOCK).read_text().startswith(f"PID {os.getpid()} ")
    assert not (d / store.LOCK).exists()  # the writer removes it when it closes
    store.ShardWriter(d, CONFIG).close()  # and the lock is free


def test_a_lock_on_a_file_removed_meanwhile_is_taken_again(tmp_path, monkeypatch):
    """Another run that opened .lock just before its holder removed it locks the new file, not the old one."""
    real, calls = fcntl.flock, []

    def holder_ends_first(f, op):
        real(f, op)
        calls.append(f.name)
        if len(calls) == 1:  # as if the holder closed between our open and our flock
            os.unlink(f.name)

    monkeypatch.setattr(fcntl, "flock", holder_ends_first)
    w = store.ShardWriter(tmp_path, CONFIG)
    monkeypatch.setattr(fcntl, "flock", real)
    assert len(calls) == 2 and (tmp_path / store.LOCK).read_text().startswith(f"PID {os.getpid()} ")
    with pytest.raises(FgvceError, match=f"PID {os.getpid()} "):  # the lock is on the file that is there
        store.ShardWriter(tmp_path, CONFIG)
    w.close()


def test_a_file_system_without_locks_gets_a_notice(tmp_path, monkeypatch, capsys):
    def no_locks(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with store.ShardWriter(tmp_path, CONFIG) as w:
        assert w.done == set()
    assert "cannot lock" in capsys.readouterr().err

