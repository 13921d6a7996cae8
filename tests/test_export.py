"""Exported models equal the suite's evaluated model: every method, MiniLM and EfficientNet-Lite0.

Each case trains a tiny federated run, exports its final global model as a PEFT adapter and as merged
weights (``ilora.export.export_run``, what ``ilora export`` calls), loads them the way a user would
(transformers' ``AutoModel`` and ``peft.PeftModel.from_pretrained`` for MiniLM; the EfficientNet-Lite0
base network and ``PeftModel`` for the image model) and compares logits on a test batch to 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ilora.algorithm import available_algorithms
from ilora.config import resolve_config
from ilora.errors import UserError
from ilora.export import GLOBAL_MODEL, dense_update, export_run, load_global_model, lora_factors, save_global_model
from ilora.runner import run_experiment, setup
from ilora.simulation import load_client_model

peft = pytest.importorskip("peft")

TOL = {"atol": 1e-5, "rtol": 1e-5}
SETTINGS = {
    "minilm": ["dataset=bbc_news", "model=minilm", "max_length=24"],
    "efficientnet_lite0": ["dataset=digits", "model=efficientnet_lite0", "image_size=32"],
}


def tiny_run(tmp_path: Path, method: str, model: str) -> tuple[Path, torch.Tensor, dict]:
    """Train a 2-round run; return its directory, the evaluated model's logits on a test batch, the batch."""
    cfg = resolve_config([
        "preset=smoke", f"method={method}", *SETTINGS[model], "rounds=2", "local_steps=2", "batch_size=8",
        "max_train_samples=90", "max_test_samples=8", "min_partition_size=2", "lr=0.01", "threads=1",
        f"out_dir={tmp_path}",
    ])
    built = {}

    def keep(c):
        built["sim"], facts = setup(c)
        return built["sim"], facts

    record = run_experiment(cfg, build=keep)
    assert record["status"] == "ok", record.get("error")
    sim = built["sim"]
    load_client_model(sim.backbone, sim.algorithm.eval_model())
    sim.backbone.module.eval()
    batch = sim.test_data
    with torch.no_grad():
        logits = sim.backbone(batch)
    return tmp_path / record["run_id"], logits, batch


def exported_logits(directory: Path, fmt: str, model: str, batch: dict, preprocess) -> torch.Tensor:
    """Load an export as its user would and classify ``batch``."""
    head = load_file(str(directory / "head.safetensors"))
    if model == "minilm":
        from transformers import AutoModel

        from ilora.models.text import minilm_path

        if fmt == "peft":
            net = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False),
                                                 str(directory))
        else:
            net = AutoModel.from_pretrained(str(directory), add_pooling_layer=False)
        net.eval()
        mask = batch["attention_mask"]
        with torch.no_grad():
            hidden = net(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        features = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    else:
        from ilora.models.vision import efficientnet_lite0_net

        info = json.loads((directory / "export.json").read_text())
        net = efficientnet_lite0_net(info["preprocessing"]["image_size"], pretrained=True)
        if fmt == "peft":
            net = peft.PeftModel.from_pretrained(net, str(directory))
        else:
            net.load_state_dict(load_file(str(directory / "model.safetensors")))
        net.eval()
        with torch.no_grad():
            features = net(preprocess(batch["images"]))
    return features @ head["classifier.weight"].T + head["classifier.bias"]


@pytest.mark.parametrize("model", list(SETTINGS))
@pytest.mark.parametrize("method", available_algorithms())
def test_exported_model_gives_the_evaluated_logits(tmp_path, method, model):
    run_dir, expected, batch = tiny_run(tmp_path, method, model)
    preprocess = None
    if model == "efficientnet_lite0":
        from ilora.models import ModelOptions, build_model

        preprocess = build_model(model, ModelOptions(num_classes=10, image_size=32)).module.preprocess
    for fmt in ("peft", "merged"):
        directory = export_run(run_dir, fmt)[0].parent
        assert directory == run_dir / "export" / fmt
        got = exported_logits(directory, fmt, model, batch, preprocess)
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m, fmt=fmt: f"{method} {fmt}: {m}")


def test_peft_adapter_files_describe_a_plain_lora(tmp_path):
    """ILoRA's offset is folded in: rank r + r0 per layer, scaling 1, the target names of the base model."""
    run_dir, _, _ = tiny_run(tmp_path, "ilora", "minilm")
    directory = export_run(run_dir, "peft", tmp_path / "adapter")[0].parent
    config = json.loads((directory / "adapter_config.json").read_text())
    state = load_file(str(directory / "adapter_model.safetensors"))
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "encoder.layer.0.attention.self.query" in config["target_modules"]
    a = state["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"]
    assert a.shape == (6 + 6, 384)  # r_max = 6 adapter rows plus the 6 rows of the frozen QR offset
    assert config["lora_alpha"] == config["r"] == 12
    info = json.loads((directory / "export.json").read_text())
    assert info["method"] == "ilora" and info["format"] == "peft" and info["run_id"] == run_dir.name


def test_dense_update_becomes_an_exact_lora_of_its_numerical_rank():
    from ilora.algorithm import ClientModel

    g = torch.Generator().manual_seed(0)
    low = torch.randn(30, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 20, generator=g, dtype=torch.float64)
    model = ClientModel(A={"w": torch.zeros(1, 20)}, B={"w": torch.zeros(30, 1)}, head={}, scale=0.0,
                        base_delta={"w": low.float()})
    B, A = lora_factors(model, "w")
    assert A.shape[0] == 5  # the numerical rank, not min(d, k) = 20 (float32 rounding of the rank-5 matrix dropped)
    stored = low.float().double()  # the update as the model holds it (float32)
    torch.testing.assert_close(dense_update(model, "w"), stored, rtol=0, atol=0)
    torch.testing.assert_close(B @ A, stored, atol=1e-6 * float(stored.abs().max()), rtol=0)


def test_saved_global_model_round_trips(tmp_path):
    from ilora.algorithm import ClientModel

    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    model = ClientModel(A={"x": r(3, 4)}, B={"x": r(5, 3)}, head={"h": r(2)}, scale=0.25,
                        offsets={"x": (r(2, 4), r(5, 2), 1.5)}, base_delta={"x": r(5, 4)}, R={"x": r(3, 3)})
    loaded = load_global_model(save_global_model(tmp_path / GLOBAL_MODEL, model, "x"))
    assert loaded.scale == 0.25 and loaded.offsets["x"][2] == 1.5
    torch.testing.assert_close(dense_update(loaded, "x"), dense_update(model, "x"), atol=0, rtol=0)


def test_export_of_a_directory_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no result.json"):
        export_run(tmp_path, "peft")
    (tmp_path / "result.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(UserError, match=f"no {GLOBAL_MODEL}"):
        export_run(tmp_path, "peft")
    with pytest.raises(UserError, match="valid: peft, merged"):
        export_run(tmp_path, "onnx")
