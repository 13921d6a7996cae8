"""Incomplete Hugging Face snapshots of the paper's models end in one line before any work; the paper
preset runs the paper's checkpoints. Every cache here is simulated: tiny files under ``tmp_path``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ilora.cli import main
from ilora.data import Split
from ilora.errors import DataUnavailable
from ilora.models import ModelOptions, available_models, build_model, check_model_files
from ilora.models.hub import HUB_REPOS, vocab_problem

ROBERTA = HUB_REPOS["roberta_base"]
# A byte-level BPE vocabulary of 12 tokens (RoBERTa's five special tokens first) and its merges.
TINY_VOCAB = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "a", "b", "c", "\u0120", "\u0120a", "ab", "\u0120ab"]
TINY_MERGES = "#version: 0.2\n\u0120 a\na b\n\u0120a b\n"


@pytest.fixture(autouse=True)
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache and ilora cache under ``tmp_path``, one torch thread."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("ILORA_CACHE", str(tmp_path / "ilora_cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path / "hub"
    torch.set_num_threads(threads)


def snapshot(cache: Path, repo_id: str) -> Path:
    """The on-disk layout of a cached hub repository (``refs/main`` -> ``snapshots/<commit>``)."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text("0" * 40)
    path = folder / "snapshots" / ("0" * 40)
    path.mkdir(parents=True, exist_ok=True)
    return path


