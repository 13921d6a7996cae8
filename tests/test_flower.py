"""Flower's simulation engine gives the in-process simulator's numbers, bit for bit (CPU).

Each method runs at smoke size with partial participation (2 of 3 clients per round, so clients
miss rounds and resume from their kept state) in-process and on Flower, and every round's accuracy,
loss, training loss, sampled clients and payload bytes must be identical. Client training is seeded
by (run seed, round, client) and uses one thread in both, so parallel Ray workers change nothing.
"""

from __future__ import annotations

import importlib.util

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
