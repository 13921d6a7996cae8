"""``ilora eval``: score a finished run's saved model, or an export loaded as its user would, on the run's
test split, after the fact; the number must equal the record's final accuracy.

A run directory is scored with the suite's own model (the backbone rebuilt from the record, the saved
global model loaded into it). An export directory is loaded the way docs/export.md shows (transformers'
``AutoModel`` or EfficientNet-Lite0's network, with ``peft.PeftModel`` for an adapter), its base model
resolved offline as the suite resolves it, and its head applied as ``export.json`` says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ilora.config import RunConfig
from ilora.errors import UserError

EVAL_MODELS = ("minilm", "efficientnet_lite0")  # exports ilora eval can load offline


@dataclass
class Score:
    accuracy: float
    examples: int
    expected: float | None  # what the record says for the same model
    what: str  # the model scored

    @property
    def matches(self) -> bool:
        return self.expected is not None and abs(self.accuracy - self.expected) < 1e-9

    def line(self) -> str:
        text = f"{self.what}: accuracy {self.accuracy:.4f} on {self.examples} test examples"
        if self.expected is None:
            return text + " (the record has no final accuracy to compare with)"
        verdict = "equal" if self.matches else f"differs by {self.accuracy - self.expected:+.2e}"
        return text + f"; the record says {self.expected:.4f}: {verdict}"


def record_config(record: dict[str, Any]) -> RunConfig:
    """The run's resolved config from its record."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), record["config"]))  # type: ignore


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{what} {path} cannot be read: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} is not a JSON object")
    return data


def expected_accuracy(record: dict[str, Any]) -> float | None:
    """The record's accuracy of the saved model: the final accuracy, or for a personalised method (whose saved
    model is client 0's) client 0's accuracy in the last round."""
    if record.get("client0_accuracy") is not None:  # an export.json of a personalised run
        return float(record["client0_accuracy"])
    rounds = record.get("rounds") or []
    if rounds and rounds[-1].get("client_accuracy"):
        return float(rounds[-1]["client_accuracy"][0])
    return record.get("final_accuracy")


def evaluate_path(path: Path) -> Score:
    """Score a run directory (``result.json`` + ``global_model.safetensors``) or an export directory."""
    path = Path(path)
    if (path / "export.json").is_file():
        return evaluate_export(path)
    if (path / "result.json").is_file():
        return evaluate_run(path)
    raise UserError(f"{path} is neither a run directory (result.json) nor an export directory (export.json)")


def evaluate_run(run_dir: Path) -> Score:
    """The run's saved global model, in the suite's own backbone, on the run's test split."""
    from ilora.export import GLOBAL_MODEL, load_global_model
    from ilora.runner import build_parts

    record = _read_json(run_dir / "result.json", "record")
    if not (run_dir / GLOBAL_MODEL).is_file():
        raise UserError(f"{run_dir} holds no {GLOBAL_MODEL} (the run ended {record.get('status')!r}, or was recorded "
                        "before runs saved their final model: rerun it with --force)")
    parts = build_parts(record_config(record))
    sim = parts.simulation(parts.algorithm(), [], parts.test_data())
    accuracy, _ = sim.evaluate(load_global_model(run_dir / GLOBAL_MODEL))
    return Score(accuracy, len(sim.test_data["labels"]), expected_accuracy(record), f"run {record.get('run_id')}")


def _export_record(directory: Path, info: dict[str, Any]) -> dict[str, Any]:
    """The run behind an export: its config in ``export.json``, else the record two levels up (RUN_DIR/export/F)."""
    if info.get("config"):
        return info
    record = directory.parent.parent / "result.json"
    if record.is_file():
        return _read_json(record, "record")
    raise UserError(f"{directory}/export.json names no config and no run directory holds it: export it again "
                    "with ilora export (exports now carry their run's config)")


def load_export(directory: Path, info: dict[str, Any], preprocess: Any = None) -> Any:
    """The exported network, loaded as docs/export.md shows; returns ``features(batch) -> N x F``
    (``preprocess``: the image model's resize and normalisation)."""
    fmt, model = info.get("format"), info.get("model")
    if model not in EVAL_MODELS:
        raise UserError(f"ilora eval loads exports of {', '.join(EVAL_MODELS)} offline; this one is {model!r} "
                        "(score its run directory instead)")
    import peft  # noqa: F401  (an optional extra: fail here, in one line, if absent)
    from peft import PeftModel
    from safetensors.torch import load_file

    if model == "minilm":
        from transformers import AutoModel

        from ilora.models.text import minilm_path

        if fmt == "peft":
            net = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False),
                                            str(directory))
        else:
            net = AutoModel.from_pretrained(str(directory), add_pooling_layer=False)
        net.eval()

        def text_features(batch: dict[str, Tensor]) -> Tensor:
            length = int(batch["attention_mask"].sum(1).max())  # the padding every row shares, as the suite does
            mask = batch["attention_mask"][:, :length]
            hidden = net(input_ids=batch["input_ids"][:, :length], attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

        return text_features
    from ilora.models.vision import efficientnet_lite0_net

    net = efficientnet_lite0_net(info["preprocessing"]["image_size"], pretrained=True)
    if fmt == "peft":
        net = PeftModel.from_pretrained(net, str(directory))
    else:
        net.load_state_dict(load_file(str(directory / "model.safetensors")))
    net.eval()
    return lambda batch: net(preprocess(batch["images"]))


@torch.no_grad()
def evaluate_export(directory: Path) -> Score:
    """An export loaded as its user would, on its run's test split (encoded as the suite encodes it)."""
    from safetensors.torch import load_file

    from ilora.data import DataOptions, load_dataset
    from ilora.models import ModelOptions, build_model

    info = _read_json(directory / "export.json", "export description")
    record = _export_record(directory, info)
    cfg = record_config(record)
    data = load_dataset(cfg.dataset, DataOptions(cfg.split_seed, cfg.max_train_samples, cfg.max_test_samples,
                                                 cfg.data_dir))
    encoder = build_model(cfg.model, ModelOptions(num_classes=data.num_classes, max_length=cfg.max_length,
                                                  image_size=cfg.image_size, lora_targets=cfg.lora_targets,
                                                  pretrained=cfg.pretrained))
    features = load_export(directory, info, getattr(encoder.module, "preprocess", None))
    head = load_file(str(directory / "head.safetensors"))
    test = encoder.encode(data.test)
    n, correct = len(test["labels"]), 0
    for start in range(0, n, cfg.eval_batch_size):
        batch = {k: v[start:start + cfg.eval_batch_size] for k, v in test.items()}
        logits = features(batch) @ head["classifier.weight"].T + head["classifier.bias"]
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return Score(correct / n, n, expected_accuracy(record), f"export {directory} ({info.get('format')})")
