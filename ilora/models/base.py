"""Backbone types, the model registry and the helpers builders share (``ilora.models`` discovers the built-in builders).

A builder returns a ``Backbone``; the simulator loads each client's factors and head into it in turn.
Builders are registered by name with ``@register_model``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ilora.data.base import Split
from ilora.errors import ConfigError
from ilora.lora import LoRALinear

Batch = dict[str, Tensor]


@dataclass
class ModelOptions:
    num_classes: int
    rank: int = 8  # initial rank of the injected layers (replaced per client)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    rslora: bool = False
    max_length: int = 64  # text models
    image_size: int | None = None  # vision models: None means the backbone's default
    lora_targets: str | None = None  # where a backbone offers a choice of LoRA layers (None: its default)
    seed: int = 0  # the head's initialisation
    pretrained: bool = True


@dataclass
class Backbone:
    """The one shared model of a run."""

    name: str
    module: nn.Module  # forward(batch) -> logits
    lora_layers: dict[str, LoRALinear]
    head: dict[str, nn.Parameter]  # trained and aggregated by every method
    encode: Callable[[Split], Batch]  # raw split -> tensors (labels under "labels")
    hf_name: str | None = None  # for exported adapters
    meta: dict = field(default_factory=dict)
    export_root: str = ""  # the submodule an export's base model is (e.g. the transformers encoder); "" = module
    export_info: dict = field(default_factory=dict)  # how an exported head is applied (export.json)

    def __call__(self, batch: Batch) -> Tensor:
        return self.module(batch)

    def to(self, device: torch.device) -> Backbone:
        self.module.to(device)
        return self


class FrozenBackboneModule(nn.Module):
    """Base of every backbone's ``module``: what ``train()`` switches on in the frozen network.

    ``backbone_dropout = True`` (the run key of the same name; the authors' code calls ``train()`` on
    the whole model): the pretrained network's own dropout / drop-path / drop-connect is active during
    local training, as are the LoRA layers' dropout. ``False``: only the LoRA layers switch to training
    mode. Either way BatchNorm stays in eval mode and keeps its pretrained statistics (training mode
    would overwrite the shared backbone's running statistics with each client's batches).
    """

    backbone_dropout: bool = False

    def train(self, mode: bool = True) -> FrozenBackboneModule:
        if mode and self.backbone_dropout:
            super().train(True)
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
            return self
        super().train(False)
        self.training = mode
        for m in self.modules():
            if isinstance(m, LoRALinear):
                m.train(mode)
        return self


Builder = Callable[[ModelOptions], Backbone]
MODELS: dict[str, tuple[Builder, str, bool]] = {}


@dataclass(frozen=True)
class ModelLimits:
    """What a backbone accepts, checked from the config before any work (no weights are loaded)."""

    max_rank: int | None = None  # the smallest min(d, k) of the adapted layers
    max_length: int | None = None  # text: tokens the position embeddings cover
    image_sizes: tuple[int, ...] | None = None  # image: the only sizes accepted (None: any that fits below)
    image_multiple: int = 1
    min_image_size: int = 1
    why_image: str = ""


MODEL_LIMITS: dict[str, ModelLimits] = {}
# name -> a check of the files the backbone loads (weights, tokenizer), run before any work; raises UserError
MODEL_CHECKS: dict[str, Callable[[], object]] = {}


def register_model(name: str, kind: str, offline: bool, limits: ModelLimits | None = None,
                   check: Callable[[], object] | None = None) -> Callable[[Builder], Builder]:
    """Register a builder; ``check`` verifies the files it will load without loading the model."""

    def wrap(fn: Builder) -> Builder:
        MODELS[name] = (fn, kind, offline)
        MODEL_LIMITS[name] = limits or ModelLimits()
        if check is not None:
            MODEL_CHECKS[name] = check
        return fn

    return wrap


def seeded_linear(in_features: int, out_features: int, seed: int) -> nn.Linear:
    """A classification head initialised from ``seed`` (the same initial head for every method)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Linear(in_features, out_features)
    finally:
        torch.random.set_rng_state(state)


def lora_args(options: ModelOptions) -> tuple[int, float, float, bool]:
    """``rank, alpha, dropout, rslora`` for the ``inject_*`` functions."""
    return options.rank, options.lora_alpha, options.lora_dropout, options.rslora


def fixed_targets(model: str, options: ModelOptions, choice: str = "query_value") -> None:
    """For a backbone with one set of LoRA layers: ``lora_targets`` must be unset or name that set."""
    if options.lora_targets not in (None, choice):
        raise ConfigError(f"lora_targets {options.lora_targets!r} is not offered by {model} (valid: {choice})")


def head_parameters(module: nn.Module, prefix: str) -> dict[str, nn.Parameter]:
    """Make the parameters under ``prefix`` trainable and return them by name."""
    params = {n: p for n, p in module.named_parameters() if n.startswith(prefix)}
    for p in params.values():
        p.requires_grad_(True)
    return params
