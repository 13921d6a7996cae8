"""Flower's simulation engine gives the in-process simulator's numbers, bit for bit (CPU).

Each method runs at smoke size with partial participation (2 of 3 clients per round, so clients
miss rounds and resume from their kept state) in-process and on Flower, and every round's accuracy,
loss, training loss, sampled clients and payload bytes must be identical. Client training is seeded
by (run seed, round, client) and uses one thread in both, so parallel Ray workers change nothing.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from ilora.config import resolve_config
from ilora.runner import run_experiment

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("flwr") is None, reason="needs the flower extra"),
]

SAME = ("round", "clients", "accuracy", "loss", "train_loss", "uplink_bytes", "downlink_bytes", "first_step_update")


@pytest.mark.parametrize("method", ["fedit", "flora", "ilora", "ilora_s"])
def test_flower_simulation_equals_in_process(method, tmp_path):
    from ilora.flower.simulation import run_on_flower

    overrides = ["preset=smoke", f"method={method}", "rounds=3", "participation=0.67", "threads=1"]
    local = run_experiment(resolve_config([*overrides, f"out_dir={tmp_path / 'local'}"]))
    flower = run_on_flower(resolve_config([*overrides, f"out_dir={tmp_path / 'flower'}", "engine=flower"]))

    assert local["status"] == flower["status"] == "ok"
    assert (local["engine"], flower["engine"]) == ("inprocess", "flower-simulation")
    assert len(flower["rounds"]) == 3
    assert any(len(r["clients"]) < 3 for r in flower["rounds"])
    for mine, theirs in zip(local["rounds"], flower["rounds"]):
        assert {k: mine[k] for k in SAME} == {k: theirs[k] for k in SAME}
        # what Flower really moved: the tensors as .npy plus its framing, both counted
        assert theirs["flower_uplink_framing_bytes"] > 0 and theirs["flower_downlink_framing_bytes"] > 0
        assert theirs["flower_uplink_bytes"] > theirs["uplink_bytes"]
    assert not (tmp_path / "flower" / flower["run_id"] / "checkpoint").exists()


def test_flower_with_dp_sample_and_fedprox_equals_in_process(tmp_path):
    """DP-SGD's noise (seeded by run, round and client) and FedProx's term come out the same on both engines."""
    from ilora.flower.simulation import run_on_flower

    overrides = ["preset=smoke", "method=ffa_lora", "participation=0.67", "threads=1", "dp=sample",
                 "dp_noise_multiplier=1.0", "fedprox_mu=0.01"]
    local = run_experiment(resolve_config([*overrides, f"out_dir={tmp_path / 'local'}"]))
    flower = run_on_flower(resolve_config([*overrides, f"out_dir={tmp_path / 'flower'}", "engine=flower"]))

    assert local["status"] == flower["status"] == "ok"
    assert local["privacy"] == flower["privacy"] and local["privacy"]["level"] == "sample"
    for mine, theirs in zip(local["rounds"], flower["rounds"], strict=True):
        assert {k: mine[k] for k in SAME} == {k: theirs[k] for k in SAME}


# ------------------------------------------------------------------------------------------- faults
class _Grid:
    """Answers client 0, reports client 1 failed, and never answers client 2."""

    def send_and_receive(self, messages, timeout=None):
        def reply(m, error=None):
            return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=m.metadata.message_id),
                                   has_error=lambda: error is not None, error=SimpleNamespace(reason=error))
        return [reply(messages[0]), reply(messages[1], "Traceback ...\nValueError: out of memory")]


def _server(min_clients):
    from ilora.flower.server import FlowerServer

    server = FlowerServer.__new__(FlowerServer)  # only what exchange() reads
    server.cfg = SimpleNamespace(flower_timeout=5.0, flower_min_clients=min_clients)
    server.grid = _Grid()
    return server


def _messages():
    return {c: SimpleNamespace(metadata=SimpleNamespace(message_id=f"m{c}")) for c in range(3)}


def test_a_failed_or_silent_client_ends_the_round_with_one_error_naming_both():
    from ilora.errors import RunInterrupted

    with pytest.raises(RunInterrupted) as raised:
        _server(None).exchange(_messages(), round_index=1)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("round 2: client 1 failed: ValueError: out of memory; "
                              "client 2 did not reply within flower_timeout=5s (1 of 3 replied, 3 needed)")
    assert "rerun the same command to resume" in message


def test_flower_min_clients_lets_the_round_go_on_without_the_others(capsys):
    replies = _server(1).exchange(_messages(), round_index=0)
    assert list(replies) == [0]
    assert "round 1: client 2 did not reply" in capsys.readouterr().err
    from ilora.errors import RunInterrupted

    with pytest.raises(RunInterrupted):
        _server(2).exchange(_messages(), round_index=0)


@pytest.mark.drill
def test_a_flower_run_prints_its_record_once_and_no_library_chatter(tmp_path):
    """What a user sees from `ilora run engine=flower`: the suite's own lines, not Flower's deprecation
    notice for the embedded simulation API, Ray's accelerator tip or each client process's model load report."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "ilora.cli", "run", "preset=smoke", "engine=flower", "rounds=1",
                           f"out_dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-2000:]
    assert output.count("results record:") == 1, output
    for chatter in ("DEPRECATED FEATURE", "LOAD REPORT", "FutureWarning", "Traceback"):
        assert chatter not in output, output
