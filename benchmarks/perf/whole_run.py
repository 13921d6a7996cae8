"""A whole ``ilora run`` (in-process) against a bare hand-written loop doing the same steps and evaluations.

Setting: the cpu text cell of ``benchmarks/nlp_dirichlet05.yaml`` (MiniLM-L6 on BBC News, 200 training
articles, the whole test split, 3 clients with ranks 2/4/6, Dirichlet 0.5, batch 16, AdamW 1e-3, 32
tokens) with ``method=fedit`` and fewer rounds (``--rounds``).

- ``ilora``: ``ilora.config.resolve_config`` + ``ilora.runner.run_experiment`` into a fresh temporary
  ``out_dir`` (setup, rounds, results record);
- ``bare``: the same data (the library's loader and partitioner), the same frozen MiniLM with the suite's
  ``LoRALinear`` on query/value, and a plain loop: per client load the FedIT factors, one local epoch of
  AdamW steps in the same batch order and with the same seeds, zero-padded FedAvg, evaluation on the
  test set. Its accuracy is compared with the run's as a check that both did the same work.

Writes ``results/perf/whole_run.md``.

    .venv/bin/python benchmarks/perf/whole_run.py [--quick] [--rounds 2] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import RESULTS, fmt_range, header, load_average, ratio, write_report  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from ilora.config import RunConfig, resolve_config  # noqa: E402
from ilora.lora import LoRALinear, inject_lora, lora_scale  # noqa: E402
from ilora.runner import derive_seeds, run_experiment  # noqa: E402

# The cpu preset's text cell of benchmarks/nlp_dirichlet05.yaml.
SETTING = [
    "preset=cpu", "method=fedit", "dataset=bbc_news", "model=minilm", "num_clients=3", "ranks=[2,4,6]",
    "dirichlet_alpha=0.5", "batch_size=16", "optimizer=adamw", "lr=1e-3", "max_length=32", "max_train_samples=200",
]
Batch = dict[str, Tensor]


@dataclass
class Timing:
    total_s: float  # everything: config to record (ilora) or data + model + loop (bare)
    loop_s: float  # the rounds only
    accuracies: list[float]
    losses: list[float]  # mean test cross-entropy per round


def config(args: argparse.Namespace, out_dir: str) -> RunConfig:
    extra = [f"rounds={args.rounds}", f"threads={args.threads}", f"out_dir={out_dir}", "progress=false"]
    if args.quick:
        extra += ["max_train_samples=64", "max_test_samples=64"]
    return resolve_config(SETTING + extra)


def run_ilora(args: argparse.Namespace) -> Timing:
    with tempfile.TemporaryDirectory(prefix="perf-whole-run-") as out_dir:
        t0 = time.perf_counter()
        record = run_experiment(config(args, out_dir))
        total = time.perf_counter() - t0
    if record["status"] != "ok":
        raise RuntimeError(f"ilora run {record['status']}: {record['error']}")
    rounds = record["rounds"]
    return Timing(total, sum(r["wall_s"] for r in rounds), [r["accuracy"] for r in rounds], [r["loss"] for r in rounds])


# ------------------------------------------------------------------------------------------ the bare loop
def seeded(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


@dataclass
class BareSetup:
    model: nn.Module  # the MiniLM classifier with LoRALinear on query/value
    layers: dict[str, LoRALinear]
    head: dict[str, nn.Parameter]
    clients: list[Batch]
    test: Batch
    seeds: dict[str, int]


def bare_setup(cfg: RunConfig) -> BareSetup:
    """The same data (the library's loader and partitioner), tokenised here, and the same model."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    from ilora.data import DataOptions, load_dataset
    from ilora.data.partition import PartitionSpec, partition
    from ilora.models.text import MeanPoolClassifier, minilm_path

    logging.set_verbosity_error()
    seeds = derive_seeds(cfg.seed)
    data = load_dataset(cfg.dataset, DataOptions(cfg.split_seed, cfg.max_train_samples, cfg.max_test_samples))
    spec = PartitionSpec(cfg.partition, cfg.num_clients, cfg.dirichlet_alpha, cfg.min_partition_size,
                         cfg.classes_per_client, seeds["partition"])
    parts = partition(data.train.labels, spec)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    def encode(texts: list[str], labels: np.ndarray) -> Batch:
        enc = tokenizer(texts, max_length=cfg.max_length, truncation=True, padding="max_length", return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.as_tensor(labels, dtype=torch.long)}

    train = encode(list(data.train.inputs), data.train.labels)
    test = encode(list(data.test.inputs), data.test.labels)
    order = torch.argsort(test["attention_mask"].sum(1), stable=True)  # as the simulator: less padding

    encoder = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    model = MeanPoolClassifier(encoder, encoder.config.hidden_size, data.num_classes, seeds["head"])
    model.backbone_dropout = cfg.backbone_dropout
    layers = inject_lora(model, ["query", "value"], max(cfg.ranks), cfg.lora_alpha, cfg.lora_dropout)
    head = {n: p for n, p in model.named_parameters() if n.startswith("classifier.")}
    for p in head.values():
        p.requires_grad_(True)
    return BareSetup(
        model, layers, head, [{k: v[torch.from_numpy(idx)] for k, v in train.items()} for idx in parts],
        {k: v[order] for k, v in test.items()}, seeds,
    )


def run_bare(args: argparse.Namespace) -> Timing:
    """Setup and a hand-written FedIT loop, with the same seeds as the simulator."""
    t0 = time.perf_counter()
    cfg = config(args, "unused")
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    setup = bare_setup(cfg)
    model, layers, head, seeds = setup.model, setup.layers, setup.head, setup.seeds

    # FedIT's global state: PEFT's init at r_max (A Kaiming-uniform, B zero), seeded as the suite does.
    r_max = max(cfg.ranks)
    A, B = {}, {}
    for i, (name, layer) in enumerate(layers.items()):
        g = torch.Generator().manual_seed(seeded(seeds["algorithm"], 0, i))
        bound = 1.0 / math.sqrt(layer.in_features)
        A[name] = ((torch.rand(r_max, layer.in_features, generator=g, dtype=torch.float64) * 2 - 1) * bound).float()
        B[name] = torch.zeros(layer.out_features, r_max)
    global_head = {n: p.detach().clone() for n, p in head.items()}
    sizes = [len(c["labels"]) for c in setup.clients]
    weights = [s / sum(sizes) for s in sizes]

    loop0 = time.perf_counter()
    accuracies, losses = [], []
    for t in range(cfg.rounds):
        uploads = []
        for cid in range(cfg.num_clients):  # participation 1: every client, in order
            r = cfg.ranks[cid]
            for name, layer in layers.items():
                layer.set_factors(A[name][:r], B[name][:, :r], lora_scale(cfg.lora_alpha, r))
            with torch.no_grad():
                for n, p in head.items():
                    p.copy_(global_head[n])
            params = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)] + list(head.values())
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            torch.manual_seed(seeded(seeds["training"], t, cid))
            perm = torch.from_numpy(np.random.default_rng([seeds["training"], t, cid]).permutation(sizes[cid]))
            model.train()
            for start in range(0, sizes[cid], cfg.batch_size):  # one local epoch
                batch = {k: v[perm[start:start + cfg.batch_size]] for k, v in setup.clients[cid].items()}
                F.cross_entropy(model(batch), batch["labels"]).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            uploads.append((
                {n: layer.lora_A.detach().clone() for n, layer in layers.items()},
                {n: layer.lora_B.detach().clone() for n, layer in layers.items()},
                {n: p.detach().clone() for n, p in head.items()},
            ))
        # zero-padded FedAvg of A and B, weighted by client size; the head averaged
        A = {n: sum(w * F.pad(a[n], (0, 0, 0, r_max - a[n].shape[0])) for w, (a, _, _) in zip(weights, uploads))
             for n in A}
        B = {n: sum(w * F.pad(b[n], (0, r_max - b[n].shape[1])) for w, (_, b, _) in zip(weights, uploads))
             for n in B}
        global_head = {n: sum(w * h[n] for w, (_, _, h) in zip(weights, uploads)) for n in global_head}
        accuracy, loss = evaluate(model, layers, head, A, B, global_head, setup.test, cfg)
        accuracies.append(accuracy)
        losses.append(loss)
    end = time.perf_counter()
    return Timing(end - t0, end - loop0, accuracies, losses)


