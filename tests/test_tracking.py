"""The W&B mirror: disabled by default, offline with no account, never leaking the API key."""

from __future__ import annotations

from pathlib import Path

from ilora.config import resolve_config
from ilora.tracking import NullTracker, WandbTracker, create_tracker, summary_of

SECRET = "ilora-test-secret-key-0123456789abcdef0123"


def test_disabled_by_default(tmp_path):
    cfg = resolve_config(["preset=smoke", f"out_dir={tmp_path}"])
    assert cfg.wandb == "disabled"
    tracker = create_tracker(cfg, "run-a")
    assert isinstance(tracker, NullTracker)
    tracker.log_round({"round": 1, "accuracy": 0.5})
    tracker.finish(None)
    assert not any(tmp_path.iterdir())


def test_summary_of_record():
    record = {"status": "ok", "final_accuracy": 0.7, "best_accuracy": 0.8, "partition_hash": "h",
              "rounds": [{"uplink_bytes": 2_000_000, "downlink_bytes": 1_000_000, "wall_s": 1.5}] * 2}
    s = summary_of(record)
    assert s["uplink_mb_total"] == 4.0 and s["downlink_mb_total"] == 2.0 and s["wall_s_total"] == 3.0
    assert s["final_accuracy"] == 0.7 and s["rounds"] == 2


def test_offline_mirror_without_account(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "runs"
    cfg = resolve_config(["preset=smoke", "wandb=offline", f"out_dir={out}", "wandb_project=proj-x",
                          "wandb_group=table/cell-7", "method=fedit"])
    tracker = create_tracker(cfg, "fedit-run-1")
    assert isinstance(tracker, WandbTracker)
    rounds = [{"round": t, "accuracy": 0.25 * t, "loss": 1.0 / t, "uplink_bytes": 10, "downlink_bytes": 20,
               "wall_s": 0.1, "clients": [0, 1, 2]} for t in (1, 2)]
    for row in rounds:
        tracker.log_round(row)
    tracker.finish({"status": "ok", "final_accuracy": 0.5, "best_accuracy": 0.5, "rounds": rounds})

    runs = list((out / "fedit-run-1" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    blob = next(runs[0].glob("*.wandb")).read_bytes()
    for text in (b"proj-x", b"table/cell-7", b"fedit-run-1", b"accuracy", b"uplink_bytes", b"final_accuracy",
                 b"dirichlet_alpha"):
        assert text in blob, text
    # the API key reaches no file the run wrote
    for path in Path(tmp_path).rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
