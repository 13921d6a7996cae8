"""Sample-level DP-SGD (``dp=sample``) in the shared local training: per-example gradients, clipping, noise,
the budget; on the tiny linear model, a 1x1-conv model with BatchNorm and a tiny BERT encoder."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_backbone, tiny_data, tiny_federation
from torch import Tensor, nn

from baselines.hetlora import HetLoRAConfig
from ilora.algorithm import get_algorithm
from ilora.config import RunConfig
from ilora.lora import inject_conv1x1_lora, inject_lora
from ilora.models import Backbone
from ilora.privacy import noise_multiplier, privacy_facts
from ilora.simulation import Simulation, client_sampling_stream, clipped_sum, dp_generator

SIZES = [20, 30, 40]
# on CPU torch maps scaled_dot_product_attention over the examples by its generic fallback: slower, same numbers
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def tiny_simulation(method: str = "fedit", backbone: Backbone | None = None, clients: list | None = None,
                    sigma: float | None = None, seed: int = 0, options: Any = None, **overrides) -> Simulation:
    backbone = backbone or tiny_backbone(seed=0)
    clients = clients or [tiny_data(n, seed=10 + i) for i, n in enumerate(SIZES)]
    sizes = [len(c["labels"]) for c in clients]
    fed = tiny_federation(backbone, [2, 4, 6], sizes, seed=0)
    cfg = RunConfig(**{"rounds": 2, "batch_size": 8, "optimizer": "sgd", "lr": 0.05, "progress": False, **overrides})
    algorithm = get_algorithm(method)(fed) if options is None else get_algorithm(method)(fed, options)
    return Simulation(algorithm, backbone, clients, clients[0], cfg,
                      client_sampling_stream(len(clients), 1.0, cfg.rounds, seed), seed=seed, noise_multiplier=sigma)


def summary(records) -> list[tuple]:
    return [(r.accuracy, r.loss, r.train_loss) for r in records]


def flat(rows: list[tuple]) -> list[float]:
    return [x for row in rows for x in row]


@pytest.mark.parametrize("method", ["fedit", "ffa_lora"])
def test_no_noise_and_no_clipping_is_the_non_private_run(method: str):
    plain = tiny_simulation(method).run()
    private = tiny_simulation(method, dp="sample", dp_noise_multiplier=0.0, dp_clip=1e9, sigma=0.0).run()
    for mine, theirs in zip(summary(private), summary(plain)):
        assert mine == pytest.approx(theirs, rel=1e-4)
    assert private[-1].loss != plain[0].loss  # it trained


# ------------------------------------------------------------------------------------------- per-example gradients
class ConvNet(nn.Module):
    """1x1 convolutions (LoRA) around a frozen BatchNorm, pooled into a linear head."""

    def __init__(self, channels: int = 6, classes: int = 3):
        super().__init__()
        self.expand = nn.Conv2d(3, channels, 1)
        self.bn = nn.BatchNorm2d(channels)
        self.project = nn.Conv2d(channels, channels, 1)
        self.head = nn.Linear(channels, classes)

    def forward(self, batch):
        h = torch.relu(self.bn(self.expand(batch["x"])))
        return self.head(torch.relu(self.project(h)).mean((2, 3)))


def conv_backbone() -> Backbone:
    torch.manual_seed(0)
    net = ConvNet().double()
    with torch.no_grad():  # running statistics unlike a batch's
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    layers = inject_conv1x1_lora(net, ["expand", "project"], rank=2, alpha=4.0)
    head = {n: p.requires_grad_(True) for n, p in net.named_parameters() if n.startswith("head.")}
    return Backbone("conv", net, layers, head, encode=lambda split: {})


def conv_data(n: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    return {"x": x, "labels": (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0.2).long()}


def bert_backbone() -> tuple[Backbone, list[dict[str, Tensor]]]:
    """A one-layer BERT (random weights) under the text models' mean-pooling classifier, LoRA on query/value."""
    from transformers import BertConfig, BertModel

    from ilora.models.text import MeanPoolClassifier

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16)
    net = MeanPoolClassifier(BertModel(config, add_pooling_layer=False), 16, 3, seed=0).double()
    layers = inject_lora(net, ["query", "value"], rank=2, alpha=4.0)
    head = {n: p.requires_grad_(True) for n, p in net.named_parameters() if n.startswith("classifier.")}
    clients = []
    for i, n in enumerate(SIZES):
        g = torch.Generator().manual_seed(20 + i)
        lengths = torch.randint(3, 10, (n,), generator=g)  # every batch padded, rows of different lengths
        mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1, 40, (n, 12), generator=g) * mask
        clients.append({"input_ids": ids, "attention_mask": mask, "labels": ids[:, 1] % 3})
    return Backbone("bert", net, layers, head, encode=lambda split: {}), clients


