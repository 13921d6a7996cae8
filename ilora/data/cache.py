"""On-disk caches of derived data: client partitions and preprocessed (encoded) splits.

Everything lives under ``cache_root()``: ``$ILORA_CACHE`` when set, else ``~/.cache/ilora``. Setting
``ILORA_CACHE=off`` disables both caches. Files are written to a temporary name and renamed, so a
reader sees a complete file or none. A cache file that cannot be read is recomputed and replaced.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ilora.data.base import Split

# Bump when the layout of cached files changes.
CACHE_VERSION = 1
# Encoded splits larger than this are not cached (bytes; ``$ILORA_CACHE_MAX_BYTES`` overrides).
DEFAULT_MAX_BYTES = 4 * 1024**3


def cache_root() -> Path | None:
    """The cache directory, or ``None`` when caching is switched off."""
    value = os.environ.get("ILORA_CACHE", "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "ilora"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, else delete it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------------------- partitions


def load_partition_cache(key: str, num_clients: int, num_examples: int) -> list[np.ndarray] | None:
    """The cached client index arrays for partition ``key``, or ``None`` (absent, unreadable, stale)."""
    root = cache_root()
    if root is None:
        return None
    path = root / "partitions" / f"{key}.npz"
    try:
        with np.load(path) as f:
            parts = [np.asarray(f[f"client_{i}"], dtype=np.int64) for i in range(num_clients)]
    except (OSError, KeyError, ValueError):
        return None
    if any(len(p) and (p.min() < 0 or p.max() >= num_examples) for p in parts):
        return None
    return parts


def save_partition_cache(key: str, parts: list[np.ndarray]) -> Path | None:
    root = cache_root()
    if root is None:
        return None
    path = root / "partitions" / f"{key}.npz"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{f"client_{i}": np.asarray(p, dtype=np.int64) for i, p in enumerate(parts)})
    return path


# ---------------------------------------------------------------------------- preprocessing


def _code_fingerprint(fn: Callable[..., Any]) -> str:
    """Hash of the source file defining ``fn``: editing a backbone's encoding invalidates its cache."""
    try:
        source = inspect.getsourcefile(fn)
        return hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16] if source else fn.__qualname__
    except (TypeError, OSError):
        return getattr(fn, "__qualname__", repr(type(fn)))


def preprocessing_key(cfg: Any, split: str) -> dict[str, Any]:
    """What determines the encoded ``split`` of a run config (``RunConfig`` or anything with its fields).

    The dataset loader's code is part of it: editing how a loader builds its inputs (e.g. how DBpedia
    joins title and content) invalidates the encodings made before.
    """
    from ilora.data.base import DATASETS

    loader = DATASETS.get(cfg.dataset)
    return {
        "dataset": cfg.dataset,
        "loader": _code_fingerprint(loader[0]) if loader else None,
        "split": split,
        "max_train_samples": cfg.max_train_samples,
        "max_test_samples": cfg.max_test_samples,
        "split_seed": cfg.split_seed,
        "data_dir": cfg.data_dir,
        "model": cfg.model,
        "max_length": cfg.max_length,
        "image_size": cfg.image_size,
    }


def encode_cache_path(encode: Callable[[Split], Any], split: Split, key: dict[str, Any]) -> Path | None:
    """Where the encoded ``split`` is cached: a hash of ``key``, the labels and the encoder's code."""
    root = cache_root()
    if root is None:
        return None
    h = hashlib.sha256(json.dumps({**key, "version": CACHE_VERSION}, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(split.labels, dtype=np.int64).tobytes())
    h.update(_code_fingerprint(encode).encode())
    name = f"{key.get('dataset', 'data')}-{key.get('split', 'split')}-{key.get('model', 'model')}"
    return root / "preprocessed" / f"{name}-{h.hexdigest()[:16]}.safetensors"


def cached_encode(encode: Callable[[Split], dict[str, torch.Tensor]], split: Split,
                  key: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``encode(split)``, read from the cache when this (key, labels, encoder code) was encoded before.

    ``key`` names what determines the output (dataset, split, subsample sizes, split_seed, model,
    max_length, image_size; see ``preprocessing_key``). Outputs larger than ``$ILORA_CACHE_MAX_BYTES``
    (default 4 GiB) are returned without being cached.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    path = encode_cache_path(encode, split, key)
    if path is not None and path.exists():
        try:
            batch = load_file(str(path))
            if "labels" not in batch or len(batch["labels"]) == len(split):
                return batch
        except (OSError, SafetensorError):
            pass  # unreadable: recompute and replace
    batch = encode(split)
    limit = int(os.environ.get("ILORA_CACHE_MAX_BYTES", DEFAULT_MAX_BYTES))
    size = sum(t.numel() * t.element_size() for t in batch.values())
    if path is not None and size <= limit:
        with atomic_path(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in batch.items()}, str(tmp))
    return batch
