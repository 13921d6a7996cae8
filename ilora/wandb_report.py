"""``ilora report --wandb``: a report's tables, plots and files as one Weights & Biases run.

One W&B run per report invocation: project ``--wandb-project`` (default ``ilora-bench``, the project of
the runs), group ``report/<preset>``, job type ``report``, name ``report-<preset>``. It logs

- ``tables/<benchmark>``: the table as shown in the Markdown file (same columns, same cells, bold marked
  ``**``), and ``tidy/<benchmark>``: the CSV's tidy numbers (one row per cell), each a ``wandb.Table``;
- ``plots/<benchmark>_<kind>``: every PNG plot as a ``wandb.Image``;
- an artifact ``report-<preset>`` of type ``report`` holding every file the report wrote (Markdown, LaTeX,
  CSV, PROVENANCE.md, PNG and PDF), named by its path under the results directory.

``offline`` writes everything, W&B's copies of the artifact files included, under ``<dir>/wandb/`` (by
default the records directory, ``runs/<preset>/wandb/``) for a later ``wandb sync``. The settings of
``ilora.tracking.private_settings`` apply: no environment, command line or host facts are recorded.
The tables stay built from the records; W&B only receives copies.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ilora.benchmark import Benchmark
from ilora.errors import ConfigError, UserError
from ilora.report import Table

REPORT_MODES = ("offline", "online")
DEFAULT_PROJECT = "ilora-bench"


@dataclass
class LoggedReport:
    """What a report run holds: where (offline directory or online URL) and what was logged."""

    mode: str
    run_dir: Path | None = None
    url: str | None = None
    tables: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """What to tell the user (stderr): where the run is and, offline, how to upload it."""
        what = f"{len(self.tables)} tables, {len(self.images)} plots, an artifact of {len(self.files)} files"
        if self.mode == "offline" and self.run_dir is not None:
            shown = os.path.relpath(self.run_dir) if self.run_dir.is_relative_to(Path.cwd()) else self.run_dir
            return [f"W&B report run (offline): {shown} ({what})", f"upload it later with: wandb sync {shown}"]
        return [f"W&B report run: {self.url} ({what})"]


def check_mode(mode: str) -> None:
    """``online`` needs an API key; checked before anything is written."""
    from ilora.config import check_wandb_login

    if mode not in REPORT_MODES:
        raise UserError(f"unknown --wandb {mode!r} (valid: {', '.join(REPORT_MODES)})")
    if mode == "online":
        try:
            check_wandb_login()
        except ConfigError:
            raise UserError("--wandb online needs a W&B API key: run `wandb login` or set WANDB_API_KEY "
                            "(valid without one: --wandb offline)") from None


def default_directory(preset: str, out_dir: str | None) -> Path:
    """Where the report's W&B files go by default: the records directory (W&B adds ``wandb/``)."""
    from ilora.benchmark import default_out_dir

    return Path(out_dir or default_out_dir(preset))


def table_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with missing numbers as ``None`` (valid JSON in the W&B table file, not ``NaN``)."""
    out = frame.astype(object)
    return out.where(~out.map(lambda v: v is None or (isinstance(v, float) and math.isnan(v))), None)


@contextmanager
def _staging_under(directory: Path) -> Iterator[None]:
    """W&B copies artifact files (tables too) to a staging area before upload, by default under the user's
    data directory; an offline run's copies must outlive the process until ``wandb sync``, so they go under
    ``directory`` unless the user chose a place (``WANDB_DATA_DIR``)."""
    if os.environ.get("WANDB_DATA_DIR"):
        yield
        return
    os.environ["WANDB_DATA_DIR"] = str(directory.resolve())
    try:
        yield
    finally:
        os.environ.pop("WANDB_DATA_DIR", None)


def log_report(
    built: list[tuple[Benchmark, Table]],
    written: list[Path],
    preset: str,
    results_dir: Path,
    mode: str = "offline",
    project: str = DEFAULT_PROJECT,
    directory: Path | None = None,
    overrides: list[str] | None = None,
) -> LoggedReport:
    """Log the built tables, the PNG plots and every written file as one W&B run (see the module doc)."""
    from ilora.tracking import import_wandb, private_settings

    check_mode(mode)
    wandb = import_wandb()
    directory = directory or default_directory(preset, None)
    directory.mkdir(parents=True, exist_ok=True)
    names = [bench.name for bench, _ in built]
    logged = LoggedReport(mode)
    with _staging_under(directory / "wandb" / "data"):
        try:
            run = wandb.init(
                project=project, group=f"report/{preset}", job_type="report", name=f"report-{preset}",
                tags=list(dict.fromkeys(["report", preset, *names])),
                config={"preset": preset, "benchmarks": names, "overrides": list(overrides or [])},
                mode=mode, dir=str(directory.resolve()), reinit="create_new", settings=private_settings(wandb),
            )
        except Exception as exc:  # e.g. no network for online: the tables and plots are written already
            raise UserError(f"W&B report run could not start ({type(exc).__name__}: {exc}); the tables and "
                            "plots are written; --wandb offline and a later `wandb sync` need no network"
                            .splitlines()[0]) from None
        try:
            metrics: dict[str, Any] = {}
            for bench, table in built:
                metrics[f"tables/{bench.name}"] = wandb.Table(dataframe=table_frame(table.display))
                metrics[f"tidy/{bench.name}"] = wandb.Table(dataframe=table_frame(table.tidy))
            pngs = [p for p in written if p.suffix == ".png"]
            for png in pngs:
                metrics[f"plots/{png.stem}"] = wandb.Image(str(png), caption=png.stem)
            run.log(metrics)
            logged.tables = [k for k in metrics if k.startswith(("tables/", "tidy/"))]
            logged.images = [f"plots/{p.stem}" for p in pngs]

            artifact = wandb.Artifact(f"report-{preset}", type="report",
                                      description=f"ilora report tables and plots ({preset} preset)",
                                      metadata={"preset": preset, "benchmarks": names})
            for path in written:
                name = path.relative_to(results_dir).as_posix() if path.is_relative_to(results_dir) else path.name
                artifact.add_file(str(path), name=name)
                logged.files.append(name)
            run.log_artifact(artifact)
            if mode == "offline":
                logged.run_dir = Path(run.dir).parent
            else:
                logged.url = run.url
        finally:
            run.finish()
    return logged
