"""Our own LoRA layer, its injection into a model, and PEFT-compatible adapter state.

One ``LoRALinear`` wraps one frozen ``nn.Linear``. Its factors are swapped in and out per client
(``set_factors``), so a single backbone serves every client whatever its rank:

    y = x W^T + s * x (B R A)^T - s0 * x (B0 A0)^T

where ``W`` is the frozen base weight (optionally shifted by a frozen ``base_delta``), ``A`` is
``r x k``, ``B`` is ``d x r``, ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA), and
``(B0, A0, s0)`` is an optional frozen offset (ILoRA starts from ``W0 - s B0 A0``). The ``r x r``
middle factor ``R`` is absent (the identity) except for methods that train one (Fed-SB).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
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
        self.lora_R: nn.Parameter | None = None  # optional r x r middle factor: the update is s B R A
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
    def effective_A(self) -> Tensor:
        """``R A`` when a middle factor is loaded, else ``A`` (the update is always ``s B effective_A``)."""
        return self.lora_A if self.lora_R is None else self.lora_R @ self.lora_A

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
        R: Tensor | None = None,
        train_R: bool = True,
    ) -> None:
        """Load new factors (copied); ``scale`` defaults to ``alpha / rank``; ``R``: a middle factor or none."""
        if A.shape[0] != B.shape[1] or A.shape[1] != self.in_features or B.shape[0] != self.out_features:
            raise ValueError(
                f"factor shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit a "
                f"{self.out_features}x{self.in_features} layer"
            )
        w = self.base.weight
        # row-major copies whatever the source's layout (an aggregate may hand over a transposed view): the
        # matrix products then take the same path as for factors that arrived over a wire, bit for bit
        contiguous = torch.contiguous_format
        self.lora_A = nn.Parameter(A.detach().to(w.device, w.dtype).clone(memory_format=contiguous),
                                   requires_grad=train_A)
        self.lora_B = nn.Parameter(B.detach().to(w.device, w.dtype).clone(memory_format=contiguous),
                                   requires_grad=train_B)
        if R is not None and R.shape != (A.shape[0], A.shape[0]):
            raise ValueError(f"middle factor R{tuple(R.shape)} does not fit rank {A.shape[0]}")
        self.lora_R = None if R is None else nn.Parameter(
            R.detach().to(w.device, w.dtype).clone(memory_format=contiguous), requires_grad=train_R)
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
        delta = self.scaling * (self.lora_B @ self.effective_A)
        if self.offset is not None:
            A0, B0, s0 = self.offset
            delta = delta - s0 * (B0 @ A0)
        return delta

    def merged_weight(self) -> Tensor:
        return self.base.weight + self.delta_weight()

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        h = self.dropout(x)
        out = out + self.scaling * ((h @ self.effective_A.t()) @ self.lora_B.t())
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
    return _wrap_modules(
        model, target_modules, lambda m: isinstance(m, nn.Linear), "nn.Linear",
        lambda m: LoRALinear(m, rank, alpha, dropout, rslora),
    )


def _wrap_modules(
    model: nn.Module,
    target_modules: Iterable[str],
    accepts: Callable[[nn.Module], bool],
    kind: str,
    wrap: Callable[[nn.Module], nn.Module],
) -> dict[str, nn.Module]:
    """Freeze ``model`` and replace each targeted module that ``accepts`` with ``wrap(module)``."""
    targets = list(target_modules)
    model.requires_grad_(False)
    found = [(n, m) for n, m in model.named_modules() if accepts(m) and _matches(n, targets)]
    if not found:
        raise ValueError(f"no {kind} matched target_modules={targets}")
    layers = {}
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = wrap(module)
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
    alpha: float | None,
    base_model: str | None = None,
    modules_to_save: list[str] | None = None,
    extra_tensors: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` loadable by PEFT.

    ``A`` / ``B`` must be plain LoRA factors (an offset or merged delta has to be folded in first); a 1x1
    convolution's factors are 4-D, as PEFT keeps them. ``alpha=None``: each layer's alpha is its rank, so
    that PEFT's scaling is 1 everywhere (the scales already folded into ``B``).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ranks = {name: int(a.shape[0]) for name, a in A.items()}
    r = max(ranks.values())
    targets = sorted(A)  # full module names: exactly the adapted layers, never a namesake elsewhere
    state = peft_state_dict(A, B)
    for key, value in (extra_tensors or {}).items():
        state[PEFT_PREFIX + key] = value.detach().contiguous().cpu()
    save_file(state, str(directory / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r if alpha is None else alpha,
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: k for n, k in ranks.items() if k != r} if alpha is None else {},
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "modules_to_save": modules_to_save,
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


# ---------------------------------------------------------------------------------------------
# LoRA on weight matrices that are not a whole nn.Linear: a 1x1 convolution, a slice of a fused qkv
# ---------------------------------------------------------------------------------------------


class _MatrixView:
    """A ``d x k`` view of (part of) a frozen module's weight, standing in for ``LoRALinear.base``.

    ``weight`` is a live view, so ``LoRALinear``'s ``set_base_delta`` / ``merged_weight`` /
    ``pretrained_weight`` act on exactly the adapted rows of the real parameter.
    """

    def __init__(self, module: nn.Module, rows: slice | None = None):
        self.module = module
        self.rows = rows

    @property
    def weight(self) -> Tensor:
        w = self.module.weight
        w = w.view(w.shape[0], -1)  # a 1x1 conv's d x k x 1 x 1 weight as d x k
        return w if self.rows is None else w[self.rows]

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def requires_grad_(self, requires_grad: bool = True) -> _MatrixView:
        self.module.requires_grad_(requires_grad)
        return self


class LoRAConv1x1(LoRALinear):
    """A frozen 1x1 ``nn.Conv2d`` (weight ``d x k x 1 x 1``, seen as ``d x k``) plus a low-rank update.

    Same interface and math as ``LoRALinear`` applied per pixel: ``k`` input and ``d`` output channels.
    """

    def __init__(self, conv: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
            raise ValueError(f"LoRAConv1x1 needs a 1x1, stride-1, ungrouped convolution, got {conv}")
        super().__init__(_MatrixView(conv), rank, alpha, dropout, rslora)  # type: ignore[arg-type]
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        h = self.dropout(x)
        out = out + self.scaling * self._low_rank(h, self.effective_A, self.lora_B)
        if self.offset is not None:
            A0, B0, s0 = self.offset
            out = out - s0 * self._low_rank(h, A0, B0)
        return out

    @staticmethod
    def _low_rank(h: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """Two 1x1 convolutions: ``k -> r`` with ``A``, then ``r -> d`` with ``B``."""
        conv2d = nn.functional.conv2d
        return conv2d(conv2d(h, A[:, :, None, None]), B[:, :, None, None])


class LoRASlice(LoRALinear):
    """LoRA on the output rows ``rows`` of a fused frozen ``nn.Linear`` (e.g. the q part of timm's qkv).

    Exposes the ``LoRALinear`` interface for the ``d x k`` slice; ``update(x)`` is its low-rank
    contribution to those output columns. The fused layer itself is owned by a ``QKVLoRA``.
    """

    def __init__(self, fused: nn.Linear, rows: slice, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__(_MatrixView(fused, rows), rank, alpha, dropout, rslora)  # type: ignore[arg-type]
        self.rows = rows

    def update(self, x: Tensor) -> Tensor:
        """``s x (B A)^T`` (minus the offset's part) for input ``x``: ``... x d``."""
        h = self.dropout(x)
        out = self.scaling * ((h @ self.effective_A.t()) @ self.lora_B.t())
        if self.offset is not None:
            A0, B0, s0 = self.offset
            out = out - s0 * ((h @ A0.t()) @ B0.t())
        return out

    def forward(self, x: Tensor) -> Tensor:
        """The adapted slice's own output ``x W_rows^T + b_rows + update(x)``."""
        w = self.base.weight
        bias = self.base.module.bias
        return nn.functional.linear(x, w, None if bias is None else bias[self.rows]) + self.update(x)


class QKVLoRA(nn.Module):
    """A fused ``qkv`` projection (out = 3 * dim) with separate LoRA adapters on the q and v slices.

    Equals a model with separate q, k, v ``nn.Linear`` layers whose q and v carry a ``LoRALinear``.
    """

    def __init__(self, qkv: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if qkv.out_features % 3:
            raise ValueError(f"a fused qkv layer needs out_features divisible by 3, got {qkv.out_features}")
        dim = qkv.out_features // 3
        self.qkv = qkv
        self.qkv.requires_grad_(False)
        self.dim = dim
        self.q = LoRASlice(qkv, slice(0, dim), rank, alpha, dropout, rslora)
        self.v = LoRASlice(qkv, slice(2 * dim, 3 * dim), rank, alpha, dropout, rslora)

    @property
    def in_features(self) -> int:
        return self.qkv.in_features

    @property
    def out_features(self) -> int:
        return self.qkv.out_features

    def forward(self, x: Tensor) -> Tensor:
        out = self.qkv(x)
        zeros = out.new_zeros(*out.shape[:-1], self.dim)
        return out + torch.cat([self.q.update(x), zeros, self.v.update(x)], dim=-1)


def inject_qkv_lora(
    model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False, name: str = "qkv"
) -> dict[str, LoRASlice]:
    """Freeze ``model`` and wrap every fused ``nn.Linear`` called ``name`` in a ``QKVLoRA`` (in place).

    Returns the slice adapters as ``<module>.q`` and ``<module>.v``. Raises if nothing matched.
    """
    model.requires_grad_(False)
    found = [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] == name
    ]
    if not found:
        raise ValueError(f"no fused nn.Linear named {name!r} found")
    layers: dict[str, LoRASlice] = {}
    for module_name, module in found:
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = QKVLoRA(module, rank, alpha, dropout, rslora)
        setattr(parent, child, wrapper)
        layers[f"{module_name}.q"] = wrapper.q
        layers[f"{module_name}.v"] = wrapper.v
    return layers


def inject_conv1x1_lora(
    model: nn.Module, target_modules: Iterable[str], rank: int, alpha: float, dropout: float = 0.0,
    rslora: bool = False,
) -> dict[str, LoRAConv1x1]:
    """Freeze ``model`` and wrap every targeted 1x1 ``nn.Conv2d`` in a ``LoRAConv1x1`` (in place)."""
    return _wrap_modules(
        model, target_modules, lambda m: isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1), "1x1 nn.Conv2d",
        lambda m: LoRAConv1x1(m, rank, alpha, dropout, rslora),
    )
