"""Counted bytes per round against each method's formula (docs/baselines.md, docs/ilora.md; head included).

Per adapted layer (``d x k``) and sampled client ``i`` of rank ``r_i``:
FedIT, LoRA-FAIR, ILoRA: ``r_i (d + k)`` up and down; ILoRA with control variates sends the same
shapes twice (model + control variate) both ways; FFA-LoRA: ``r_i d`` up and down; FLoRA:
``r_i (d + k)`` up, and down the stacked modules ``(sum_j r_j)(d + k)`` of the previous round (nothing
in round 1). Every method also sends the classification head both ways.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_backbone, tiny_data, tiny_federation

from ilora.algorithm import available_algorithms, get_algorithm
from ilora.simulation import Simulation, TrainConfig

RANKS = [2, 4, 6]
SIZES = [12, 16, 20]
DTYPE = torch.float32


def layer_sums(fed) -> tuple[int, int]:
    """``(sum d, sum k)`` over the adapted layers: every formula is linear in ``d`` and ``k``."""
    return sum(s.out_features for s in fed.layers.values()), sum(s.in_features for s in fed.layers.values())


def expected_bytes(method: str, algo, fed, sampling: list[list[int]]) -> list[tuple[int, int]]:
    """(uplink, downlink) bytes per round from the method's formula."""
    D, K = layer_sums(fed)
    head = sum(h.numel() for h in fed.head_init.values())
    size = torch.tensor([], dtype=DTYPE).element_size()
    rows = []
    for t, clients in enumerate(sampling):
        up = down = 0
        for c in clients:
            r = fed.ranks[c]
            if method in ("fedit", "lora_fair", "ilora", "ilora_s"):
                factor = 2 if getattr(algo.config, "control_variates", False) else 1
                up += factor * (r * (D + K) + head)
                down += factor * (r * (D + K) + head)
            elif method == "ffa_lora":
                up += r * D + head
                down += r * D + head
            elif method == "flora":
                stacked = sum(fed.ranks[j] for j in sampling[t - 1]) if t > 0 else 0
                up += r * (D + K) + head
                down += stacked * (D + K) + head
            else:
                pytest.fail(f"no byte formula for method {method!r}: add it here and in the docs")
        rows.append((up * size, down * size))
    return rows


def run(method: str, sampling: list[list[int]]):
    backbone = tiny_backbone(dtype=DTYPE)
    fed = tiny_federation(backbone, RANKS, SIZES)
    algo = get_algorithm(method)(fed)
    clients = [tiny_data(n, seed=10 + i, dtype=DTYPE) for i, n in enumerate(SIZES)]
    cfg = TrainConfig(
        rounds=len(sampling), local_steps=2, batch_size=8, optimizer="sgd", lr=0.05, progress=False
    )
    sim = Simulation(algo, backbone, clients, tiny_data(16, seed=99, dtype=DTYPE), cfg, sampling, seed=0)
    return sim.run(), algo, fed


@pytest.mark.parametrize("method", available_algorithms())
def test_counted_bytes_follow_the_formula(method):
    sampling = [[0, 1, 2], [0, 1, 2]]
    records, algo, fed = run(method, sampling)
    assert len(records) == 2
    counted = [(r.uplink_bytes, r.downlink_bytes) for r in records]
    assert counted == expected_bytes(method, algo, fed, sampling)


def test_flora_downlink_grows_with_the_number_of_clients_and_catches_up_missed_stacks():
    """With partial participation a client downloads every stack it has not merged yet."""
    sampling = [[0, 1], [1, 2], [0, 2]]
    records, algo, fed = run("flora", sampling)
    size = torch.tensor([], dtype=DTYPE).element_size()
    head = sum(h.numel() for h in fed.head_init.values())
    dk = sum(layer_sums(fed))
    # round 2: clients 1 and 2 get stack 1 (ranks 2 + 4); round 3: client 0 has merged nothing yet
    # (it last downloaded in round 1) and gets stacks 1 and 2, client 2 only stack 2 (ranks 4 + 6)
    assert records[0].downlink_bytes == 2 * head * size
    assert records[1].downlink_bytes == (2 * (6 * dk) + 2 * head) * size
    assert records[2].downlink_bytes == ((16 * dk) + (10 * dk) + 2 * head) * size
    # FLoRA's round-2 download against FedIT's: sum r_j over each client's own r_i
    fedit, _, _ = run("fedit", [[0, 1, 2], [0, 1, 2]])
    flora, _, _ = run("flora", [[0, 1, 2], [0, 1, 2]])
    adapter_fedit = fedit[1].downlink_bytes - 3 * head * size
    adapter_flora = flora[1].downlink_bytes - 3 * head * size
    assert adapter_flora == 3 * adapter_fedit  # every client gets all sum r_j columns: N times FedIT
