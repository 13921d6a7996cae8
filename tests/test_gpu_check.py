"""The GPU check (benchmarks/perf/gpu_check.py) without a GPU, and the paper plan's GPU-hours line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ilora.benchmark import plan, resolve_benchmarks
from ilora.sweep import gpu_estimate, make_plan, planned_steps

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "perf" / "gpu_check.py"


def check(*args: str, hide_gpu: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path):
    proc = check("--out", str(tmp_path), hide_gpu=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("gpu-check needs a CUDA GPU (none visible)")
    assert not list(tmp_path.iterdir())


def test_the_tiny_cpu_path_writes_its_report_and_step_times(tmp_path):
    proc = check("--device", "cpu", "--tiny", "--models", "hf_vit_base", "--benchmarks", "extreme_ranks",
                 "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads((tmp_path / "gpu.json").read_text())
    vit = measured["models"]["hf_vit_base"]
    assert measured["tiny"] and vit["batch_size"] == 2 and vit["step_s"] > 0
    report = (tmp_path / "gpu.md").read_text()
    assert "hf_vit_base" in report and "85.8M" in report and "a test of the script" in report
    assert "GPU hours" in report and "stand-in grid" in report and "(0 failed or diverged)" in report


def test_the_paper_plan_turns_measured_step_times_into_gpu_hours(tmp_path):
    runs = plan(resolve_benchmarks(["extreme_ranks"]), "paper", out_dir=str(tmp_path / "runs"))
    cfg = runs[0].config  # cifar100 on hf_vit_base: 3 clients, 5 rounds, 1 epoch, batch 64
    assert (cfg.dataset, cfg.model, cfg.batch_size) == ("cifar100", "hf_vit_base", 64)
    steps = planned_steps(cfg)
    assert steps == 5 * (-(-50_000 // 64) + 3)
    members = {"extreme_ranks": [r.run_id for r in runs]}

    missing = make_plan(runs, members, 1, gpu_times=tmp_path / "gpu.json").lines(1)
    assert "  GPU hours: unknown until `make gpu-check` has measured a step time on a GPU" in missing

    fake = {"gpu": "Test GPU", "date": "2026-01-01",
            "models": {"hf_vit_base": {"step_s": 0.25, "batch_size": 32}}}  # 0.5 s at batch 64
    (tmp_path / "gpu.json").write_text(json.dumps(fake))
    hours = len(runs) * steps * 0.5 / 3600
    assert gpu_estimate(runs, tmp_path / "gpu.json").hours == hours
    lines = make_plan(runs, members, 1, gpu_times=tmp_path / "gpu.json").lines(1)
    assert any(line.startswith(f"  GPU hours: about {hours:.1f} h on one Test GPU for the {len(runs)} planned runs")
               for line in lines)
    assert not any("GPU hours" in line for line in make_plan(runs, members, 1).lines(1))  # not asked for
