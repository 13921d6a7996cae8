"""A run's final global model, saved with the run and exported as a PEFT adapter or as merged weights.

Every method's evaluated model is, on each adapted layer, ``W0 + D + s B R A - s0 B0 A0``: the frozen
pretrained weight, an optional dense merged update ``D`` (FLoRA, FedEx-LoRA's residual), the adapter
with its scale and optional middle factor (Fed-SB), and an optional frozen offset (ILoRA's QR start).

``peft``: one plain LoRA per layer that reproduces that sum. Without ``D`` it is exact by
concatenation, ``B' = [s B, -s0 B0]`` and ``A' = [R A; A0]`` (rank ``r + r0``), with the scales folded
into ``B'`` and PEFT's scaling set to 1 (``lora_alpha = r`` per layer). With ``D`` the update is not
low-rank in general: it is written as a LoRA of its numerical rank (the SVD of the dense ``d x k``
update, singular values below float32 resolution dropped), which may reach ``min(d, k)``.
``merged``: the base model's weights with every update added, nothing else to load.

Both formats come with ``head.safetensors`` (the classification head every method trains) and
``export.json`` (how the head is applied: pooling, input preprocessing).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ilora.algorithm import ClientModel
from ilora.errors import UserError
from ilora.lora import LoRAConv1x1, LoRALinear, LoRASlice, QKVLoRA, save_peft_adapter
from ilora.models import Backbone

GLOBAL_MODEL = "global_model.safetensors"
FORMATS = ("peft", "merged")
_KINDS = ("lora_A", "lora_B", "lora_R", "offset_A", "offset_B", "base_delta", "head")


# ------------------------------------------------------------------------------ the saved global model
def save_global_model(path: Path, model: ClientModel, method: str) -> Path:
    """Write a method's evaluated model (factors, offsets, dense update, head) to ``path``, atomically."""
    tensors: dict[str, Tensor] = {}

    def put(kind: str, items: dict[str, Tensor] | None) -> None:
        for name, t in (items or {}).items():
            tensors[f"{kind}/{name}"] = t.detach().to("cpu").contiguous().clone()

    put("lora_A", model.A)
    put("lora_B", model.B)
    put("lora_R", model.R)
    put("offset_A", {n: a for n, (a, _, _) in model.offsets.items()})
    put("offset_B", {n: b for n, (_, b, _) in model.offsets.items()})
    put("base_delta", model.base_delta)
    put("head", model.head)
    metadata = {
        "method": method,
        "scale": repr(float(model.scale)),
        "offset_scales": json.dumps({n: float(s0) for n, (_, _, s0) in model.offsets.items()}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_global_model(path: Path) -> ClientModel:
    """The ``ClientModel`` saved by ``save_global_model``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    flat = load_file(str(path))
    parts: dict[str, dict[str, Tensor]] = {kind: {} for kind in _KINDS}
    for key, t in flat.items():
        kind, _, name = key.partition("/")
        parts[kind][name] = t
    offset_scales = json.loads(metadata.get("offset_scales", "{}"))
    offsets = {n: (parts["offset_A"][n], parts["offset_B"][n], float(s0)) for n, s0 in offset_scales.items()}
    return ClientModel(
        A=parts["lora_A"], B=parts["lora_B"], head=parts["head"], scale=float(metadata.get("scale", "1.0")),
        offsets=offsets, base_delta=parts["base_delta"] or None, R=parts["lora_R"] or None,
    )


# ------------------------------------------------------------------------------ one layer's update
def low_rank_pieces(model: ClientModel, name: str) -> list[tuple[Tensor, Tensor]]:
    """Layer ``name``'s low-rank terms as ``(B_j, A_j)`` in float64 with their scales folded into ``B_j``."""
    A = model.A[name].double()
    if model.R is not None:
        A = model.R[name].double() @ A
    pieces = [(model.scale * model.B[name].double(), A)] if model.scale != 0 else []
    if name in model.offsets:
        A0, B0, s0 = model.offsets[name]
        pieces.append((-s0 * B0.double(), A0.double()))
    return pieces


def dense_update(model: ClientModel, name: str) -> Tensor:
    """Layer ``name``'s whole update ``D + s B R A - s0 B0 A0`` as a dense float64 ``d x k`` matrix."""
    d, k = model.B[name].shape[0], model.A[name].shape[1]
    delta = torch.zeros(d, k, dtype=torch.float64)
    if model.base_delta is not None and name in model.base_delta:
        delta += model.base_delta[name].double().cpu()
    for B, A in low_rank_pieces(model, name):
        delta += B.cpu() @ A.cpu()
    return delta


def lora_factors(model: ClientModel, name: str) -> tuple[Tensor, Tensor]:
    """One plain LoRA ``(B', A')`` (scaling 1) whose product is layer ``name``'s whole update."""
    has_dense = model.base_delta is not None and name in model.base_delta
    pieces = [(B.cpu(), A.cpu()) for B, A in low_rank_pieces(model, name)]
    if not has_dense and pieces:
        return torch.cat([B for B, _ in pieces], dim=1), torch.cat([A for _, A in pieces], dim=0)
    delta = dense_update(model, name)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    tolerance = (S[0] if len(S) else 0.0) * max(delta.shape) * torch.finfo(torch.float32).eps
    rank = max(1, int((S > tolerance).sum()))
    return U[:, :rank] * S[:rank], Vh[:rank]


# ------------------------------------------------------------------------------ export targets
def export_root(backbone: Backbone) -> tuple[str, nn.Module]:
    """The submodule of the backbone that the exported base model is (e.g. MiniLM's transformers encoder)."""
    root = backbone.export_root
    return root, (backbone.module.get_submodule(root) if root else backbone.module)


def _relative(name: str, root: str) -> str:
    if not root:
        return name
    if not name.startswith(root + "."):
        raise UserError(f"layer {name} lies outside the exported model {root}")
    return name[len(root) + 1:]


def peft_targets(backbone: Backbone, model: ClientModel) -> dict[str, tuple[Tensor, Tensor, bool]]:
    """PEFT target module name (relative to the export root) -> ``(B', A', is_conv)``.

    The q and v slices of a fused qkv projection become one LoRA on the whole projection: ``A'``
    stacks both slices' ``A``, ``B'`` is block-diagonal into their rows (zero on k), which is exact.
    """
    root, _ = export_root(backbone)
    targets: dict[str, tuple[Tensor, Tensor, bool]] = {}
    fused: dict[str, list[tuple[LoRASlice, Tensor, Tensor]]] = {}
    for name, layer in backbone.lora_layers.items():
        B, A = lora_factors(model, name)
        if isinstance(layer, LoRASlice):
            fused.setdefault(name.rpartition(".")[0], []).append((layer, B, A))
        else:
            targets[_relative(name, root)] = (B, A, isinstance(layer, LoRAConv1x1))
    for wrapper_name, slices in fused.items():
        out_features = slices[0][0].base.module.out_features
        rank = sum(A.shape[0] for _, _, A in slices)
        B_full = torch.zeros(out_features, rank, dtype=torch.float64)
        start = 0
        for layer, B, A in slices:
            B_full[layer.rows, start:start + A.shape[0]] = B
            start += A.shape[0]
        targets[_relative(wrapper_name, root)] = (B_full, torch.cat([A for _, _, A in slices]), False)
    return targets


def write_peft(backbone: Backbone, model: ClientModel, out: Path) -> list[Path]:
    """``adapter_config.json`` + ``adapter_model.safetensors`` for ``PeftModel.from_pretrained``, scaling 1."""
    dtype = next(iter(backbone.lora_layers.values())).base.weight.dtype
    A, B = {}, {}
    for target, (B_t, A_t, conv) in sorted(peft_targets(backbone, model).items()):
        B_t, A_t = B_t.to(dtype), A_t.to(dtype)
        if conv:  # PEFT's LoRA on a 1x1 convolution keeps its factors as 1x1 convolutions
            B_t, A_t = B_t[:, :, None, None], A_t[:, :, None, None]
        A[target], B[target] = A_t, B_t
    save_peft_adapter(out, A, B, alpha=None, base_model=backbone.hf_name)
    return [out / "adapter_config.json", out / "adapter_model.safetensors"]


def _plain_module(layer: nn.Module) -> nn.Module:
    """The frozen module a LoRA wrapper holds."""
    if isinstance(layer, QKVLoRA):
        return layer.qkv
    if isinstance(layer, LoRAConv1x1):
        return layer.conv
    if isinstance(layer, LoRALinear):
        return layer.base
    raise TypeError(type(layer).__name__)


def merged_module(backbone: Backbone, model: ClientModel) -> nn.Module:
    """A copy of the export root without LoRA wrappers, every layer's update added to its weight."""
    root, module = export_root(backbone)
    clean = copy.deepcopy(module)
    wrappers = [(n, m) for n, m in clean.named_modules() if isinstance(m, (QKVLoRA, LoRALinear))]
    for name, wrapper in wrappers:
        if isinstance(wrapper, LoRASlice):
            continue  # a slice of a fused projection: its QKVLoRA parent is replaced instead
        plain = _plain_module(wrapper)
        parent_name, _, child = name.rpartition(".")
        setattr(clean.get_submodule(parent_name) if parent_name else clean, child, plain)
    with torch.no_grad():
        for name, layer in backbone.lora_layers.items():
            target = clean.get_submodule(_relative(name.rpartition(".")[0] if isinstance(layer, LoRASlice) else name,
                                                   root))
            weight = target.weight
            w0 = layer.pretrained_weight.detach().double().cpu()
            merged = (w0 + dense_update(model, name)).to(weight.dtype)
            rows = layer.rows if isinstance(layer, LoRASlice) else slice(None)
            weight.view(weight.shape[0], -1)[rows] = merged.to(weight.device)
        for name, t in model.head.items():  # a head inside the exported model (e.g. RoBERTa's classifier)
            if not root or name.startswith(root + "."):
                clean.get_parameter(_relative(name, root)).copy_(t)
    return clean


def write_merged(backbone: Backbone, model: ClientModel, out: Path) -> list[Path]:
    """The merged base model: ``save_pretrained`` for a transformers model, else ``model.safetensors``."""
    clean = merged_module(backbone, model)
    if hasattr(clean, "save_pretrained"):
        clean.save_pretrained(str(out), safe_serialization=True)
        return sorted(p for p in out.iterdir() if p.name.startswith(("config", "model")))
    state = {k: v.detach().cpu().contiguous() for k, v in clean.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    return [out / "model.safetensors"]


WRITERS: dict[str, Callable[[Backbone, ClientModel, Path], list[Path]]] = {"peft": write_peft, "merged": write_merged}


def export_model(backbone: Backbone, model: ClientModel, fmt: str, out: Path, about: dict[str, Any]) -> list[Path]:
    """Write ``model`` in format ``fmt`` to ``out`` (created): the weights, ``head.safetensors``, ``export.json``.

    The directory appears complete or not at all (written next to ``out``, then renamed).
    """
    if fmt not in WRITERS:
        raise UserError(f"unknown export format {fmt!r} (valid: {', '.join(FORMATS)})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        WRITERS[fmt](backbone, model, staging)
        save_file({n: t.detach().cpu().contiguous() for n, t in model.head.items()}, str(staging / "head.safetensors"))
        root, _ = export_root(backbone)
        info = {
            "format": fmt,
            **about,
            "model": backbone.name,
            "base_model": backbone.hf_name,
            "export_root": root,
            "head": sorted(model.head),
            **backbone.export_info,
        }
        (staging / "export.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            os.replace(out, old)
            os.replace(staging, out)
            _remove_tree(old)
        else:
            os.replace(staging, out)
    except BaseException:
        _remove_tree(staging)
        raise
    return sorted(out.iterdir())


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------ from a run directory
def default_export_dir(run_dir: Path, fmt: str) -> Path:
    return Path(run_dir) / "export" / fmt


def export_run(run_dir: Path, fmt: str = "peft", out: Path | None = None) -> list[Path]:
    """``ilora export``: rebuild the run's backbone from its record, load its global model, write ``fmt``."""
    from omegaconf import OmegaConf

    from ilora.config import RunConfig
    from ilora.models import ModelOptions, build_model

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r} (valid: {', '.join(FORMATS)})")
    run_dir = Path(run_dir)
    if out is not None:
        from ilora.config import check_writable_dir

        check_writable_dir("--out", str(out))  # before the model is rebuilt
    record_path, model_path = run_dir / "result.json", run_dir / GLOBAL_MODEL
    if not record_path.is_file():
        raise UserError(f"RUN_DIR {run_dir} holds no result.json (a finished run's directory, e.g. runs/cpu/<run_id>)")
    record = json.loads(record_path.read_text())
    if not model_path.is_file():
        raise UserError(f"RUN_DIR {run_dir} holds no {GLOBAL_MODEL}: the run ended {record.get('status')!r}, was "
                        "recorded before runs saved their final model (run it again with --force), or is a "
                        "personalised method's run on Flower (its models stay on the clients)")
    cfg: RunConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), record["config"]))
    backbone = build_model(cfg.model, ModelOptions(
        num_classes=record["num_classes"], rank=max(cfg.ranks), lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
        rslora=cfg.rslora, max_length=cfg.max_length, image_size=cfg.image_size, lora_targets=cfg.lora_targets,
        seed=0,  # the head's initial values do not matter: the saved head replaces them
        pretrained=cfg.pretrained,
    ))
    model = load_global_model(model_path)
    return export_model(backbone, model, fmt, Path(out) if out else default_export_dir(run_dir, fmt),
                        about_run(record))


def about_run(record: dict[str, Any]) -> dict[str, Any]:
    """What ``export.json`` says about the run the model comes from."""
    about = {key: record.get(key) for key in ("run_id", "method", "dataset", "model", "seed", "config_hash",
                                               "final_accuracy", "num_classes", "evaluation", "config")}
    return {**about, "client0_accuracy": _client0(record)}  # config: ilora eval scores the export on its test split


def _client0(record: dict[str, Any]) -> float | None:
    """A personalised run's saved model is client 0's: its accuracy in the last round (else None)."""
    rounds = record.get("rounds") or []
    accuracies = rounds[-1].get("client_accuracy") if rounds else None
    return float(accuracies[0]) if accuracies else None