@torch.no_grad()
def evaluate(model: nn.Module, layers: dict[str, LoRALinear], head: dict[str, Tensor], A: dict[str, Tensor],
             B: dict[str, Tensor], global_head: dict[str, Tensor], test: Batch, cfg: RunConfig) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of the global adapter (rank r_max, scale alpha / r_max) and head."""
    for name, layer in layers.items():
        layer.set_factors(A[name], B[name], lora_scale(cfg.lora_alpha, A[name].shape[0]))
    for n, p in head.items():
        p.copy_(global_head[n])
    model.eval()
    correct, loss_sum = 0, 0.0
    n = len(test["labels"])
    for start in range(0, n, cfg.eval_batch_size):
        batch = {k: v[start:start + cfg.eval_batch_size] for k, v in test.items()}
        logits = model(batch)
        loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / n, loss_sum / n


# ------------------------------------------------------------------------------------------ main
def report(res: dict[str, list[Timing]], args: argparse.Namespace, load: str) -> list[str]:
    cfg = config(args, "<tmp>")
    total = {k: [t.total_s for t in v] for k, v in res.items()}
    loop = {k: [t.loop_s for t in v] for k, v in res.items()}
    a, b = res["ilora"][-1], res["bare"][-1]
    loss_diff = max(abs(x - y) for x, y in zip(a.losses, b.losses))
    lines = header(
        "A whole `ilora run` against a bare hand-written loop",
        "benchmarks/perf/whole_run.py",
        load,
        [f"torch threads: {args.threads}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"],
    )
    lines += [
        "## Method",
        "",
        f"Setting: `{' '.join(SETTING)}`",
        f"`rounds={cfg.rounds}`" + (" `max_train_samples=64 max_test_samples=64` (--quick)" if args.quick else "")
        + f": {cfg.num_clients} clients, one local epoch of batch {cfg.batch_size} each, evaluation of the global",
        "model on the test split after every round.",
        "",
        "- `ilora`: `resolve_config(...)` + `run_experiment(cfg)` in this process, into a fresh temporary",
        "  `out_dir` (data from the suite's caches, model build, simulator, checkpoints, results record);",
        "- `bare`: a hand-written loop with the same data (`ilora.data.load_dataset`, the same partition),",
        "  the same MiniLM classifier with `LoRALinear` on query/value, the same seeds, batch order, AdamW",
        "  steps, zero-padded FedAvg and evaluation batches; tokenised afresh each time (no cache).",
        "",
        f"{'No warm-up (--quick)' if args.quick else 'One untimed warm-up of each'}, then {args.repeats} timed run(s)"
        " of each, interleaved (the order alternates).",
        "`total`: from the config to the end (setup included); `rounds`: the round loop only (for `ilora`,",
        "the sum of the record's `rounds[].wall_s`). Median (min-max) in seconds.",
        "",
        "| | total (s) | rounds (s) |",
        "|---|---:|---:|",
        f"| `ilora run` | {fmt_range(total['ilora'], digits=2)} | {fmt_range(loop['ilora'], digits=2)} |",
        f"| bare loop | {fmt_range(total['bare'], digits=2)} | {fmt_range(loop['bare'], digits=2)} |",
        f"| ratio ilora / bare | **{ratio(total['ilora'], total['bare'])}** | "
        f"**{ratio(loop['ilora'], loop['bare'])}** |",
        "",
        "The check that both did the same work (last timed run of each): test accuracy per round",
        f"`ilora` {[round(x, 4) for x in a.accuracies]}, bare {[round(x, 4) for x in b.accuracies]};",
        f"largest difference of the test loss per round: {loss_diff:.1e}.",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds: 1 round on 64 articles, 1 repeat")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (both)")
    parser.add_argument("--out", type=Path, default=RESULTS / "whole_run.md")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.repeats = 1, 1
    load = load_average()
    runners = {"ilora": run_ilora, "bare": run_bare}
    for fn in runners.values() if not args.quick else ():
        fn(args)  # warm-up: imports, file caches, the suite's encoded-data cache
    res: dict[str, list[Timing]] = {name: [] for name in runners}
    for rep in range(args.repeats):
        for name in (["ilora", "bare"] if rep % 2 == 0 else ["bare", "ilora"]):
            res[name].append(timing := runners[name](args))
            print(f"{name}: total {timing.total_s:.2f} s, rounds {timing.loop_s:.2f} s, "
                  f"accuracy {timing.accuracies}", flush=True)
    write_report(args.out, report(res, args, load))


if __name__ == "__main__":
    main()