def tiny_roberta(folder: Path, vocab_size: int) -> None:
    """A 2-layer, 32-wide RoBERTa (masked LM, as roberta-base) saved as config.json + model.safetensors."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=80, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    RobertaForMaskedLM(config).save_pretrained(str(folder))  # as the real checkpoint: no classifier


def tiny_tokenizer(folder: Path) -> None:
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(TINY_VOCAB)}))
    (folder / "merges.txt").write_text(TINY_MERGES)


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    return err


# ----------------------------------------------------------------------------- tokenizer


def test_roberta_snapshot_without_tokenizer_files_is_one_line(hub_cache: Path):
    folder = snapshot(hub_cache, ROBERTA)
    tiny_roberta(folder, vocab_size=1000)  # weights and config, no tokenizer files
    with pytest.raises(DataUnavailable) as err:
        build_model("roberta_base", ModelOptions(num_classes=3))
    message = str(err.value)
    assert "\n" not in message and "'roberta_base'" in message and str(folder) in message
    assert "no tokenizer files" in message and "vocab.json + merges.txt" in message
    assert f"hf download {ROBERTA}" in message


def test_run_with_an_incomplete_roberta_snapshot_stops_before_any_work(hub_cache: Path, tmp_path: Path, capsys):
    tiny_roberta(snapshot(hub_cache, ROBERTA), vocab_size=1000)
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "runs"
    # before the fix this trained on "<s></s>" for every text and exited 0
    assert main(["run", "preset=smoke", "dataset=bbc_news", "model=roberta_base", f"out_dir={out}"]) == 2
    err = one_line_error(capsys)
    assert "'roberta_base'" in err and "no tokenizer files" in err and f"hf download {ROBERTA}" in err
    assert not out.exists() or not any(out.rglob("result.json"))
    # the model is checked before the data: a missing dataset does not hide the model's problem
    assert main(["run", "preset=smoke", "dataset=sst2", "model=roberta_base", f"out_dir={out}"]) == 2
    assert "no tokenizer files" in one_line_error(capsys)


def test_tokenizer_far_below_the_models_vocabulary_is_refused(hub_cache: Path):
    folder = snapshot(hub_cache, ROBERTA)
    tiny_roberta(folder, vocab_size=1000)
    tiny_tokenizer(folder)  # 12 tokens for 1,000 embedding rows: another model's tokenizer
    with pytest.raises(DataUnavailable) as err:
        check_model_files("roberta_base")
    message = str(err.value)
    assert "\n" not in message and "12 tokens" in message and "vocab_size 1000" in message
    assert str(folder) in message and f"hf download {ROBERTA}" in message
    with pytest.raises(DataUnavailable, match="far below"):
        build_model("roberta_base", ModelOptions(num_classes=3))


def test_a_complete_roberta_snapshot_builds_and_encodes(hub_cache: Path):
    folder = snapshot(hub_cache, ROBERTA)
    tiny_roberta(folder, vocab_size=len(TINY_VOCAB))
    tiny_tokenizer(folder)
    check_model_files("roberta_base")
    backbone = build_model("roberta_base", ModelOptions(num_classes=3, rank=2, max_length=8))
    batch = backbone.encode(Split(["ab ab", "c a"], np.array([0, 2])))
    assert batch["input_ids"][0, :4].tolist() == [0, 10, 11, 2]  # <s> ab Ġab </s>: real tokens
    assert backbone(batch).shape == (2, 3)


@pytest.mark.parametrize("tokens, vocab, problem", [
    (50265, 50265, None), (30522, 30522, None), (50000, 50265, None),
    (5, 50265, "far below"), (40000, 50265, "far below"), (50266, 50265, "more than"),
])
def test_vocab_problem(tokens: int, vocab: int, problem: str | None):
    found = vocab_problem(tokens, vocab)
    assert (found is None) if problem is None else (problem in found)


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name", ["hf_vit_base", "hf_swin_base", "roberta_base"])
def test_transformers_snapshot_with_config_but_no_weights_is_one_line(name: str, hub_cache: Path):
    folder = snapshot(hub_cache, HUB_REPOS[name])
    (folder / "config.json").write_text(json.dumps({"model_type": name.split("_")[1]}))
    tiny_tokenizer(folder)
    for attempt in (lambda: check_model_files(name), lambda: build_model(name, ModelOptions(num_classes=3))):
        with pytest.raises(DataUnavailable) as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message and repr(name) in message and str(folder) in message
        assert "has no weights (model.safetensors" in message and f"hf download {HUB_REPOS[name]}" in message


def test_run_on_a_snapshot_without_weights_exits_2_with_one_line(hub_cache: Path, tmp_path: Path, capsys):
    folder = snapshot(hub_cache, HUB_REPOS["hf_vit_base"])
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    # before the fix: transformers' multi-line OSError, a traceback and exit 1
    assert main(["run", "preset=smoke", "dataset=digits", "model=hf_vit_base", f"out_dir={tmp_path / 'runs'}"]) == 2
    err = one_line_error(capsys)
    assert "'hf_vit_base'" in err and "has no weights" in err and "hf download google/vit-base-patch16-224" in err


def test_sharded_weights_need_every_shard(hub_cache: Path):
    folder = snapshot(hub_cache, HUB_REPOS["hf_swin_base"])
    (folder / "config.json").write_text(json.dumps({"model_type": "swin"}))
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(DataUnavailable, match="has no weights"):
        check_model_files("hf_swin_base")
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"x")
    check_model_files("hf_swin_base")  # the files are there (whether they load is the loader's business)


@pytest.mark.parametrize("name", ["vit_base", "swin_base"])
def test_timm_snapshot_without_weights_names_the_snapshot(name: str, hub_cache: Path):
    folder = snapshot(hub_cache, HUB_REPOS[name])
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")  # a zero-byte file is not a weights file
    with pytest.raises(DataUnavailable) as err:
        check_model_files(name)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message and "has no weights" in message
    assert "open_clip_pytorch_model.bin" in message and f"hf download {HUB_REPOS[name]}" in message


def test_every_hub_model_is_checked_before_any_work(hub_cache: Path):
    for name, (_, offline) in available_models().items():
        if offline:
            continue
        with pytest.raises(DataUnavailable, match=f"hf download {HUB_REPOS[name]}"):
            check_model_files(name)


# ----------------------------------------------------------------------------- the paper preset's checkpoints


def test_paper_preset_runs_the_authors_checkpoints():
    from ilora.benchmark import available_benchmarks, resolve_benchmarks

    models: set[str] = set()
    for bench in resolve_benchmarks(available_benchmarks()):
        if not bench.runs_at("paper"):
            continue
        chosen = {bench.base("paper").get("model")}  # the model of every cell: the base's or an axis value's
        for axis in bench.axes("paper"):
            chosen |= {values["model"] for values in axis.values.values() if "model" in values}
        chosen.discard(None)
        assert chosen, f"{bench.name}: its paper grid names no model"
        models |= chosen
        for known in bench.known_for("paper"):
            assert known["cell"].get("model", next(iter(chosen))) in chosen, (bench.name, known)
    assert models == {"hf_vit_base", "hf_swin_base", "roberta_base"}
    assert HUB_REPOS["hf_vit_base"] == "google/vit-base-patch16-224"
    assert HUB_REPOS["hf_swin_base"] == "microsoft/swin-base-patch4-window7-224"
    assert "vit_base" in available_models()  # timm's AugReg2 ViT stays a model one can name
