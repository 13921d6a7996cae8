"""One LoRA training step (forward + backward + AdamW step): the suite's layers vs PEFT vs the frozen floor.

For each backbone (MiniLM-L6 with LoRA on attention query/value, 32 tokens; EfficientNet-Lite0 with LoRA
on the expansion and projection 1x1 convolutions, 32x32 images), batch 32, rank 6, alpha 16, dropout 0.1:

- ``ours``: ``ilora.lora.inject_lora`` / ``inject_conv1x1_lora`` (``LoRALinear`` / ``LoRAConv1x1``);
- ``peft``: ``peft.get_peft_model(model, LoraConfig(target_modules=...))`` on the same frozen model;
- ``floor``: the same frozen model without LoRA; only the head trains, and the first module's output
  is made to require grad so that backward still runs through every layer (input gradients only).

The three variants share the pretrained weights, the head's initialisation and the batch; they are timed
interleaved (the order rotates every repeat). Writes ``results/perf/lora_step.md``.

    .venv/bin/python benchmarks/perf/lora_step.py [--quick] [--threads 1] [--repeats 10] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import RESULTS, fmt_range, header, load_average, ratio, stats, write_report  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from ilora.lora import inject_conv1x1_lora, inject_lora  # noqa: E402

VARIANTS = ("ours", "peft", "floor")
RANK, ALPHA, DROPOUT, BATCH = 6, 16.0, 0.1, 32
TEXT_TARGETS = ["query", "value"]
TEXT_TOKENS = 32
IMAGE_SIZE = 32
Batch = dict[str, Tensor]


# ------------------------------------------------------------------------------------------ models
def minilm_base(seed: int) -> nn.Module:
    """The suite's MiniLM classifier (mean pooling + linear head, 5 classes) before LoRA is injected."""
    from transformers import AutoModel
    from transformers.utils import logging

    from ilora.models.text import MeanPoolClassifier, minilm_path

    logging.set_verbosity_error()
    encoder = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    return MeanPoolClassifier(encoder, encoder.config.hidden_size, 5, seed)


def effnet_base(seed: int) -> nn.Module:
    """The suite's EfficientNet-Lite0 classifier (ImageNet weights, 10 classes, 32 px) before LoRA."""
    from ilora.models.vision import LITE_MEAN, LITE_STD, ImageClassifier, efficientnet_lite0_net

    return ImageClassifier(efficientnet_lite0_net(IMAGE_SIZE, True), 1280, 10, seed, IMAGE_SIZE, LITE_MEAN, LITE_STD)


def effnet_targets() -> list[str]:
    from ilora.models.vision import EFFICIENTNET_TARGETS

    return EFFICIENTNET_TARGETS["expand_project"]


def first_module(model: nn.Module, kind: str) -> nn.Module:
    """Where the floor's backward starts: the text embeddings' output, or the image stem convolution's."""
    return model.encoder.embeddings if kind == "minilm" else model.features._conv_stem


