"""Counted bytes per round against each method's registered formula (``MethodInfo.comm``, head included).

Each method declares, where it registers, the elements one sampled client of rank ``r_i`` sends and
receives per adapted ``d x k`` layer; this test sums the formula over the layers and clients, adds the
head both ways when the method shares it, and the control variates (the trained tensors' shapes again,
both ways) when they are on, and compares with what the simulator counted from the real messages.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_backbone, tiny_data, tiny_federation

from ilora.algorithm import CommContext, available_algorithms, get_algorithm
from ilora.config import RunConfig
from ilora.simulation import Simulation

RANKS = [2, 4, 6]
SIZES = [12, 16, 20]
DTYPE = torch.float32


def layer_sums(fed) -> tuple[int, int]:
    """``(sum d, sum k)`` over the adapted layers."""
    return sum(s.out_features for s in fed.layers.values()), sum(s.in_features for s in fed.layers.values())


def expected_bytes(method: str, algo, fed, sampling: list[list[int]]) -> list[tuple[int, int]]:
    """(uplink, downlink) bytes per round from the method's registered formula."""
    info = get_algorithm(method).info
    head = sum(h.numel() for h in fed.head_init.values()) if info.shares_head else 0
    size = torch.tensor([], dtype=DTYPE).element_size()
    cv = algo.control_variates
    rows = []
    for t, clients in enumerate(sampling):
        previous = tuple(fed.ranks[j] for j in sampling[t - 1]) if t > 0 else ()
        up = down = 0
        for c in clients:
            r = fed.ranks[c]
            for spec in fed.layers.values():
                ctx = CommContext(r, spec.out_features, spec.in_features, fed.max_rank, t, previous)
                u, d = info.comm(ctx)
                up, down = up + u, down + d
                if cv is not None:  # the control variates: the trained tensors' shapes, both ways
                    extra = r * (spec.out_features * ("B" in cv.factors) + spec.in_features * ("A" in cv.factors))
                    up, down = up + extra, down + extra
            up, down = up + head * (2 if cv else 1), down + head * (2 if cv else 1)
        rows.append((up * size, down * size))
    return rows


def run(method: str, sampling: list[list[int]]):
    backbone = tiny_backbone(dtype=DTYPE)
    fed = tiny_federation(backbone, RANKS, SIZES)
    algo = get_algorithm(method)(fed)
    clients = [tiny_data(n, seed=10 + i, dtype=DTYPE) for i, n in enumerate(SIZES)]
    cfg = RunConfig(
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


@pytest.mark.parametrize("method", ["fedit", "ffa_lora", "lora_fair"])
def test_control_variates_on_a_baseline_add_the_trained_shapes_both_ways(method):
    """``control_variates=true`` on any global-adapter method (e.g. SCAFFOLD-FedIT) is counted too."""
    sampling = [[0, 1, 2], [0, 2]]
    backbone = tiny_backbone(dtype=DTYPE)
    fed = tiny_federation(backbone, RANKS, SIZES)
    cls = get_algorithm(method)
    algo = cls(fed, cls.Config(control_variates=True))
    clients = [tiny_data(n, seed=10 + i, dtype=DTYPE) for i, n in enumerate(SIZES)]
    cfg = RunConfig(rounds=2, local_steps=2, batch_size=8, optimizer="sgd", lr=0.05, progress=False)
    records = Simulation(algo, backbone, clients, tiny_data(16, seed=99, dtype=DTYPE), cfg, sampling, seed=0).run()
    assert [(r.uplink_bytes, r.downlink_bytes) for r in records] == expected_bytes(method, algo, fed, sampling)


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
