"""The fault drill on a real local deployment: a SuperLink and three SuperNodes as processes.

One SuperNode is killed with -9 while round 2 trains. With every sampled client required (the
default), the run ends with one clear error (Flower's "Node Unavailable" for it, or our timeout,
whichever comes first) and leaves its checkpoint; the SuperNode comes back
(same partition, same state dir) and the same command resumes from round 1 to a record equal, round
for round, to an uninterrupted run's (the in-process one, which Flower's equals bit for bit:
tests/test_flower.py). Every started process is gone afterwards.
"""

from __future__ import annotations

import importlib.util
import re
import time

import pytest

from ilora.config import resolve_config
from ilora.runner import run_experiment, run_id_for

pytestmark = [
    pytest.mark.drill,
    pytest.mark.skipif(importlib.util.find_spec("flwr") is None, reason="needs the flower extra"),
]

SAME = ("round", "clients", "accuracy", "loss", "train_loss", "uplink_bytes", "downlink_bytes")


def test_killed_supernode_ends_the_run_with_one_error_and_the_rerun_resumes_to_the_same_record(tmp_path):
    from ilora.flower import split_overrides
    from ilora.flower.local import LocalDeployment, descendants

    overrides = ["preset=smoke", "method=fedit", "rounds=3", "threads=1", "flower_timeout=60"]
    reference = run_experiment(resolve_config([*overrides, f"out_dir={tmp_path / 'inprocess'}"]))
    overrides.append(f"out_dir={tmp_path / 'runs'}")
    run_dir = tmp_path / "runs" / run_id_for(resolve_config(overrides))

    caller, operator = split_overrides(overrides)  # out_dir and threads are the operator's, not the caller's
    deployment = LocalDeployment(tmp_path / "deployment", supernodes=3, operator=operator)
    started: list[int] = []
    try:
        deployment.start()
        log = tmp_path / "first-run.log"
        with open(log, "w") as output:
            first = deployment.submit(caller, output)
            deadline = time.monotonic() + 300
            while not (run_dir / "checkpoint" / "checkpoint-1.json").exists():  # round 1 done, round 2 training
                assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            started = [pid for p in deployment.processes.values() for pid in (p.pid, *descendants(p.pid))]
            deployment.kill("supernode-1")
            first.wait(timeout=300)
        text = log.read_text()
        # whichever comes first: Flower reporting the node dead (missed heartbeats) or our timeout
        assert re.search(r"round 2: client 1 (failed: Error: Node Unavailable|did not reply within flower_timeout=60s)",
                         text), text[-3000:]
        assert "rerun the same command to resume" in text
        assert not (run_dir / "result.json").exists()
        assert (run_dir / "checkpoint" / "checkpoint-1.json").exists()

        deployment.start_supernode(1)
        with open(tmp_path / "second-run.log", "w") as output:
            assert deployment.run(caller, timeout=600, output=output) == 0
        assert "resuming" in (tmp_path / "second-run.log").read_text()
    finally:
        deployment.stop()

    import json

    record = json.loads((run_dir / "result.json").read_text())
    assert record["status"] == "ok" and record["engine"] == "flower-app"
    assert [{k: r[k] for k in SAME} for r in record["rounds"]] == [{k: r[k] for k in SAME} for r in reference["rounds"]]
    time.sleep(1)
    alive = [pid for pid in started if _alive(pid)]
    assert not alive, f"processes left running: {alive}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
