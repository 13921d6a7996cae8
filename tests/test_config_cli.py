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
