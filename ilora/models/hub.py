"""Pretrained weights from the local Hugging Face cache only, with one clear line when they are missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ilora.errors import DataUnavailable

# The Hugging Face hub repository of every model that is not packaged for offline use.
HUB_REPOS = {
    "vit_base": "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "swin_base": "timm/swin_base_patch4_window7_224.ms_in22k_ft_in1k",
    "hf_vit_base": "google/vit-base-patch16-224",
    "hf_swin_base": "microsoft/swin-base-patch4-window7-224",
    "roberta_base": "FacebookAI/roberta-base",
}


def prepare_model(name: str) -> Path:
    """Download ``name``'s weights into the Hugging Face cache (needs network); returns the snapshot."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(HUB_REPOS[name]))
    except Exception as exc:  # offline, no network, or the hub refused
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataUnavailable(
            f"could not download model {name!r} ({HUB_REPOS[name]}) into {hub_cache_dir()}: {reason}"
        ) from None


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


FIX = "on a connected machine run `hf download {repo}` and copy that cache here (or point HF_HOME at it)"

# Weight files a snapshot may hold, in the order they are looked for (a sharded checkpoint: its index).
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                        "pytorch_model.bin.index.json")
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                "open_clip_pytorch_model.bin")
# Tokenizer files: any one of these sets is a complete tokenizer.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("vocab.txt",), ("spiece.model",),
                   ("sentencepiece.bpe.model",), ("tokenizer.model",))
# A tokenizer with fewer tokens than this share of the model's vocab_size is not the model's own.
MIN_VOCAB_SHARE = 0.9


def missing(model: str, repo_id: str) -> DataUnavailable:
    return DataUnavailable(
        f"model {model!r} needs the weights of {repo_id}, which are not in the Hugging Face cache "
        f"({hub_cache_dir()}); {FIX.format(repo=repo_id)}"
    )


def incomplete(model: str, repo_id: str, folder: Path, what: str) -> DataUnavailable:
    """The one-line error for a cached snapshot that lacks ``what``."""
    return DataUnavailable(
        f"model {model!r}: the cached snapshot of {repo_id} ({folder}) {what}; {FIX.format(repo=repo_id)}"
    )


def _present(path: Path) -> bool:
    """A non-empty file (a dangling link to a blob that was never downloaded is absent)."""
    return path.is_file() and path.stat().st_size > 0


def find_weights(folder: Path, names: tuple[str, ...] = TRANSFORMERS_WEIGHTS) -> Path | None:
    """The first of ``names`` present in ``folder``; an index counts only if all its shards are there."""
    import json

    for name in names:
        path = folder / name
        if not _present(path):
            continue
        if not name.endswith(".index.json"):
            return path
        try:
            shards = set(json.loads(path.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        if all(_present(folder / shard) for shard in shards):
            return path
    return None


def has_tokenizer(folder: Path) -> bool:
    return any(all(_present(folder / name) for name in group) for group in TOKENIZER_FILES)


def _describe(names: tuple[str, ...]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def local_snapshot(
    model: str, repo_id: str, *, config: bool = False, weights: tuple[str, ...] = (), tokenizer: bool = False
) -> Path:
    """The cached snapshot folder of ``repo_id`` (no network), checked to hold what loading it needs.

    ``config``: ``config.json``; ``weights``: one of these weight files; ``tokenizer``: a complete set of
    tokenizer files. Raises ``DataUnavailable`` (one line: the snapshot, what is missing, the fix).
    """
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as err:  # the hub raises several types for "not cached"
        raise missing(model, repo_id) from err
    if config and not _present(folder / "config.json"):
        raise incomplete(model, repo_id, folder, "has no config.json")
    if weights and find_weights(folder, weights) is None:
        raise incomplete(model, repo_id, folder, f"has no weights ({_describe(weights)})")
    if tokenizer and not has_tokenizer(folder):
        sets = tuple(" + ".join(group) for group in TOKENIZER_FILES)
        raise incomplete(model, repo_id, folder, f"has no tokenizer files ({_describe(sets)})")
    return folder


def local_weights_file(model: str, repo_id: str, names: tuple[str, ...] = TIMM_WEIGHTS) -> Path:
    """The cached weights file of ``repo_id`` (the first of ``names`` present)."""
    folder = local_snapshot(model, repo_id, weights=names)
    return find_weights(folder, names)  # type: ignore[return-value]  (checked above)


def config_vocab_size(folder: Path) -> int | None:
    """``vocab_size`` of ``folder``'s ``config.json`` (None when absent or unreadable)."""
    import json

    try:
        size = json.loads((folder / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) and size > 0 else None


def vocab_problem(tokens: int, vocab_size: int) -> str | None:
    """Why a tokenizer of ``tokens`` tokens does not fit embeddings of ``vocab_size`` rows (None: it fits)."""
    if tokens > vocab_size:
        return f"has {tokens} tokens, more than the model's vocab_size {vocab_size} (ids past its embeddings)"
    if tokens < MIN_VOCAB_SHARE * vocab_size:
        return (f"has {tokens} tokens, far below the model's vocab_size {vocab_size} (not the model's own "
                "tokenizer: texts would become unknown tokens)")
    return None


def checked_tokenizer(model: str, folder: Path, vocab_size: int | None, fix: str) -> Any:
    """``AutoTokenizer`` of ``folder``, checked against the model's ``vocab_size``; ``fix`` ends the error."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # unreadable or incomplete tokenizer files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataUnavailable(f"model {model!r}: the tokenizer in {folder} does not load ({first}); {fix}") from None
    problem = vocab_problem(len(tokenizer), vocab_size) if vocab_size else None
    if problem:
        raise DataUnavailable(f"model {model!r}: the tokenizer in {folder} {problem}; {fix}")
    return tokenizer


def check_hub_text_model(model: str, repo_id: str) -> Path:
    """Before any work: ``repo_id``'s snapshot holds config, weights and a tokenizer that fits the model."""
    folder = local_snapshot(model, repo_id, config=True, weights=TRANSFORMERS_WEIGHTS, tokenizer=True)
    checked_tokenizer(model, folder, config_vocab_size(folder), FIX.format(repo=repo_id))
    return folder


def offline_without_network(timeout: float = 3.0) -> bool:
    """Set the Hugging Face offline switches when the Hub cannot be reached (unless the user set them).

    Without them, every dataset and model lookup on a machine with no network spends about 25 s in
    retries before it falls back to the cache; one connection attempt here takes at most ``timeout``.
    Call before the Hugging Face libraries are imported (they read the switches once). True if set.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") is not None:
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return False
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        return True
