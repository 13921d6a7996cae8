"""The GPU check: the paper's models at full size on one GPU, a slice of the stand-in grid, projections.

1. One paper-shaped cell per paper model (``hf_vit_base``, ``hf_swin_base``, ``roberta_base``) at full size
   with random weights (``pretrained=false``: no cache needed), built by the suite's own builders: the
   paper preset's batch (64), 224 px images / 64 tokens, rank 6, synthetic inputs in the hub format (uint8
   images, texts through the model's tokenizer or the dry run's stand-in). ``--steps`` training steps as
   the simulation makes them (bf16 autocast on CUDA, cross-entropy, backward, AdamW), after ``--warmup``
   untimed ones, with ``torch.cuda.synchronize``; examples per second and the peak GPU memory.
2. A slice of the stand-in grid (``ilora sweep all`` at the cpu preset, ``device=cuda``): ``--slice`` runs
   spread over the grid, ``--jobs`` at a time in the sweep's process pool sharing the GPU; its wall time.
3. Projections: the paper grid's GPU hours (every run of ``ilora sweep all --preset paper --plan``: its
   training steps from the datasets' sizes, ``ilora.sweep.planned_steps``, times its model's measured step
   time; evaluation not counted) and the stand-in grid's wall time on this GPU (the slice's wall time per
   run, ``--jobs`` at a time, times the grid's runs).

Writes ``results/perf/gpu.md`` and ``results/perf/gpu.json`` (the step times ``ilora sweep --preset paper
--plan`` reads). Exits 2 when no CUDA GPU is visible. ``--device cpu --tiny`` runs the same code on CPU at
batch 2 for two steps and a one-run slice cut to one local step: a test of the script, not a measurement
(written to a scratch folder unless ``--out`` says where).

    .venv/bin/python benchmarks/perf/gpu_check.py [--steps 30] [--slice 4] [--jobs 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
importlib.import_module("ilora")  # before torch: the suite's OpenMP wait settings, as in every run

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import RESULTS, header, load_average, write_report  # noqa: E402

PAPER_MODELS = {"hf_vit_base": "image", "hf_swin_base": "image", "roberta_base": "text"}
NUM_CLASSES = 100  # a cifar100-sized head (the head's size hardly matters next to the backbone)
RANK = 6  # the largest of the paper's ranks {2, 4, 6}
# A stand-in run cut to one local step on a few examples (--tiny).
TINY_RUN = ["rounds=1", "local_steps=1", "max_test_samples=20", "eval_batch_size=20", "divergence_at_chance=false"]


@dataclass
class StepTime:
    """One model's measured training step."""

    model: str
    batch_size: int
    steps: int
    step_s: float  # median seconds of one step
    examples_per_s: float
    peak_memory_gib: float | None  # torch.cuda.max_memory_allocated (None on CPU)
    backbone_parameters: int
    trainable_parameters: int


def synthetic_batch(model: str, kind: str, batch_size: int, image_size: int, rng: np.random.Generator) -> dict:
    """A batch in the hub format encoded by the model's own ``encode``: uint8 RGB images, or texts."""
    from ilora.data.base import Split

    labels = rng.integers(0, NUM_CLASSES, batch_size)
    if kind == "image":
        inputs = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    else:
        words = ["market", "league", "vote", "film", "energy", "court", "player", "bank", "music", "phone"]
        inputs = [" ".join(rng.choice(words, 80)) for _ in range(batch_size)]  # longer than max_length
    return Split(inputs, labels)


