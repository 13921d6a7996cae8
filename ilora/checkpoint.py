"""Round checkpoints of a run, so that a killed run resumes where it stopped and loses nothing.

An algorithm's state is its instance attributes (except the static ``fed`` and ``config``): nested
dicts, lists and tuples of tensors and plain values, and components that declare ``checkpoint_static``
(e.g. ``ControlVariates``), whose other attributes are saved and restored into the existing object.
They are split into a JSON skeleton and a flat set of tensors stored with safetensors (never pickle).
Because client sampling is pre-drawn and every client's local training is seeded by (run seed, round,
client), a resumed run computes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
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


def to_tensors(obj: Any, name: str = "state") -> tuple[Any, dict[str, Tensor]]:
    """(JSON skeleton, flat tensors) of nested dicts / lists of tensors and plain values (no pickle)."""
    tensors: dict[str, Tensor] = {}
    return _flatten(obj, name, tensors), tensors


def from_tensors(skeleton: Any, tensors: dict[str, Tensor], device: torch.device | str = "cpu") -> Any:
    """The inverse of ``to_tensors``."""
    return _unflatten(skeleton, tensors, torch.device(device))


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


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoints(directory: Path) -> list[int]:
    """The rounds that have a committed checkpoint (``checkpoint-<n>.json``), newest first."""
    done = []
    for meta in directory.glob("checkpoint-*.json"):
        suffix = meta.stem.partition("-")[2]
        if suffix.isdigit():
            done.append(int(suffix))
    return sorted(done, reverse=True)


def save_checkpoint(directory: Path, algo: Algorithm, rounds: list[dict], config_hash: str, keep: int = 2) -> None:
    """Write the state after ``len(rounds)`` rounds and keep the last ``keep`` checkpoints.

    The tensors go to ``state-<n>.safetensors``; ``checkpoint-<n>.json``, written last (through a
    temporary file and a rename), commits them and carries the tensor file's SHA-256, so that a damaged
    file of either kind is detected on resume.
    """
    directory.mkdir(parents=True, exist_ok=True)
    skeleton, tensors = algorithm_state(algo)
    done = len(rounds)
    tensor_file = directory / f"state-{done}.safetensors"
    tmp = tensor_file.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(tensor_file)
    meta = {"config_hash": config_hash, "rounds_done": done, "rounds": rounds, "state": skeleton,
            "tensors": tensor_file.name, "sha256": _digest(tensor_file)}
    tmp = directory / f"checkpoint-{done}.json.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.replace(directory / f"checkpoint-{done}.json")
    kept = set(_checkpoints(directory)[:keep])
    for old in [*directory.glob("checkpoint-*.json"), *directory.glob("state-*.safetensors")]:
        n = old.name.split("-", 1)[1].split(".", 1)[0]
        if not n.isdigit() or int(n) not in kept:
            old.unlink(missing_ok=True)


def _read(directory: Path, done: int, config_hash: str) -> tuple[dict, dict[str, Tensor]] | None:
    """The checkpoint after round ``done``: (meta, tensors); ``None`` if it is another config's.

    Raises ``ValueError`` naming what is damaged."""
    try:
        meta = json.loads((directory / f"checkpoint-{done}.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint-{done}.json is unreadable ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or not {"config_hash", "rounds", "state", "tensors", "sha256"} <= set(meta):
        raise ValueError(f"checkpoint-{done}.json is incomplete")
    if meta["config_hash"] != config_hash:
        return None
    if len(meta["rounds"]) != done:
        raise ValueError(f"checkpoint-{done}.json holds {len(meta['rounds'])} rounds")
    tensor_file = directory / meta["tensors"]
    if not tensor_file.exists() or _digest(tensor_file) != meta["sha256"]:
        raise ValueError(f"{meta['tensors']} is missing or does not match its checksum")
    try:
        tensors = load_file(str(tensor_file))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{meta['tensors']} cannot be read ({exc})".splitlines()[0]) from None
    return meta, tensors


def load_checkpoint(directory: Path, algo: Algorithm, config_hash: str) -> list[dict]:
    """Restore ``algo`` from the newest good checkpoint of the same config in ``directory``; its rounds.

    A damaged checkpoint is named in one line on stderr and the one before it is tried; with none
    left the run starts over (``[]``), and then computes what an uninterrupted run computes.
    """
    for i, done in enumerate(candidates := _checkpoints(directory)):
        try:
            found = _read(directory, done, config_hash)
            if found is None:
                return []
            meta, tensors = found
            restore_algorithm(algo, meta["state"], tensors)
            return meta["rounds"]
        except (ValueError, KeyError, TypeError) as exc:
            fallback = f"resuming after round {candidates[i + 1]}" if i + 1 < len(candidates) else "starting over"
            print(f"warning: the checkpoint after round {done} in {directory} is damaged ({exc}); {fallback}",
                  file=sys.stderr)
    return []