def build(kind: str, variant: str, seed: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """A model in training mode (backbone dropout on, as the suite's runs) and its trainable parameters."""
    model = minilm_base(seed) if kind == "minilm" else effnet_base(seed)
    model.backbone_dropout = True
    targets = TEXT_TARGETS if kind == "minilm" else effnet_targets()
    if variant == "ours":
        inject = inject_lora if kind == "minilm" else inject_conv1x1_lora
        inject(model, targets, RANK, ALPHA, DROPOUT)
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=targets)
        model = get_peft_model(model, config)
    else:
        model.requires_grad_(False)
        first_module(model, kind).register_forward_hook(lambda _m, _i, out: out.requires_grad_())
    head = model.get_submodule("base_model.model.classifier" if variant == "peft" else "classifier")
    head.requires_grad_(True)
    if kind != "minilm":
        model.to(memory_format=torch.channels_last)  # as the suite's builder does
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def make_batch(kind: str, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    if kind == "minilm":
        return {
            "input_ids": torch.randint(1000, 30000, (BATCH, TEXT_TOKENS), generator=g),
            "attention_mask": torch.ones(BATCH, TEXT_TOKENS, dtype=torch.long),
            "labels": torch.randint(0, 5, (BATCH,), generator=g),
        }
    return {
        "images": torch.randint(0, 256, (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE), generator=g, dtype=torch.uint8),
        "labels": torch.randint(0, 10, (BATCH,), generator=g),
    }


# ------------------------------------------------------------------------------------------ checks
@torch.no_grad()
def equivalence(ours: nn.Module, peft_model: nn.Module, batch: Batch, seed: int) -> float:
    """Give both LoRA models the same random nonzero factors; max |logits difference| in eval mode."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(peft_model.named_modules())
    for name, layer in ours.named_modules():
        if not hasattr(layer, "lora_A"):
            continue
        A = torch.randn(layer.lora_A.shape, generator=g) * 0.05
        B = torch.randn(layer.lora_B.shape, generator=g) * 0.05
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        target = modules[f"base_model.model.{name}"]
        wa, wb = target.lora_A["default"].weight, target.lora_B["default"].weight
        wa.copy_(A.view(wa.shape))
        wb.copy_(B.view(wb.shape))
    ours.eval()
    peft_model.eval()
    diff = float((ours(batch) - peft_model(batch)).abs().max())
    ours.train()
    peft_model.train()
    return diff


# ------------------------------------------------------------------------------------------ timing
def train_step(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer) -> None:
    loss = F.cross_entropy(model(batch), batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench(kind: str, args: argparse.Namespace) -> dict:
    """Per-step seconds of every variant (one sample = the mean over ``args.steps`` consecutive steps)."""
    batch = make_batch(kind, args.seed)
    models = {v: build(kind, v, args.seed) for v in VARIANTS}
    diff = equivalence(models["ours"][0], models["peft"][0], batch, args.seed)
    optimizers = {v: torch.optim.AdamW(params, lr=1e-4) for v, (_, params) in models.items()}
    steps: dict[str, Callable[[], None]] = {
        v: (lambda v=v: train_step(models[v][0], batch, optimizers[v])) for v in VARIANTS
    }
    for v in VARIANTS:  # warm-up: allocator, AdamW state, lazy initialisation
        for _ in range(args.warmup):
            steps[v]()
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(args.repeats):
        for v in VARIANTS[rep % 3:] + VARIANTS[:rep % 3]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[v]()
            samples[v].append((time.perf_counter() - t0) / args.steps)
    trainable = {v: sum(p.numel() for p in params) for v, (_, params) in models.items()}
    return {"samples": samples, "trainable": trainable, "diff": diff}


# ------------------------------------------------------------------------------------------ report
TITLES = {
    "minilm": f"MiniLM-L6, LoRA on query/value, {TEXT_TOKENS} tokens",
    "efficientnet_lite0": f"EfficientNet-Lite0, LoRA on the 1x1 expand/project convs, {IMAGE_SIZE}x{IMAGE_SIZE} px",
}


def report(results: dict[str, dict], args: argparse.Namespace, load: str) -> list[str]:
    lines = header(
        "LoRA training step: the suite's layers vs PEFT vs the frozen-backward floor",
        "benchmarks/perf/lora_step.py",
        load,
        [f"torch threads: {args.threads}; batch {BATCH}, rank {RANK}, alpha {ALPHA:g}, LoRA dropout {DROPOUT}, "
         f"AdamW; backbone dropout on (training mode, as in the suite's runs)"],
    )
    lines += [
        "## Method",
        "",
        "One step is forward + cross-entropy + backward + `AdamW.step()` + `zero_grad`, on one fixed random",
        f"batch of {BATCH}. Variants, built from the same pretrained weights and head initialisation:",
        "",
        "- `ours`: the suite's `LoRALinear` (MiniLM) / `LoRAConv1x1` (EfficientNet) via `ilora.lora.inject_*`;",
        "- `peft`: `peft.get_peft_model(model, LoraConfig(r, lora_alpha, lora_dropout, target_modules))`, head",
        "  made trainable by hand. EfficientNet's package builds its convolutions as `Conv2dStaticSamePadding`,",
        "  a subclass of `nn.Conv2d` that PEFT cannot instantiate for its own LoRA convolutions (its",
        "  constructor asserts an `image_size`); the suite's builder (`efficientnet_lite0_net`) makes every",
        "  1x1, stride-1 convolution a plain `nn.Conv2d` with the same weights (no padding, same output);",
        "- `floor`: the frozen model without LoRA; only the head trains. A forward hook makes the output of",
        "  the first module (MiniLM: the embeddings; EfficientNet: the stem convolution) require grad, so",
        "  backward runs through every layer computing input gradients, but no weight gradients. This is",
        "  what any LoRA on every block must pay at least; `above floor` is the step's extra cost.",
        "",
        f"Each sample is the mean of {args.steps} consecutive steps; {args.repeats} samples per variant, the",
        f"variants interleaved (order rotating every repeat) after {args.warmup} warm-up steps each. Reported:",
        "median (min-max) in ms. The `ours` and `peft` models are checked to compute the same function:",
        "both get the same random nonzero factors and their logits are compared in eval mode.",
        "",
    ]
    for kind, res in results.items():
        s = res["samples"]
        floor = stats(s["floor"])[0]
        lines += [
            f"## {TITLES[kind]}",
            "",
            "| variant | trainable params | step (ms) | above floor (ms) | vs floor |",
            "|---|---:|---:|---:|---:|",
        ]
        for v in VARIANTS:
            lines.append(
                f"| `{v}` | {res['trainable'][v]:,} | {fmt_range(s[v], 1e3)} | "
                f"{1e3 * (stats(s[v])[0] - floor):.1f} | {ratio(s[v], s['floor'])} |"
            )
        lines += [
            "",
            f"- `ours` / `peft` (median step): **{ratio(s['ours'], s['peft'])}**",
            f"- max |logits difference| `ours` vs `peft` with the same factors: {res['diff']:.1e}",
            "",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: 2 repeats of 1 step")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=10, help="timed samples per variant")
    parser.add_argument("--steps", type=int, default=5, help="steps per sample")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--models", nargs="+", default=["minilm", "efficientnet_lite0"], choices=list(TITLES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "lora_step.md")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.warmup = 2, 1, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load = load_average()
    results = {}
    for kind in args.models:
        results[kind] = res = bench(kind, args)
        summary = ", ".join(f"{v} {fmt_range(res['samples'][v], 1e3)} ms" for v in VARIANTS)
        print(f"{kind}: {summary}; ours/peft {ratio(res['samples']['ours'], res['samples']['peft'])}", flush=True)
    write_report(args.out, report(results, args, load))


if __name__ == "__main__":
    main()
