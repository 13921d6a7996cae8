"""One process trains a run at a time: a second sweep or run on the same out dir skips what another live
process is training, and takes over the lock of a killed one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ilora.locks import LOCK_NAME, RunLocked, acquire, release, run_lock


def _foreign_lock(run_dir: Path, pid: int) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    return path


def test_a_live_holder_keeps_the_run_and_a_dead_ones_lock_is_taken_over(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _foreign_lock(tmp_path / "run", sleeper.pid)
        with pytest.raises(RunLocked, match=f"process {sleeper.pid}"):
            acquire(tmp_path / "run")
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: its lock is stale and is taken over, then released
    with run_lock(tmp_path / "run") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists() and (tmp_path / "run").is_dir()  # the directory was there before: it stays
    # directories the lock had to create go with it when the run left nothing in them
    with run_lock(tmp_path / "new" / "run"):
        pass
    assert not (tmp_path / "new").exists()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    path = _foreign_lock(tmp_path / "run", os.getpid() + 100000)
    release(path)
    assert path.exists()


def test_a_sweep_skips_a_run_another_process_is_training_and_says_so(tmp_path, capsys):
    from ilora.benchmark import expand, load_benchmark
    from ilora.sweep import run_sweep

    bench = load_benchmark("nlp_dirichlet05")
    runs = expand(bench, "smoke", out_dir=str(tmp_path / "runs"))
    trained = []

    def runner(cfg):
        trained.append(cfg.method)
        return {"status": "ok", "final_accuracy": 0.5, "rounds": []}

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _foreign_lock(Path(runs[0].config.out_dir) / runs[0].run_id, sleeper.pid)
        lines = []
        summary = run_sweep(runs, runner=runner, progress=False, log=lines.append)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert trained == [r.config.method for r in runs[1:]]
    assert summary.locked and summary.locked[0][0] == runs[0].run_id
    assert "skipped: training in another process" in summary.line()
    assert any(line.startswith("[  locked]") and f"process {sleeper.pid}" in line for line in lines)


def test_a_lock_held_by_a_zombie_is_taken_over(tmp_path):
    """A killed sweep's worker that has exited but is not yet reaped (a zombie) holds nothing."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.05)
        _foreign_lock(tmp_path / "run", child.pid)  # exited, not yet reaped: os.kill(pid, 0) still succeeds
        with run_lock(tmp_path / "run") as path:
            assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        child.wait()


def test_a_lock_left_empty_by_a_killed_writer_is_taken_over_once_old(tmp_path, monkeypatch):
    """A process killed between creating its lock and writing it leaves an empty file: young, it may still be
    being written (the run is left alone); old, it is stale."""
    import ilora.locks

    monkeypatch.setattr(ilora.locks, "TORN_AFTER_S", 5.0)
    path = tmp_path / "run" / LOCK_NAME
    path.parent.mkdir()
    path.write_text("")
    with pytest.raises(RunLocked):
        acquire(tmp_path / "run")
    os.utime(path, (time.time() - 60, time.time() - 60))
    with run_lock(tmp_path / "run") as taken:
        assert json.loads(taken.read_text())["pid"] == os.getpid()

