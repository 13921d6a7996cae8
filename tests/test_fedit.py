"""FedIT: the aggregation-error identity, zero-padding, and the simulator around it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_backbone, tiny_data, tiny_federation

from ilora.algorithm import ClientModel, get_algorithm, message_bytes
from ilora.config import RunConfig
from ilora.lowrank import pad_A
from ilora.simulation import Simulation, client_sampling_stream


def random_factors(ranks: list[int], d: int, k: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(d, r, generator=g, dtype=torch.float64), torch.randn(r, k, generator=g, dtype=torch.float64))
            for r in ranks]


@pytest.mark.parametrize("ranks", [[4, 4, 4], [2, 4, 6]])
def test_fedit_error_identity_float64(ranks: list[int]):
    """FedIT's own aggregate of known factors is the zero-padded weighted average of A and of B, and its error
    sum p B A - B_g A_g equals sum p (B - B_bar)(A - A_bar), far from zero (FedIT is inexact)."""
    backbone = tiny_backbone()
    fed = tiny_federation(backbone, ranks=ranks, sizes=[20, 50, 30])
    algo = get_algorithm("fedit")(fed)
    p = {0: 0.2, 1: 0.5, 2: 0.3}
    sent = {n: random_factors(ranks, spec.out_features, spec.in_features, seed=i)
            for i, (n, spec) in enumerate(fed.layers.items())}
    uploads = {}
    for cid in range(3):
        _, model = algo.download(cid)
        A = {n: sent[n][cid][1] for n in fed.layers}
        B = {n: sent[n][cid][0] for n in fed.layers}
        uploads[cid] = algo.upload(cid, ClientModel(A, B, model.head, model.scale))
    algo.aggregate(uploads, p)
    r = max(ranks)
    for name in fed.layers:
        padded = [(F.pad(B, (0, r - B.shape[1])), F.pad(A, (0, 0, 0, r - A.shape[0]))) for B, A in sent[name]]
        B_bar = sum(p[c] * B for c, (B, _) in enumerate(padded))
        A_bar = sum(p[c] * A for c, (_, A) in enumerate(padded))
        torch.testing.assert_close(algo.B[name], B_bar, rtol=0, atol=1e-12)
        torch.testing.assert_close(algo.A[name], A_bar, rtol=0, atol=1e-12)
        ideal = sum(p[c] * B @ A for c, (B, A) in enumerate(sent[name]))
        error = ideal - algo.B[name] @ algo.A[name]
        rhs = sum(p[c] * (B - B_bar) @ (A - A_bar) for c, (B, A) in enumerate(padded))
        torch.testing.assert_close(error, rhs, rtol=0, atol=1e-12)
        assert error.abs().max() > 1e-1


def test_fedit_zero_padding_and_cutting():
    backbone = tiny_backbone()
    fed = tiny_federation(backbone, ranks=[2, 4, 6], sizes=[10, 30, 60])
    algo = get_algorithm("fedit")(fed)
    uploads, weights = {}, {0: 0.1, 1: 0.3, 2: 0.6}
    for cid, r in enumerate(fed.ranks):
        _, model = algo.download(cid)
        assert model.rank == r and model.scale == fed.scale(r)
        g = torch.Generator().manual_seed(cid)
        A = {n: torch.randn_like(a, dtype=torch.float64) for n, a in model.A.items()}
        B = {n: torch.randn(b.shape, generator=g, dtype=torch.float64) for n, b in model.B.items()}
        uploads[cid] = ClientModel(A, B, model.head, model.scale).flat()
    algo.aggregate(uploads, weights)
    name = next(iter(fed.layers))
    expected_A = sum(weights[c] * pad_A(uploads[c][f"lora_A/{name}"], 6) for c in uploads)
    torch.testing.assert_close(algo.A[name], expected_A)
    # rows 4..5 of A come from the rank-6 client only, weighted by its p
    torch.testing.assert_close(algo.A[name][4:], 0.6 * uploads[2][f"lora_A/{name}"][4:])
    _, model = algo.download(0)
    torch.testing.assert_close(model.A[name], algo.A[name][:2])
    torch.testing.assert_close(model.B[name], algo.B[name][:, :2])


def run_tiny(seed: int = 0, method: str = "fedit", rounds: int = 3, participation: float = 1.0):
    backbone = tiny_backbone(seed=0)
    clients = [tiny_data(n, seed=10 + i) for i, n in enumerate([20, 30, 40])]
    fed = tiny_federation(backbone, [2, 4, 6], [20, 30, 40], seed=seed)
    cfg = RunConfig(rounds=rounds, batch_size=8, optimizer="sgd", lr=0.05, progress=False)
    sim = Simulation(get_algorithm(method)(fed), backbone, clients, tiny_data(50, seed=99), cfg,
                     client_sampling_stream(3, participation, rounds, seed), seed=seed)
    return sim.run()


def test_simulator_counts_bytes_from_payloads_and_learns():
    records = run_tiny()
    per_layer = sum(r * (d + k) for r in [2, 4, 6] for d, k in [(10, 12), (14, 10)])
    head = 3 * 14 + 3
    expected = (per_layer + 3 * head) * 8  # float64
    assert all(r.uplink_bytes == expected and r.downlink_bytes == expected for r in records)
    assert records[-1].loss < records[0].loss + 1e-9 or records[-1].accuracy >= records[0].accuracy


def test_same_seed_same_metrics_and_sampling_stream():
    a, b = run_tiny(seed=3, participation=0.67), run_tiny(seed=3, participation=0.67)
    assert [(r.accuracy, r.loss, r.clients) for r in a] == [(r.accuracy, r.loss, r.clients) for r in b]
    assert all(len(r.clients) == 2 for r in a)
    stream = client_sampling_stream(10, 0.3, 50, seed=1)
    assert stream == client_sampling_stream(10, 0.3, 50, seed=1)
    assert stream != client_sampling_stream(10, 0.3, 50, seed=2)


def test_message_bytes_counts_elements_times_size():
    assert message_bytes({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float64)}) == 3 * 4 * 4 + 5 * 8
