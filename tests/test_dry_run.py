"""Dry runs at full size (``pretrained=false``): the paper's backbones with random weights and no cached files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ilora.config import config_hash, resolve_config
from ilora.data.base import Split
from ilora.models import check_model_files
from ilora.models.text import stand_in_tokenize_fn
from ilora.runner import run_experiment


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache: whatever this machine has cached, nothing can be read from it."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("ILORA_CACHE", str(tmp_path / "ilora_cache"))
    return cache


def test_pretrained_key_keeps_run_ids() -> None:
    """``pretrained=true`` (the default) leaves a run's identity as it was; ``false`` is another run."""
    assert resolve_config(["pretrained=true"]).pretrained
    base = config_hash(resolve_config([]))
    assert config_hash(resolve_config(["pretrained=true"])) == base
    assert config_hash(resolve_config(["pretrained=false"])) != base


@pytest.mark.parametrize("model", ["hf_vit_base", "hf_swin_base", "vit_base", "swin_base", "roberta_base"])
def test_dry_run_needs_no_cached_files(model: str, empty_hub_cache: Path) -> None:
    from ilora.errors import DataUnavailable

    with pytest.raises(DataUnavailable):
        check_model_files(model)
    check_model_files(model, pretrained=False)


def test_stand_in_tokenizer_fits_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    encode = stand_in_tokenize_fn("roberta_base", 16, vocab_size=50265, pad_id=1)
    assert "its tokenizer is not cached" in capsys.readouterr().err
    batch = encode(Split(["a short text", "another, somewhat longer text than the first one"], np.array([0, 1])))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, 16) and int(ids.max()) < 50265
    assert bool((ids[mask == 0] == 1).all()) and batch["labels"].tolist() == [0, 1]


# name -> (a paper dataset, as a fixture in the Hub's own format; its backbone's parameter count: ViT-B/16,
# Swin-B and RoBERTa-base without their heads). Tiny-ImageNet's fixture holds grayscale images at 64 px, CIFAR-100's
# RGB images at 32 px, QNLI's sentence pairs: the loaders and the resizing to 224 px are those of the paper runs.
FULL_SIZE = {
    "hf_vit_base": ("tiny_imagenet", 85.8e6),
    "hf_swin_base": ("cifar100", 86.7e6),
    "roberta_base": ("qnli", 124.6e6),
}


@pytest.mark.slow
@pytest.mark.parametrize("model", list(FULL_SIZE))
def test_full_size_dry_run(model: str, tmp_path: Path, empty_hub_cache: Path) -> None:
    """One round of two local steps at full size on CPU (batch 2, 224 px / 64 tokens), the paper preset's path,
    on a paper dataset in the Hub's format."""
    from test_data import write_fixture

    dataset, size = FULL_SIZE[model]
    data_dir = write_fixture(dataset, tmp_path, "disk")
    cfg = resolve_config([
        "preset=paper", f"model={model}", f"dataset={dataset}", "pretrained=false", "rounds=1", "local_steps=2",
        "batch_size=2", "eval_batch_size=4", "max_length=64", "max_train_samples=9", "max_test_samples=4",
        "partition=iid", "device=cpu", "progress=false", f"data_dir={data_dir}", f"out_dir={tmp_path / 'runs'}",
    ])
    record = run_experiment(cfg)
    assert record["status"] == "ok", record["error"]
    assert record["pretrained"] is False and record["config"]["pretrained"] is False
    assert len(record["rounds"]) == 1 and record["rounds"][0]["round"] == 1
    assert abs(record["backbone_parameters"] - size) / size < 0.02
    assert not list(empty_hub_cache.iterdir())  # nothing was downloaded or cached