def models() -> dict[str, tuple[Backbone, list[dict[str, Tensor]]]]:
    return {
        "linear": (tiny_backbone(seed=0), [tiny_data(n, seed=10 + i) for i, n in enumerate(SIZES)]),
        "conv1x1+batchnorm": (conv_backbone(), [conv_data(n, seed=10 + i) for i, n in enumerate(SIZES)]),
        "bert": bert_backbone(),
    }


@pytest.mark.parametrize("kind", ["linear", "conv1x1+batchnorm", "bert"])
@pytest.mark.parametrize("method", ["fedit", "ffa_lora"])
def test_per_example_gradients_match_a_loop_over_examples(kind: str, method: str):
    backbone, clients = models()[kind]
    sim = tiny_simulation(method, backbone, clients, dp="sample", dp_noise_multiplier=1.0, sigma=1.0)
    _, model = sim.algorithm.download(1)
    params = sim.load(model)
    trained = {k: p for k, p in params.items() if p.requires_grad}
    assert any(k.startswith("lora_A/") for k in trained) == (method == "fedit")
    backbone.module.eval()  # no dropout in these models; BatchNorm on its running statistics in both
    batch = {k: v[:7] for k, v in clients[1].items()}
    grads, losses = sim.per_example_gradients(batch, trained)
    for i in range(7):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        loss = F.cross_entropy(backbone(one).float(), one["labels"])
        expected = torch.autograd.grad(loss, list(trained.values()))
        assert float(losses[i]) == pytest.approx(float(loss.detach()), rel=1e-6)
        for k, g in zip(trained, expected):
            torch.testing.assert_close(grads[k][i], g, rtol=1e-6, atol=1e-9, msg=f"{k} of example {i}")


def test_batchnorm_keeps_its_running_statistics_under_dp_sample():
    backbone, clients = models()["conv1x1+batchnorm"]
    sim = tiny_simulation("fedit", backbone, clients, dp="sample", dp_noise_multiplier=1.0, sigma=1.0)
    stats = (backbone.module.bn.running_mean.clone(), backbone.module.bn.running_var.clone())
    _, model = sim.algorithm.download(0)
    trained, loss, _, steps = sim.train_client(0, 0, model)
    assert steps > 0 and math.isfinite(loss)
    assert torch.equal(backbone.module.bn.running_mean, stats[0]) and torch.equal(backbone.module.bn.running_var,
                                                                                   stats[1])
    assert not backbone.module.bn.training


# ------------------------------------------------------------------------------------------- clipping and noise
def test_clipping_bounds_each_example_and_the_sum():
    g = torch.Generator().manual_seed(0)
    per_example = {"a": torch.randn(5, 3, 4, generator=g, dtype=torch.float64),
                   "b": 10 * torch.randn(5, 7, generator=g, dtype=torch.float64)}
    clip = 0.01
    total = clipped_sum(per_example, clip)
    norm = sum(float(v.pow(2).sum()) for v in total.values()) ** 0.5
    assert norm <= 5 * clip * (1 + 1e-9)
    for i in range(5):  # each example alone: scaled to norm clip (all tensors together)
        one = clipped_sum({k: v[i : i + 1] for k, v in per_example.items()}, clip)
        assert sum(float(v.pow(2).sum()) for v in one.values()) ** 0.5 == pytest.approx(clip, rel=1e-4)
    unclipped = clipped_sum(per_example, 1e9)
    for k, v in per_example.items():
        torch.testing.assert_close(unclipped[k], v.sum(0))


