"""Pretrained weights from the local Hugging Face cache only, with one clear line when they are missing."""

from __future__ import annotations

from pathlib import Path

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


def missing(model: str, repo_id: str) -> DataUnavailable:
    return DataUnavailable(
        f"model {model!r} needs the weights of {repo_id}, which are not in the Hugging Face cache "
        f"({hub_cache_dir()}); on a connected machine run `hf download {repo_id}` and copy that cache "
        "here (or point HF_HOME at it)"
    )


def local_snapshot(model: str, repo_id: str) -> Path:
    """The cached snapshot folder of ``repo_id`` (no network); raises ``DataUnavailable`` if absent."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as err:  # the hub raises several types for "not cached"
        raise missing(model, repo_id) from err


def local_weights_file(model: str, repo_id: str) -> Path:
    """The cached weights file (safetensors preferred) of ``repo_id``."""
    folder = local_snapshot(model, repo_id)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise missing(model, repo_id)


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
