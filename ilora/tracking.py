"""Weights & Biases mirror of a run (``wandb=disabled|offline|online``, default disabled).

The results record is the source of every table; W&B only mirrors it: project ``wandb_project``,
group ``wandb_group`` (one table cell), job type the method, run name the run id, the resolved config,
one log call per round and the final summary. ``offline`` needs no account and no API key: it writes
under ``<out_dir>/<run_id>/wandb`` and can be uploaded later with ``wandb sync``. The API key is never
read here and is never written to a results record or a log.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from ilora.config import RunConfig, to_dict
from ilora.errors import UserError

# Round fields mirrored to W&B (the per-client list and bookkeeping are left out).
_ROUND_KEYS = ("accuracy", "loss", "train_loss", "uplink_bytes", "downlink_bytes", "train_s", "aggregate_s",
               "eval_s", "wall_s")
# Config keys that are bookkeeping, not part of what a run computes, left out of the W&B config.
_HIDDEN = ("wandb", "wandb_project", "wandb_group", "progress")


class Tracker(Protocol):
    def log_round(self, row: dict[str, Any]) -> None: ...

    def finish(self, record: dict[str, Any] | None) -> None: ...


class NullTracker:
    """Tracking disabled: does nothing."""

    def log_round(self, row: dict[str, Any]) -> None:
        pass

    def finish(self, record: dict[str, Any] | None) -> None:
        pass


def summary_of(record: dict[str, Any]) -> dict[str, Any]:
    """The final summary mirrored to W&B: status, accuracies and communication totals."""
    rounds = record.get("rounds") or []
    up = sum(r.get("uplink_bytes", 0) for r in rounds)
    down = sum(r.get("downlink_bytes", 0) for r in rounds)
    return {
        "status": record.get("status"),
        "error": record.get("error"),
        "final_accuracy": record.get("final_accuracy"),
        "best_accuracy": record.get("best_accuracy"),
        "rounds": len(rounds),
        "uplink_mb_total": up / 1e6,
        "downlink_mb_total": down / 1e6,
        "wall_s_total": sum(r.get("wall_s", 0.0) for r in rounds),
        "partition_hash": record.get("partition_hash"),
    }


class WandbTracker:
    """One W&B run per experiment."""

    def __init__(self, cfg: RunConfig, run_id: str, directory: Path | None = None) -> None:
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is a dependency
            raise UserError("wandb is not installed (pip install wandb), or set wandb=disabled") from None
        directory = directory or Path(cfg.out_dir) / run_id
        directory.mkdir(parents=True, exist_ok=True)
        if cfg.wandb == "offline":
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        config = {k: v for k, v in to_dict(cfg).items() if k not in _HIDDEN}
        self._wandb = wandb
        self._run = wandb.init(
            project=cfg.wandb_project,
            group=cfg.wandb_group,
            job_type=cfg.method,
            name=run_id,
            id=None,
            config=config,
            mode=cfg.wandb,
            dir=str(directory),
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    def log_round(self, row: dict[str, Any]) -> None:
        metrics = {k: row[k] for k in _ROUND_KEYS if k in row}
        self._run.log(metrics, step=int(row["round"]))

    def finish(self, record: dict[str, Any] | None) -> None:
        if record is not None:
            for key, value in summary_of(record).items():
                self._run.summary[key] = value
            exit_code = 0 if record.get("status") == "ok" else 1
        else:
            exit_code = 1
        self._run.finish(exit_code=exit_code)


def create_tracker(cfg: RunConfig, run_id: str) -> Tracker:
    """The tracker ``cfg.wandb`` asks for."""
    if cfg.wandb == "disabled":
        return NullTracker()
    return WandbTracker(cfg, run_id)