def time_model(model: str, batch_size: int, steps: int, warmup: int, device: torch.device,
               max_length: int = 64) -> StepTime:
    """Median time of a LoRA training step of ``model`` at full size with random weights."""
    from ilora.config import RunConfig
    from ilora.models import ModelOptions, build_model
    from ilora.simulation import make_optimizer

    kind = PAPER_MODELS[model]
    options = ModelOptions(num_classes=NUM_CLASSES, rank=RANK, max_length=max_length, pretrained=False)
    backbone = build_model(model, options).to(device)
    module = backbone.module
    module.backbone_dropout = True  # as the paper preset trains (the run key backbone_dropout)
    module.train()
    image_size = int(getattr(module, "image_size", 224) or 224)
    rng = np.random.default_rng(0)
    batch = {k: v.to(device) for k, v in backbone.encode(synthetic_batch(model, kind, batch_size, image_size,
                                                                         rng)).items()}
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(RunConfig(optimizer="adamw", lr=1e-4), trainable)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(backbone(batch).float(), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return StepTime(model, batch_size, steps, step_s, batch_size / step_s, peak, frozen,
                    sum(p.numel() for p in trainable))


def stand_in_slice(names: list[str], n: int, jobs: int, device: str, tiny: bool) -> tuple[int, int, float, int]:
    """Run ``n`` runs spread over the stand-in grid, ``jobs`` at a time on ``device``, in a scratch folder.

    Returns (grid runs, slice runs, wall seconds, failed runs).
    """
    from ilora.benchmark import plan, resolve_benchmarks
    from ilora.sweep import run_sweep

    benches = resolve_benchmarks(names)
    with tempfile.TemporaryDirectory(prefix="ilora-gpu-check-") as out:
        overrides = [f"device={device}", "progress=false", *(TINY_RUN if tiny else [])]
        runs = plan(benches, "cpu", overrides, out)
        picked = [runs[i * len(runs) // n] for i in range(min(n, len(runs)))]
        if not picked:
            return 0, 0, 0.0, 0
        summary = run_sweep(picked, jobs=jobs, progress=False, log=lambda line: print(line, file=sys.stderr))
    return len(runs), len(picked), summary.seconds, len(summary.failed) + len(summary.diverged)


def duration(hours: float) -> str:
    """``12.3 h``, or minutes below an hour."""
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"


def gpu_facts(device: torch.device) -> list[str]:
    """The device's name, driver / CUDA / cuDNN versions (or the CPU's, for a CPU test)."""
    if device.type != "cuda":
        from common import cpu_model

        return [f"device: CPU ({cpu_model()}), a test of the script, not a measurement"]
    props = torch.cuda.get_device_properties(device)
    try:
        import subprocess

        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = "unknown"
    return [f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible",
            f"driver {driver}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --tiny: a test of the script)")
    parser.add_argument("--tiny", action="store_true", help="batch 2, two steps, a one-run slice cut to one step")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=64, help="the paper preset's batch")
    parser.add_argument("--slice", type=int, default=4, help="stand-in grid runs to run (0: none)")
    parser.add_argument("--jobs", type=int, default=4, help="stand-in runs sharing the GPU at once")
    parser.add_argument("--models", nargs="+", default=list(PAPER_MODELS), choices=list(PAPER_MODELS))
    parser.add_argument("--benchmarks", nargs="+", default=["all"],
                        help="the grids projected and sliced (default: all, as `ilora sweep all`)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of gpu.md and gpu.json (default results/perf; with --tiny a scratch folder)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU (none visible); `--device cpu --tiny` tests the script on CPU",
              file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.tiny:
        print("gpu-check measures a GPU: on CPU only `--tiny` (a test of the script) runs", file=sys.stderr)
        return 2
    if args.tiny:
        args.steps, args.warmup, args.batch_size = 2, 1, 2
        args.slice, args.jobs = min(args.slice, 1), 1
    if args.out is None:  # a test of the script never replaces the measured step times
        args.out = Path(tempfile.mkdtemp(prefix="ilora-gpu-check-")) if args.tiny else RESULTS

    load = load_average()
    t_start = time.perf_counter()
    times = []
    for model in args.models:
        print(f"timing {model} ...", file=sys.stderr)
        times.append(time_model(model, args.batch_size, args.steps, args.warmup, device))
        gc.collect()  # the model is gone: its memory goes back before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()

    from ilora.benchmark import plan, resolve_benchmarks
    from ilora.sweep import gpu_estimate

    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    measured = {"gpu": gpu_name, "date": date, "tiny": args.tiny,
                "models": {t.model: asdict(t) for t in times}}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "gpu.json"
    json_path.write_text(json.dumps(measured, indent=2) + "\n")
    paper = plan(resolve_benchmarks(args.benchmarks), "paper")
    estimate = gpu_estimate(paper, json_path)

    slice_result = None
    if args.slice > 0:
        print(f"stand-in slice: {args.slice} run(s), {args.jobs} at a time ...", file=sys.stderr)
        slice_result = stand_in_slice(args.benchmarks, args.slice, args.jobs, args.device, args.tiny)

    lines = header("GPU check: the paper's models at full size, the stand-in grid", "benchmarks/perf/gpu_check.py",
                   load, gpu_facts(device))
    if args.tiny:
        lines += ["**`--tiny`: a test of the script (batch 2, two steps, CPU): these figures measure nothing.**", ""]
    lines += ["## Training steps at full size (`pretrained=false`, random weights)", "",
              f"Batch {args.batch_size}, 224 px / 64 tokens, rank {RANK}, AdamW, bf16 autocast on CUDA; "
              f"{args.steps} timed steps after {args.warmup} warm-up steps, median.", "",
              "| model | backbone parameters | step (ms) | examples/s | peak GPU memory (GiB) |",
              "|---|---|---|---|---|"]
    for t in times:
        peak = f"{t.peak_memory_gib:.1f}" if t.peak_memory_gib is not None else "-"
        lines.append(f"| {t.model} | {t.backbone_parameters / 1e6:.1f}M | {t.step_s * 1e3:.1f} | "
                     f"{t.examples_per_s:.1f} | {peak} |")
    lines += ["", "## Projections", "",
              f"- paper grid (`ilora sweep {' '.join(args.benchmarks)} --preset paper --plan`): {estimate.runs} runs, "
              f"{estimate.steps:,} training steps; "
              + (f"about **{estimate.hours:.1f} GPU hours** on one {gpu_name} (each run's steps times its model's "
                 "step time above, scaled to its batch; evaluation passes not counted)"
                 if estimate.hours is not None else f"GPU hours unknown ({', '.join(estimate.missing)} not timed)")]
    if slice_result is not None and not slice_result[1]:
        lines.append("- stand-in grid: these benchmarks have no runs at the cpu preset")
    elif slice_result is not None:
        grid_runs, n, wall, bad = slice_result
        per_run = wall / n
        lines += [f"- stand-in slice: {n} cpu-preset run(s) spread over the grid, `device={args.device}`, "
                  f"{args.jobs} at a time sharing the device: {wall:.0f} s wall ({bad} failed or diverged)",
                  f"- stand-in grid (`ilora sweep {' '.join(args.benchmarks)} --preset cpu`): {grid_runs} runs, about "
                  f"**{duration(grid_runs * per_run / 3600)}** at {args.jobs} at a time ({per_run:.0f} s of wall time "
                  f"per run in the slice, times the grid's runs)"]
    lines += ["", f"Step times for `ilora sweep all --preset paper --plan`: `{json_path.name}` next to this file.",
              f"Whole check: {time.perf_counter() - t_start:.0f} s."]
    write_report(args.out / "gpu.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
