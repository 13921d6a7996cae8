"""Weights & Biases mirror of a run (``wandb=disabled|offline|online``, default disabled).

The results record is the source of every table; W&B only mirrors it (docs/wandb.md). One W&B run per
experiment: project ``wandb_project``, group ``wandb_group`` (a sweep sets it to the benchmark, preset
and table cell, method included, so that a group holds the seeds of one method in one cell), job type
the method, run name the run id, tags ``wandb_tags`` (a sweep's benchmarks) plus the preset, dataset,
model and method, the resolved config without bookkeeping keys, one log call per round with
``step = round`` and the final summary. ``offline`` needs no account and no API key: it writes under
``<out_dir>/<run_id>/wandb`` for a later ``wandb sync``.

Nothing from the environment reaches W&B: the config is built from the ``RunConfig`` alone, and
W&B's own collection of system metadata (command line, program, host name and facts, git state,
installed packages, code, system metrics) is switched off by ``private_settings``. The API key is never read here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from ilora.config import RunConfig, to_dict
from ilora.errors import UserError

# Round fields mirrored to W&B (the per-client lists and bookkeeping are left out).
ROUND_KEYS = ("accuracy", "loss", "train_loss", "uplink_bytes", "downlink_bytes", "train_s", "aggregate_s",
              "eval_s", "compute_s", "wall_s")
# Config keys that are bookkeeping, not part of what a run computes, left out of the W&B config (the run id
# is the run's name; out_dir is a local path).
HIDDEN_KEYS = ("wandb", "wandb_project", "wandb_group", "wandb_tags", "progress", "out_dir", "run_id")


class Tracker(Protocol):
    def log_round(self, row: dict[str, Any]) -> None: ...

    def finish(self, record: dict[str, Any] | None) -> None: ...


class NullTracker:
    """Tracking disabled: does nothing."""

    def log_round(self, row: dict[str, Any]) -> None:
        pass

    def finish(self, record: dict[str, Any] | None) -> None:
        pass


def import_wandb() -> Any:
    """The ``wandb`` module (imported only when tracking is on), quiet, or a one-line error."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        raise UserError("wandb is not installed (pip install wandb), or leave W&B off (wandb=disabled)") from None
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    return wandb


def private_settings(wandb: Any) -> Any:
    """``wandb.Settings`` that record only what the suite logs: no command line, program path, host name or
    facts, git state, package list, code or system metrics (W&B collects these by default)."""
    return wandb.Settings(
        console="off", silent=True, host="",
        x_disable_meta=True, x_disable_machine_info=True, x_disable_stats=True, x_save_requirements=False,
        disable_git=True, save_code=False, disable_code=True, disable_job_creation=True,
    )


def wandb_config(cfg: RunConfig) -> dict[str, Any]:
    """The W&B config of a run: the resolved config's keys (flat, as in the record) minus bookkeeping."""
    return {k: v for k, v in to_dict(cfg).items() if k not in HIDDEN_KEYS}


def wandb_tags(cfg: RunConfig) -> list[str]:
    """``wandb_tags`` (a sweep puts its benchmarks there), then the preset, dataset, model and method."""
    return list(dict.fromkeys([*cfg.wandb_tags, cfg.preset, cfg.dataset, cfg.model, cfg.method]))


def summary_of(record: dict[str, Any]) -> dict[str, Any]:
    """The final summary mirrored to W&B: status, accuracies, communication totals, device and versions."""
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
        "config_hash": record.get("config_hash"),
        "device": record.get("device"),
        "versions": record.get("versions"),
    }


class WandbTracker:
    """One W&B run per experiment."""

    def __init__(self, cfg: RunConfig, run_id: str, directory: Path | None = None) -> None:
        wandb = import_wandb()
        directory = directory or Path(cfg.out_dir) / run_id
        directory.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=cfg.wandb_project,
            group=cfg.wandb_group,
            job_type=cfg.method,
            name=run_id,
            tags=wandb_tags(cfg),
            config=wandb_config(cfg),
            mode=cfg.wandb,
            dir=str(directory.resolve()),  # absolute: a W&B service shared with a parent process has its own cwd
            reinit="create_new",
            settings=private_settings(wandb),
        )

    def log_round(self, row: dict[str, Any]) -> None:
        metrics = {k: row[k] for k in ROUND_KEYS if k in row}
        self._run.log(metrics, step=int(row["round"]))

    def finish(self, record: dict[str, Any] | None) -> None:
        if record is not None:
            self._run.summary.update({k: v for k, v in summary_of(record).items() if v is not None})
            exit_code = 0 if record.get("status") == "ok" else 1
        else:
            exit_code = 1
        self._run.finish(exit_code=exit_code)


def create_tracker(cfg: RunConfig, run_id: str) -> Tracker:
    """The tracker ``cfg.wandb`` asks for."""
    if cfg.wandb == "disabled":
        return NullTracker()
    return WandbTracker(cfg, run_id)
