"""FedProx in the shared local training: off at mu = 0, the proximal gradient against a by-hand oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_backbone, tiny_data, tiny_federation
from torch import Tensor

from ilora.algorithm import ClientModel, get_algorithm
from ilora.config import RunConfig
from ilora.simulation import Simulation, client_sampling_stream

SIZES = [20, 30, 40]


def tiny_simulation(method: str = "fedit", rounds: int = 2, **overrides) -> Simulation:
    backbone = tiny_backbone(seed=0)
    clients = [tiny_data(n, seed=10 + i) for i, n in enumerate(SIZES)]
    fed = tiny_federation(backbone, [2, 4, 6], SIZES, seed=0)
    cfg = RunConfig(**{"rounds": rounds, "batch_size": 8, "optimizer": "sgd", "lr": 0.05, "progress": False,
                       **overrides})
    return Simulation(get_algorithm(method)(fed), backbone, clients, tiny_data(50, seed=99), cfg,
                      client_sampling_stream(3, 1.0, rounds, 0), seed=0)


def summary(records) -> list[tuple]:
    return [(r.accuracy, r.loss, r.train_loss, r.first_step_update) for r in records]


def test_mu_zero_is_no_fedprox_bit_for_bit():
    plain = tiny_simulation()
    assert plain.config.fedprox_mu == 0.0
    assert summary(tiny_simulation(fedprox_mu=0.0).run()) == summary(plain.run())


def by_hand_forward(x: Tensor, w: dict[str, Tensor], frozen: dict[str, Tensor], scale: float) -> Tensor:
    """conftest's TinyNet with LoRA on proj and mix, written out: ``x W^T + b + s x A^T B^T``."""
    h = x
    for layer in ("proj", "mix"):
        h = torch.tanh(h @ frozen[f"{layer}.weight"].T + frozen[f"{layer}.bias"]
                       + scale * (h @ w[f"lora_A/{layer}"].T) @ w[f"lora_B/{layer}"].T)
    return h @ w["head/head.weight"].T + w["head/head.bias"]


def by_hand_steps(model: ClientModel, frozen: dict[str, Tensor], data: dict[str, Tensor], steps: int, lr: float,
                  mu: float) -> dict[str, Tensor]:
    """Plain SGD (no momentum), full batch: the mean cross-entropy plus mu/2 ||w - w_start||^2 (trained tensors)."""
    start = {f"lora_A/{n}": a for n, a in model.A.items()} | {f"lora_B/{n}": b for n, b in model.B.items()}
    start |= {f"head/{n}": p for n, p in model.head.items()}
    w = {k: v.clone() for k, v in start.items()}
    trained = [k for k in w if model.train_A or not k.startswith("lora_A/")]
    for _ in range(steps):
        leaves = {k: v.clone().requires_grad_(k in trained) for k, v in w.items()}
        loss = F.cross_entropy(by_hand_forward(data["x"], leaves, frozen, model.scale), data["labels"])
        grads = torch.autograd.grad(loss, [leaves[k] for k in trained])
        for k, g in zip(trained, grads):
            w[k] = w[k] - lr * (g + mu * (w[k] - start[k]))
    return w


@pytest.mark.parametrize("method", ["fedit", "ffa_lora"])
def test_local_steps_match_by_hand_oracle(method: str):
    """Two full-batch SGD steps (the second one with a nonzero proximal term) equal the oracle's, float64."""
    mu, lr, steps, cid = 0.7, 0.3, 2, 1
    sim = tiny_simulation(method, batch_size=SIZES[cid], local_steps=steps, lr=lr, momentum=0.0, fedprox_mu=mu)
    frozen = {n: p.detach().clone() for n, p in sim.backbone.module.named_parameters()
              if n.endswith(("proj.base.weight", "proj.base.bias", "mix.base.weight", "mix.base.bias"))}
    frozen = {n.replace(".base", ""): p for n, p in frozen.items()}
    _, model = sim.algorithm.download(cid)
    assert model.train_A == (method == "fedit")
    expected = by_hand_steps(model, frozen, sim.client_data[cid], steps, lr, mu)
    trained, _, _, taken = sim.train_client(0, cid, model)
    assert taken == steps
    got = trained.flat()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-8, msg=k)  # the loss is taken in float32
    if method == "ffa_lora":  # A is frozen: untouched
        for n, a in model.A.items():
            assert torch.equal(trained.A[n], a)


def test_proximal_term_pulls_towards_start_from_the_second_step():
    """The first step is FedAvg's (w = w_start there); from the second on, FedProx stays closer to w_start."""
    cid = 2

    def train(mu: float, steps: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        sim = tiny_simulation(local_steps=steps, fedprox_mu=mu)
        _, model = sim.algorithm.download(cid)
        return model.flat(), sim.train_client(0, cid, model)[0].flat()

    def distance(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
        return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5

    start, one_plain = train(0.0, 1)
    _, one_prox = train(1.0, 1)
    assert all(torch.equal(one_plain[k], one_prox[k]) for k in start)
    _, plain = train(0.0, 5)
    _, prox = train(1.0, 5)
    assert distance(plain, prox) > 1e-6
    assert distance(prox, start) < distance(plain, start)
