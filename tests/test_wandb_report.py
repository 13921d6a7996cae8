"""``ilora report --wandb``: the tables, plots and files as one offline W&B run; secrets reach no file."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from test_report import make_records
from wandb_files import offline_run, offline_runs

from ilora.cli import main
from ilora.report import build_table, collect

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B's cache and config directories inside ``tmp_path``; the data directory left to the suite."""
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return tmp_path


def _markdown_rows(path: Path) -> list[list[str]]:
    """The cells of the Markdown table in ``path`` (header first), stripped of their padding."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [rows[0]] + rows[2:]  # rows[1] is the |---| separator


def _md5(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_report_logs_tables_plots_and_an_artifact_offline(wandb_env, capsys):
    bench, runs, out = make_records(wandb_env)
    results = wandb_env / "results"
    args = ["report", str(wandb_env / "synth.yaml"), "--preset", "smoke", "--out-dir", str(out),
            "--results-dir", str(results)]

    # without --wandb: the report as before, nothing of W&B
    assert main(args) == 0
    plain_out = capsys.readouterr().out
    plain = _files(results)
    assert not (out / "wandb").exists()

    assert main([*args, "--wandb", "offline", "--wandb-project", "proj-r"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain_out  # stdout: the written paths, as without --wandb
    again = _files(results)
    assert again.keys() == plain.keys()
    for name, data in plain.items():  # the same files, byte for byte (PROVENANCE.md: but its time stamp)
        if not name.endswith("PROVENANCE.md"):
            assert again[name] == data, name

    (directory,) = offline_runs(out / "wandb")
    assert f"upload it later with: wandb sync {directory}" in captured.err
    run = offline_run(directory)
    assert run.run.project == "proj-r" and run.run.run_group == "report/smoke"
    assert run.run.job_type == "report" and run.run.display_name == "report-smoke"
    assert list(run.run.tags) == ["report", "smoke", "synth"]
    assert run.config == {"preset": "smoke", "benchmarks": ["synth"], "overrides": []}
    assert "environment" not in run.kinds and run.run.host == ""
    (logged,) = run.history

    # the table: the Markdown file's header and rows, cell for cell
    table = json.loads((run.files / logged["tables/synth"]["path"]).read_text())
    rows = _markdown_rows(results / "tables" / "smoke" / "synth.md")
    assert table["columns"] == rows[0] and table["data"] == rows[1:]
    assert any("**" in cell for row in table["data"] for cell in row)  # the bold cell, marked as in Markdown
    # the tidy table: the CSV's columns and one row per cell, missing numbers as null
    tidy = json.loads((run.files / logged["tidy/synth"]["path"]).read_text())
    csv = pd.read_csv(results / "tables" / "smoke" / "synth.csv")
    assert tidy["columns"] == list(csv.columns) and len(tidy["data"]) == len(csv)
    expected = build_table(bench, "smoke", collect(runs)).tidy
    assert tidy["data"][0][tidy["columns"].index("mean")] == pytest.approx(expected["mean"].iloc[0])
    assert "NaN" not in (run.files / logged["tidy/synth"]["path"]).read_text()

    # the plots: every PNG, as written
    for kind in ("rounds", "communication", "dataset"):
        image = logged[f"plots/synth_{kind}"]
        png = results / "plots" / "smoke" / f"synth_{kind}.png"
        assert image["_type"] == "image-file" and image["format"] == "png"
        assert (run.files / image["path"]).read_bytes() == png.read_bytes()

    # the artifact: every file the report wrote, by its path under the results directory, staged offline
    (artifact,) = [a for a in run.artifacts if a.type == "report"]
    assert artifact.name == "report-smoke"
    contents = {c.path: c for c in artifact.manifest.contents}
    assert set(contents) == set(plain)
    for name, entry in contents.items():
        assert entry.digest == _md5(results / name) and entry.size == len(plain[name])
        staged = Path(entry.local_path)
        assert staged.is_relative_to(out / "wandb") and staged.read_bytes() == (results / name).read_bytes()
    assert json.loads(artifact.metadata) == {"preset": "smoke", "benchmarks": ["synth"]}


def test_wandb_option_takes_offline_or_online_only(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "all", "--preset", "smoke", "--out-dir", str(tmp_path), "--wandb", "sometimes"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "--wandb" in err and "'sometimes'" in err and "offline" in err and "online" in err


def test_sweep_wandb_needs_report(tmp_path, capsys):
    assert main(["sweep", "all", "--preset", "smoke", "--out-dir", str(tmp_path / "runs"), "--wandb"]) == 2
    assert "give --report too" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_no_secret_reaches_a_record_a_log_or_wandb(tmp_path):
    """A real smoke run mirrored offline and its report logged offline, with a fake API key and other fake
    secrets in the environment: no file anywhere under the scratch directory (records, metrics, W&B's
    transaction logs, debug logs, staged artifact files, its cache and config) holds any of them, and
    the records hold no other environment value either."""
    fakes = {
        "WANDB_API_KEY": f"sk-test-{secrets.token_hex(16)}",
        "HF_TOKEN": f"hf_{secrets.token_hex(16)}",
        "ILORA_TEST_SECRET": f"secret-{secrets.token_hex(16)}",
    }
    bench = tmp_path / "tiny.yaml"
    bench.write_text(textwrap.dedent("""
        name: tiny
        table: {rows: [method], columns: [dataset]}
        plots: [rounds]
        presets:
          smoke:
            base: {rounds: 2, local_steps: 1, max_train_samples: 60, max_test_samples: 30, max_length: 16}
            grid:
              dataset: [bbc_news]
              method: [fedit]
              seed: [1]
        """))
    home = tmp_path / "home"
    home.mkdir()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # e.g. a W&B service's
    env = {**inherited, **fakes, "HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "XDG_CACHE_HOME": str(home / ".cache"), "XDG_DATA_HOME": str(home / ".local" / "share"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    env.pop("ILORA_CACHE", None)
    argv = [sys.executable, "-m", "ilora.cli", "sweep", str(bench), "--preset", "smoke", "--out-dir", "runs",
            "--results-dir", "results", "wandb=offline", "--report", "--wandb", "offline"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    mirrors = offline_runs(tmp_path / "runs")
    assert len(mirrors) == 2  # the run's mirror and the report's run
    assert any(p.suffix == ".wandb" for p in tmp_path.rglob("*"))
    assert list((tmp_path / "runs" / "wandb" / "data").rglob("*"))  # the staged artifact files, offline
    needles = [v.encode() for v in fakes.values()]
    checked = 0
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            checked += 1
            for needle in needles:
                assert needle not in data, f"{path} holds a secret"
    assert checked > 20
    for text in (done.stdout, done.stderr):
        assert not any(v in text for v in fakes.values())

    # the records: no environment value of any length that could identify it (the run's own paths aside)
    values = {v for k, v in env.items() if len(v) >= 12 and k not in ("PWD", "OLDPWD")}
    for path in [*tmp_path.glob("runs/*/result.json"), *tmp_path.glob("runs/*/metrics.csv")]:
        text = path.read_text()
        assert not [v for v in values if v in text], path
    for directory in mirrors:
        config = json.dumps(offline_run(directory).config)
        assert not [v for v in values if v in config]
        assert not any(k in config for k in fakes)
