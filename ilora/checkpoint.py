"""Round checkpoints of a run, so that a killed run resumes where it stopped and loses nothing.

An algorithm's state is its instance attributes (except the static ``fed`` and ``config``): nested
dicts, lists and tuples of tensors and plain values, and components that declare ``checkpoint_static``
(e.g. ``ControlVariates``), whose other attributes are saved and restored into the existing object.
They are split into a JSON skeleton and a flat set of tensors stored with safetensors (never pickle).
Because client sampling is pre-drawn and every client's local training is seeded by (run seed, round,
client), a resumed run computes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ilora.algorithm import Algorithm

_STATIC = {"fed", "config"}


class _ComponentState(dict):
    """The saved attributes of a component (restored into the algorithm's existing object)."""


def _flatten(obj: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    if hasattr(obj, "checkpoint_static"):
        state = {k: v for k, v in vars(obj).items() if k not in obj.checkpoint_static}
        return {"__component__": _flatten(state, path, tensors)}
    if isinstance(obj, Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"cannot checkpoint {path}: key {k!r} is neither str nor int")
            items.append([k, _flatten(v, f"{path}.{k}", tensors)])
        return {"__dict__": items}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{path}[{i}]", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"__value__": obj}
    raise TypeError(f"cannot checkpoint {path}: unsupported type {type(obj).__name__}")


def _unflatten(node: Any, tensors: dict[str, Tensor], device: torch.device) -> Any:
    if "__component__" in node:
        return _ComponentState(_unflatten(node["__component__"], tensors, device))
    if "__tensor__" in node:
        return tensors[node["__tensor__"]].to(device)
    if "__dict__" in node:
        return {k: _unflatten(v, tensors, device) for k, v in node["__dict__"]}
    if "__list__" in node:
        items = [_unflatten(v, tensors, device) for v in node["__list__"]]
        return tuple(items) if node["tuple"] else items
    return node["__value__"]


def algorithm_state(algo: Algorithm) -> tuple[Any, dict[str, Tensor]]:
    """(JSON skeleton, tensors) of everything an algorithm learned or keeps between rounds."""
    tensors: dict[str, Tensor] = {}
    state = {k: v for k, v in vars(algo).items() if k not in _STATIC}
    return _flatten(state, algo.name, tensors), tensors


def restore_algorithm(algo: Algorithm, skeleton: Any, tensors: dict[str, Tensor]) -> None:
    for key, value in _unflatten(skeleton, tensors, algo.fed.device).items():
        if isinstance(value, _ComponentState):
            for name, attr in value.items():
                setattr(getattr(algo, key), name, attr)
        else:
            setattr(algo, key, value)


def save_checkpoint(directory: Path, algo: Algorithm, rounds: list[dict], config_hash: str) -> None:
    """Write the state after ``len(rounds)`` rounds; the JSON file, written last, commits it."""
    directory.mkdir(parents=True, exist_ok=True)
    skeleton, tensors = algorithm_state(algo)
    done = len(rounds)
    tensor_file = directory / f"state-{done}.safetensors"
    save_file(tensors, str(tensor_file.with_suffix(".tmp")))
    tensor_file.with_suffix(".tmp").replace(tensor_file)
    meta = {"config_hash": config_hash, "rounds_done": done, "rounds": rounds, "state": skeleton,
            "tensors": tensor_file.name}
    tmp = directory / "checkpoint.json.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.replace(directory / "checkpoint.json")
    for old in directory.glob("state-*.safetensors"):
        if old != tensor_file:
            old.unlink(missing_ok=True)


def load_checkpoint(directory: Path, algo: Algorithm, config_hash: str) -> list[dict]:
    """Restore ``algo`` from ``directory`` if a checkpoint of the same config is there; return its rounds."""
    meta_path = directory / "checkpoint.json"
    if not meta_path.exists():
        return []
    meta = json.loads(meta_path.read_text())
    if meta.get("config_hash") != config_hash:
        return []
    restore_algorithm(algo, meta["state"], load_file(str(directory / meta["tensors"])))
    return meta["rounds"]
