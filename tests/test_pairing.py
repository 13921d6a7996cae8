"""The paired intervals of every table rest on this: for a seed, every method sees the same partition, the
same clients in every round and the same initial head. Checked on what each method's run actually did
(its record), not on the helpers that should make it so."""

from __future__ import annotations

from ilora.algorithm import available_algorithms
from ilora.config import resolve_config
from ilora.runner import run_experiment

# two of three clients a round, so that the sampling stream matters; one local step keeps it fast
SETTING = ["preset=smoke", "rounds=2", "local_steps=1", "participation=0.67", "max_train_samples=60",
           "max_test_samples=20", "max_length=16", "divergence_at_chance=false"]


def _facts(record: dict) -> dict:
    return {
        "partition_hash": record["partition_hash"],
        "client_sizes": record["client_sizes"],
        "clients": [r["clients"] for r in record["rounds"]],
        "initial_head": record["initial_head_sha256"],
    }


def test_every_method_sees_the_same_partition_sampling_and_head(tmp_path, methods=None):
    seen = {}
    for method in methods or available_algorithms():
        cfg = resolve_config([*SETTING, f"method={method}", f"out_dir={tmp_path / method}"])
        record = run_experiment(cfg)
        assert record["status"] == "ok", (method, record.get("error"))
        seen[method] = _facts(record)
    reference = seen["fedit"]
    assert all(len(c) == 2 for c in reference["clients"])  # the stream does pick two of the three clients
    for method, facts in seen.items():
        assert facts == reference, f"{method} is not paired with fedit: {facts} != {reference}"


def test_another_seed_draws_another_partition_and_head(tmp_path):
    a, b = (run_experiment(resolve_config([*SETTING, f"seed={s}", f"out_dir={tmp_path / str(s)}"])) for s in (42, 43))
    assert _facts(a)["partition_hash"] != _facts(b)["partition_hash"]
    assert _facts(a)["initial_head"] != _facts(b)["initial_head"]
