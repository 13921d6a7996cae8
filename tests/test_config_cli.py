"""Config layering and validation, and the CLI's behaviour on bad input (one line, exit code 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ilora.cli import main
from ilora.config import config_hash, resolve_config
from ilora.errors import ConfigError


def test_layers_and_overrides():
    cfg = resolve_config(["preset=smoke", "rounds=7", "ranks=[1,2,3]", "lr=0.5"])
    assert (cfg.rounds, cfg.ranks, cfg.lr, cfg.preset) == (7, [1, 2, 3], 0.5, "smoke")
    assert cfg.local_steps == 3  # from configs/preset/smoke.yaml
    assert config_hash(cfg) == config_hash(resolve_config(["preset=smoke", "rounds=7", "ranks=[1,2,3]", "lr=0.5"]))
    assert config_hash(cfg) != config_hash(resolve_config(["preset=smoke", "rounds=8", "ranks=[1,2,3]", "lr=0.5"]))


def test_config_file_layer(tmp_path: Path):
    path = tmp_path / "exp.yaml"
    path.write_text("preset: smoke\nrounds: 4\n")
    assert resolve_config([f"config={path}"]).rounds == 4
    assert resolve_config([f"config={path}", "rounds=6"]).rounds == 6


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["method=nope"], "unknown method 'nope' (valid: "),
        (["dataset=nope"], "unknown dataset 'nope' (valid: "),
        (["model=nope"], "unknown model 'nope' (valid: "),
        (["preset=nope"], "unknown preset 'nope' (valid: "),
        (["ranks=[2,4]"], "ranks has 2 entries but num_clients is 3"),
        (["ranks=[2,0,6]"], "ranks must all be positive"),
        (["lora_alpha=0"], "lora_alpha must be positive"),
        (["optimizer=lion"], "unknown optimizer 'lion' (valid: sgd, adamw)"),
        (["bogus_key=1"], "unknown config key 'bogus_key'"),
        (["rounds=abc"], "rounds"),
        (["config=/nonexistent/exp.yaml"], "file not found"),
        (["notakeyvalue"], "is not key=value"),
    ],
)
def test_bad_input_is_one_clear_line(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        resolve_config(["preset=smoke", *overrides])
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_cli_bad_input_exit_code_2_no_traceback_nothing_written(tmp_path: Path):
    out = tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args in (["method=nope"], ["ranks=[2,4]"], ["lora_alpha=-1"], ["preset=missing"]):
        proc = subprocess.run(
            [sys.executable, "-m", "ilora.cli", "run", "preset=smoke", f"out_dir={out}", *args],
            capture_output=True, text=True, env=env, timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.strip().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("fedit", "bbc_news", "minilm", "smoke", "cpu"):
        assert word in out


def test_runs_and_sweeps_share_one_record_layout():
    from ilora.benchmark import default_out_dir

    # a single run goes to runs/<preset>; a sweep of a preset whose tables are committed keeps its records with
    # them (results/records/<preset>), the other presets' sweeps under runs/<preset>: the same <dir>/<run_id> layout
    assert resolve_config([]).out_dir == str(Path("runs") / "cpu")
    assert default_out_dir("cpu") == str(Path("results") / "records" / "cpu")
    assert resolve_config(["preset=smoke"]).out_dir == default_out_dir("smoke") == str(Path("runs") / "smoke")
    assert resolve_config(["out_dir=elsewhere"]).out_dir == "elsewhere"


def test_data_show_writes_its_heatmap_under_the_out_dir(tmp_path, monkeypatch, capsys):
    from ilora.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["data", "show", "bbc_news", "preset=quick", "max_train_samples=60", f"out_dir={tmp_path / 'records'}"]
    assert main(args) == 0
    (png,) = list((tmp_path / "records" / "partitions").glob("partition-bbc_news-*.png"))
    assert f"heatmap: {png}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["records"]


def test_a_diverged_run_says_where_and_prints_no_final_accuracy(tmp_path, monkeypatch, capsys):
    import ilora.runner

    def diverging(cfg, tracker=None):
        return {"status": "diverged", "error": None, "best_accuracy": 0.3,
                "rounds": [{"accuracy": 0.3, "loss": 1.0, "compute_s": 1, "wall_s": 1},
                           {"accuracy": 0.1, "loss": float("nan"), "compute_s": 1, "wall_s": 1}]}

    monkeypatch.setattr(ilora.runner, "run_experiment", diverging)
    assert main(["run", "preset=smoke", f"out_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "run diverged at round 2" in err and "final accuracy" not in err


def test_every_vision_benchmark_smoke_runs_a_vision_model():
    from ilora.benchmark import available_benchmarks, expand, load_benchmark
    from ilora.models import model_kind

    for name in available_benchmarks():
        bench = load_benchmark(name)
        if "vision" not in name or not bench.runs_at("smoke"):
            continue
        runs = expand(bench, "smoke")
        assert runs and all(model_kind(r.config.model) == "image" for r in runs), name


def test_progress_bars_count_rounds_from_one_and_name_their_units(capsys):
    from conftest import tiny_backbone, tiny_data, tiny_federation

    from ilora.algorithm import get_algorithm
    from ilora.config import RunConfig
    from ilora.simulation import Simulation

    backbone = tiny_backbone()
    fed = tiny_federation(backbone, [2, 4], [8, 8])
    cfg = RunConfig(rounds=2, local_steps=1, batch_size=4, optimizer="sgd", lr=0.01, progress=True)
    data = [tiny_data(8, seed=1), tiny_data(8, seed=2)]
    Simulation(get_algorithm("fedit")(fed), backbone, data, tiny_data(4, seed=3), cfg, [[0, 1], [0, 1]]).run()
    err = capsys.readouterr().err
    assert "round 1" in err and "round 2" in err and "round 0" not in err
    assert "2/2" in err and ("round/s" in err or "s/round" in err) and ("client/s" in err or "s/client" in err)


def test_ranks_shorthand_one_rank_for_all_or_blocks_of_clients():
    assert resolve_config(["ranks=4"]).ranks == [4, 4, 4]
    assert resolve_config(["ranks=[2,8,16]", "num_clients=15"]).ranks == [2] * 5 + [8] * 5 + [16] * 5
    assert resolve_config(["ranks=4", "num_clients=50"]).ranks == [4] * 50
    with pytest.raises(ConfigError, match="one rank for all"):
        resolve_config(["ranks=[2,8]"])


def test_no_network_sets_the_hub_offline_switches_in_seconds(monkeypatch):
    import socket
    import time

    from ilora.models.hub import offline_without_network

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("no route")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    t0 = time.perf_counter()
    assert offline_without_network() is True
    assert time.perf_counter() - t0 < 5
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user's choice is kept
    assert offline_without_network() is False and os.environ["HF_HUB_OFFLINE"] == "0"
