"""Our own LoRA layer, its injection into a model, and PEFT-compatible adapter state.

One ``LoRALinear`` wraps one frozen ``nn.Linear``. Its factors are swapped in and out per client
(``set_factors``), so a single backbone serves every client whatever its rank:

    y = x W^T + s * x (B A)^T - s0 * x (B0 A0)^T

where ``W`` is the frozen base weight (optionally shifted by a frozen ``base_delta``), ``A`` is
``r x k``, ``B`` is ``d x r``, ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA), and
``(B0, A0, s0)`` is an optional frozen offset (ILoRA starts from ``W0 - s B0 A0``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank update whose factors can be replaced at any time."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.alpha = float(alpha)
        self.rslora = rslora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        self.scaling = lora_scale(alpha, rank, rslora)
        self.offset: tuple[Tensor, Tensor, float] | None = None
        self._pretrained_weight: Tensor | None = None  # kept only once a base delta is applied
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def pretrained_weight(self) -> Tensor:
        """``W0``: the base weight before any ``base_delta`` was applied."""
        return self.base.weight if self._pretrained_weight is None else self._pretrained_weight

    def set_factors(
        self,
        A: Tensor,
        B: Tensor,
        scale: float | None = None,
        offset: tuple[Tensor, Tensor, float] | None = None,
        train_A: bool = True,
        train_B: bool = True,
    ) -> None:
        """Load new factors (copied); ``scale`` defaults to ``alpha / rank``."""
        if A.shape[0] != B.shape[1] or A.shape[1] != self.in_features or B.shape[0] != self.out_features:
            raise ValueError(
                f"factor shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit a "
                f"{self.out_features}x{self.in_features} layer"
            )
        w = self.base.weight
        self.lora_A = nn.Parameter(A.detach().to(w.device, w.dtype).clone(), requires_grad=train_A)
        self.lora_B = nn.Parameter(B.detach().to(w.device, w.dtype).clone(), requires_grad=train_B)
        self.scaling = lora_scale(self.alpha, A.shape[0], self.rslora) if scale is None else float(scale)
        if offset is not None:
            A0, B0, s0 = offset
            offset = (A0.detach().to(w.device, w.dtype), B0.detach().to(w.device, w.dtype), float(s0))
        self.offset = offset

    @torch.no_grad()
    def set_base_delta(self, delta: Tensor | None) -> None:
        """Make the frozen weight ``W0 + delta`` (``None`` restores ``W0``)."""
        if delta is None:
            if self._pretrained_weight is not None:
                self.base.weight.copy_(self._pretrained_weight)
            return
        if self._pretrained_weight is None:
            self._pretrained_weight = self.base.weight.detach().clone()
        self.base.weight.copy_(self._pretrained_weight + delta.to(self.base.weight))

    def delta_weight(self) -> Tensor:
        """The dense update this layer adds to its frozen weight, ``d x k``."""
        delta = self.scaling * (self.lora_B @ self.lora_A)
        if self.offset is not None:
            A0, B0, s0 = self.offset
            delta = delta - s0 * (B0 @ A0)
        return delta

    def merged_weight(self) -> Tensor:
        return self.base.weight + self.delta_weight()

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        h = self.dropout(x)
        out = out + self.scaling * ((h @ self.lora_A.t()) @ self.lora_B.t())
        if self.offset is not None:
            A0, B0, s0 = self.offset
            out = out - s0 * ((h @ A0.t()) @ B0.t())
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


def _matches(name: str, targets: Iterable[str]) -> bool:
    """PEFT's rule: a target matches the full module name or its last dotted components."""
    return any(name == t or name.endswith("." + t) or re.fullmatch(t, name) for t in targets)


def inject_lora(
    model: nn.Module,
    target_modules: Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
) -> dict[str, LoRALinear]:
    """Freeze ``model`` and wrap every targeted ``nn.Linear`` in a ``LoRALinear`` (in place).

    Returns the injected layers by their module name. Raises if nothing matched.
    """
    targets = list(target_modules)
    model.requires_grad_(False)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not found:
        raise ValueError(f"no nn.Linear matched target_modules={targets}")
    layers: dict[str, LoRALinear] = {}
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(module, rank, alpha, dropout, rslora)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


# ---------------------------------------------------------------------------------------------
# PEFT-compatible adapter files
# ---------------------------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


def peft_state_dict(A: Mapping[str, Tensor], B: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Factors by layer name -> the keys PEFT saves (``base_model.model.<layer>.lora_A.weight``)."""
    state = {}
    for name in A:
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A[name].detach().contiguous().cpu()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B[name].detach().contiguous().cpu()
    return state


def save_peft_adapter(
    directory: str | Path,
    A: Mapping[str, Tensor],
    B: Mapping[str, Tensor],
    alpha: float,
    base_model: str | None = None,
    modules_to_save: list[str] | None = None,
    extra_tensors: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` loadable by PEFT.

    ``A`` / ``B`` must be plain LoRA factors (an offset or merged delta has to be folded in first).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ranks = {name: int(a.shape[0]) for name, a in A.items()}
    r = max(ranks.values())
    targets = sorted({name.rsplit(".", 1)[-1] for name in A})
    state = peft_state_dict(A, B)
    for key, value in (extra_tensors or {}).items():
        state[PEFT_PREFIX + key] = value.detach().contiguous().cpu()
    save_file(state, str(directory / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {},
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": modules_to_save,
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory
