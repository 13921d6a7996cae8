"""After the fact: ``ilora eval`` scores a run's saved model and its exports to the record's accuracy, and
a finished run asked again for W&B or an export gets them from its record, without training."""

from __future__ import annotations

import json

import pytest

from ilora.cli import main

pytest.importorskip("peft")

SETTINGS = {
    "minilm": ["dataset=bbc_news", "model=minilm", "max_length=24", "method=ilora"],
    "efficientnet_lite0": ["dataset=digits", "model=efficientnet_lite0", "image_size=32", "method=fedsa_lora"],
}


@pytest.mark.parametrize("model", list(SETTINGS))
def test_eval_of_a_run_and_its_exports_equals_the_record(tmp_path, model, capsys):
    args = ["run", "preset=smoke", *SETTINGS[model], "rounds=2", "local_steps=2", "max_test_samples=60",
            "threads=1", f"out_dir={tmp_path}", "run_id=demo"]
    assert main(args) == 0
    run_dir = tmp_path / "demo"
    record = json.loads((run_dir / "result.json").read_text())
    finished = (run_dir / "result.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    assert "the record says" in capsys.readouterr().out
    for fmt in ("peft", "merged"):
        assert main([*args, f"export={fmt}"]) == 0  # a finished run: exported from its saved model, no training
        assert "exported the finished run's model" in capsys.readouterr().err
        assert main(["eval", str(run_dir / "export" / fmt)]) == 0, capsys.readouterr()
        assert ": equal" in capsys.readouterr().out
    assert (run_dir / "result.json").stat().st_mtime_ns == finished
    assert json.loads((run_dir / "result.json").read_text()) == record


def test_a_finished_run_is_mirrored_to_wandb_without_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = ["run", "preset=smoke", "rounds=1", "local_steps=1", "threads=1", f"out_dir={tmp_path}", "run_id=demo"]
    assert main(args) == 0
    finished = (tmp_path / "demo" / "result.json").stat().st_mtime_ns
    assert main([*args, "wandb=offline"]) == 0
    assert "mirrored the finished run to W&B (offline) from its record" in capsys.readouterr().err
    assert list((tmp_path / "demo").rglob("*.wandb"))  # the offline run's file
    assert (tmp_path / "demo" / "result.json").stat().st_mtime_ns == finished


def test_eval_of_something_else_is_a_one_line_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err
