"""Shared fixtures: a tiny backbone and federation that run in milliseconds."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ilora.algorithm import Federation, LayerSpec  # noqa: E402
from ilora.lora import inject_lora  # noqa: E402
from ilora.models import Backbone  # noqa: E402


class TinyNet(nn.Module):
    """Two adapted layers with different shapes (d != k) and a head."""

    def __init__(self, in_dim: int = 12, hidden: int = 10, classes: int = 3):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)
        self.mix = nn.Linear(hidden, hidden + 4)
        self.head = nn.Linear(hidden + 4, classes)

    def forward(self, batch):
        h = torch.tanh(self.proj(batch["x"]))
        return self.head(torch.tanh(self.mix(h)))


def tiny_backbone(rank: int = 4, dtype: torch.dtype = torch.float64, seed: int = 0, dropout: float = 0.0) -> Backbone:
    torch.manual_seed(seed)
    net = TinyNet().to(dtype)
    layers = inject_lora(net, ["proj", "mix"], rank=rank, alpha=8.0, dropout=dropout)
    head = {n: p for n, p in net.named_parameters() if n.startswith("head.")}
    for p in head.values():
        p.requires_grad_(True)
    return Backbone("tiny", net, layers, head, encode=lambda split: {})


def tiny_data(n: int, seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g, dtype=dtype)
    return {"x": x, "labels": (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()}


def tiny_federation(backbone: Backbone, ranks: list[int], sizes: list[int], seed: int = 0) -> Federation:
    return Federation(
        layers={n: LayerSpec(l.out_features, l.in_features) for n, l in backbone.lora_layers.items()},
        ranks=ranks,
        num_examples=sizes,
        head_init={n: p.detach().clone() for n, p in backbone.head.items()},
        pretrained_weights=lambda: {n: l.pretrained_weight.detach() for n, l in backbone.lora_layers.items()},
        lora_alpha=8.0,
        seed=seed,
        dtype=next(iter(backbone.head.values())).dtype,
    )


@pytest.fixture
def tiny():
    return tiny_backbone()