def test_a_tiny_clip_bounds_the_step():
    """With no noise, one SGD step moves the trained tensors by at most lr * clip (the mean of clipped gradients)."""
    clip, lr = 1e-3, 0.5
    sim = tiny_simulation("fedit", dp="sample", dp_noise_multiplier=0.0, dp_clip=clip, sigma=0.0, local_steps=1,
                          lr=lr, momentum=0.0)
    _, model = sim.algorithm.download(2)
    before = model.flat()
    after = sim.train_client(0, 2, model)[0].flat()
    moved = sum(float((after[k] - before[k]).pow(2).sum()) for k in before) ** 0.5
    assert 0 < moved <= lr * clip * (1 + 1e-6)


def private_run(seed: int, sigma: float = 1.0):
    return summary(tiny_simulation("ffa_lora", dp="sample", dp_noise_multiplier=sigma, sigma=sigma, seed=seed).run())


def test_noise_is_seeded_by_run_round_and_client():
    assert private_run(3) == private_run(3)
    assert private_run(3) != private_run(4)
    assert private_run(3) != private_run(3, sigma=0.0)  # the noise is there
    draws = {(r, c): float(torch.randn(1, generator=dp_generator(0, r, c, torch.device("cpu")))) for r in range(2)
             for c in range(2)}
    assert len(set(draws.values())) == 4


def test_a_client_round_is_repeatable_as_on_resume_or_another_engine():
    """Training depends only on (run seed, round, client) and the model: the same call gives the same tensors."""
    sim = tiny_simulation("fedit", dp="sample", dp_noise_multiplier=2.0, sigma=2.0, fedprox_mu=0.1)
    _, model = sim.algorithm.download(1)
    first = sim.train_client(1, 1, model)[0].flat()
    sim.train_client(0, 2, sim.algorithm.download(2)[1])  # other work in between
    again = sim.train_client(1, 1, model)[0].flat()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_local_loss_is_added_after_the_noise():
    """HetLoRA's prune penalty depends on the parameters only: its exact gradient joins the private one."""
    options = HetLoRAConfig(prune=True, lam=0.5)
    sim = tiny_simulation("hetlora", dp="sample", dp_noise_multiplier=0.0, dp_clip=1e9, sigma=0.0, options=options)
    plain = tiny_simulation("hetlora", options=options)
    without = tiny_simulation("hetlora", dp="sample", dp_noise_multiplier=0.0, dp_clip=1e9, sigma=0.0,
                              options=HetLoRAConfig(prune=True, lam=0.0))
    private = flat(summary(sim.run()))
    assert private == pytest.approx(flat(summary(plain.run())), rel=1e-4)
    assert private != pytest.approx(flat(summary(without.run())), rel=1e-4)  # the penalty changed the training


# ------------------------------------------------------------------------------------------- the budget
def test_solved_noise_respects_the_budget():
    cfg = RunConfig(dp="sample", dp_epsilon=8.0, rounds=3, batch_size=8, local_steps=4)
    sampling = client_sampling_stream(3, 0.67, 3, 0)
    sigma = noise_multiplier(cfg, SIZES, sampling)
    facts = privacy_facts(cfg, sigma, SIZES, sampling)
    assert facts["level"] == "sample" and facts["noise_multiplier"] == sigma > 0
    assert math.isfinite(facts["epsilon"]) and facts["epsilon"] <= 8.0 * 1.01
