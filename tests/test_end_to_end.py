"""One real run: MiniLM-L6 (pretrained, offline) on BBC News through the CLI, twice."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ilora.cli import main


@pytest.mark.slow
def test_smoke_run_twice_identical(tmp_path: Path, capsys):
    args = ["run", "preset=smoke", "method=fedit", "rounds=2", "local_steps=6"]
    assert main([*args, f"out_dir={tmp_path / 'a'}"]) == 0
    assert main([*args, f"out_dir={tmp_path / 'b'}"]) == 0
    err = capsys.readouterr().err
    assert "results record:" in err and "final accuracy" in err
    (ra,), (rb,) = list((tmp_path / "a").glob("*/result.json")), list((tmp_path / "b").glob("*/result.json"))
    a, b = json.loads(ra.read_text()), json.loads(rb.read_text())
    assert a["status"] == "ok" and len(a["rounds"]) == 2
    keys = ("accuracy", "loss", "train_loss", "uplink_bytes", "downlink_bytes")
    assert [[r[k] for k in keys] for r in a["rounds"]] == [[r[k] for k in keys] for r in b["rounds"]]
    for field in ("run_id", "config", "partition_hash", "versions", "final_accuracy", "best_accuracy", "started",
                  "finished", "device", "seed", "method", "dataset", "model", "method_options", "evaluation"):
        assert field in a
    assert a["method_options"]["control_variates"] is False and a["evaluation"].startswith("global model")
    # a finished run is not retrained: its record is named and left as it is; --force runs it again
    before = ra.stat().st_mtime_ns
    assert main([*args, f"out_dir={tmp_path / 'a'}"]) == 0
    assert "already done (ok)" in capsys.readouterr().err and ra.stat().st_mtime_ns == before
    assert main([*args, f"out_dir={tmp_path / 'a'}", "--force"]) == 0
    assert ra.stat().st_mtime_ns != before
    assert a["final_accuracy"] > 0.3  # 5 classes: chance is 0.2
    rows = list(csv.DictReader((ra.parent / "metrics.csv").open()))
    assert len(rows) == 2 and float(rows[-1]["accuracy"]) == a["final_accuracy"]
