"""Ctrl-C on a sweep with a pool of workers: one message that says how to resume, exit 130, no traceback and
no leaked semaphores; the rerun finishes every run. The interrupt is placed by progress (once both workers
hold a run's lock), not by a delay, so it lands mid-run on a machine of any speed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.drill

BENCH = """
name: interrupt
title: Interrupt drill
table: {rows: [method], columns: [dataset]}
plots: []
presets:
  smoke:
    base: {rounds: 4, local_steps: 3, max_train_samples: 60, max_test_samples: 30, max_length: 16}
    grid:
      dataset: [bbc_news]
      method: [fedit, ilora]
      seed: [1]
"""


def _sweep(bench: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "ilora.cli", "sweep", str(bench), "--preset", "smoke", "--jobs", "2",
            "--out-dir", str(out)]


def _wait_for(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_ctrl_c_on_a_pool_sweep_says_how_to_resume_and_leaks_nothing(tmp_path):
    bench, out = tmp_path / "interrupt.yaml", tmp_path / "runs"
    bench.write_text(textwrap.dedent(BENCH))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(_sweep(bench, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True,  # its own process group, as a terminal's foreground job
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        started = _wait_for(lambda: len(list(out.glob("*/run.lock"))) == 2, timeout=240)
        assert started, "the two workers never both started a run"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole group, the parent and its workers
        output = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output[-2000:]
    assert "interrupted: rerun the same command to resume" in output
    assert "Traceback" not in output and "leaked semaphore" not in output, output[-2000:]
    assert not list(out.glob("*/result.json")), "a run was interrupted mid-way yet left a results record"

    rerun = subprocess.run(_sweep(bench, out), capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(list(out.glob("*/result.json"))) == 2
