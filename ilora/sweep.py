"""Running a benchmark's planned runs: the missing ones, in a local process pool or on Ray, resumable.

A run is skipped when its ``result.json`` exists; a failure becomes a ``failed`` record and the sweep
goes on; a killed sweep resumes each unfinished run from its round checkpoint. ``backend="ray"`` runs
each pending run as a Ray task instead (ilora/ray_sweep.py, docs/ray.md), with the same records.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ilora.benchmark import PlannedRun, read_record
from ilora.config import RunConfig

if TYPE_CHECKING:
    from ilora.ray_sweep import RayOptions

BACKENDS = ("local", "ray")

# ------------------------------------------------------------------------------------------- execution
Runner = Callable[[RunConfig], dict[str, Any]]


def run_one(cfg: RunConfig) -> dict[str, Any]:
    """The default runner: one run with its W&B mirror (if enabled)."""
    from ilora.runner import run_experiment, run_id_for
    from ilora.tracking import create_tracker

    tracker = create_tracker(cfg, run_id_for(cfg))
    record = None
    try:
        record = run_experiment(cfg, tracker=tracker)
        return record
    finally:
        tracker.finish(record)


def _failure_record(cfg: RunConfig, run_id: str, exc: BaseException, started: str) -> dict[str, Any]:
    from ilora.runner import new_record

    record = new_record(cfg, started)
    record.update(
        run_id=run_id,
        status="failed",
        error=f"{type(exc).__name__}: {exc}".splitlines()[0],
        traceback=traceback.format_exc(),
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return record


def _execute(runner: Runner, cfg: RunConfig, run_id: str) -> tuple[str, dict[str, Any], float]:
    """Run one config; any exception becomes a ``failed`` record so that the sweep goes on."""
    from ilora.locks import RunLocked, run_lock
    from ilora.runner import drill_pause, write_record

    drill_pause("run")  # the kill drill's moment between runs: the last record is written, this run not begun
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run_dir = Path(cfg.out_dir) / run_id
    try:
        with run_lock(run_dir):
            done_elsewhere = read_record(run_dir / "result.json")  # finished by another process meanwhile
            if done_elsewhere is not None and done_elsewhere.get("status") != "failed":  # failed: a retry
                return run_id, {**done_elsewhere, "elsewhere": True}, time.perf_counter() - t0
            try:
                record = runner(cfg)
            except Exception as exc:
                record = _failure_record(cfg, run_id, exc, started)
                write_record(run_dir, record)
    except RunLocked as exc:
        return run_id, {"status": "locked", "error": str(exc)}, time.perf_counter() - t0
    return run_id, record, time.perf_counter() - t0


def _worker_init(jobs: int) -> None:
    from ilora.quiet import quiet_libraries

    os.environ["ILORA_JOBS"] = str(jobs)  # threads=auto in each run: the cores divided by the jobs
    quiet_libraries()


def _pool_worker_init(jobs: int) -> None:
    """A local pool worker: Ctrl-C reaches the whole process group, and only the parent acts on it (it stops
    the workers, so that each keeps its last round's checkpoint and the parent reports once)."""
    import threading

    from tqdm import tqdm

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tqdm.set_lock(threading.RLock())  # not tqdm's default process lock: a stopped worker leaves no semaphore behind
    _worker_init(jobs)


def _execute_in_worker(runner: Runner, cfg: RunConfig, run_id: str, jobs: int) -> tuple[str, dict[str, Any], float]:
    """``_execute`` in a worker that another backend started (a Ray task), set up as a pool worker."""
    _worker_init(jobs)
    return _execute(runner, cfg, run_id)


def threads_per_job(jobs: int) -> int:
    from ilora.runner import resolve_threads

    return resolve_threads("auto", jobs)


@dataclass
class SweepSummary:
    planned: int = 0
    skipped: int = 0
    ran: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)  # Ray: the worker died past its retries
    locked: list[tuple[str, str]] = field(default_factory=list)  # another live process is training it
    seconds: float = 0.0

    def line(self) -> str:
        lost = f", {len(self.lost)} lost" if self.lost else ""
        lost += f", {len(self.locked)} skipped: training in another process" if self.locked else ""
        text = (f"{self.planned} runs: {self.skipped} already done, {self.ran} run now in {self.seconds:.0f}s"
                f" ({len(self.failed)} failed, {len(self.diverged)} diverged{lost})")
        return text


@dataclass
class Plan:
    """What a sweep will do: its runs per benchmark, what is pending, and the time it should take here."""

    per_benchmark: dict[str, tuple[int, int]]  # benchmark -> (planned runs, pending runs)
    planned: int
    pending: int
    expected_s: float | None  # wall seconds for the pending runs at ``jobs`` at a time; None: nothing to go on
    estimated: int  # pending runs whose time came from a finished record of the same kind
    processors: list[str]  # the processors those records were measured on
    gpu: GpuEstimate | None = None  # the planned runs' GPU hours (the paper preset); None: not asked for

    def lines(self, jobs: int, reasons: dict[str, str] | None = None) -> list[str]:
        """The plan as printed; ``reasons``: why a benchmark runs nothing at this preset (its ``dropped``)."""
        reasons = reasons or {}
        out = [f"plan: {self.planned} distinct runs, {self.pending} to run"]
        for name, (planned, todo) in self.per_benchmark.items():
            why = f" (not run at this preset: {reasons[name]})" if not planned and name in reasons else ""
            out.append(f"  {name}: {planned} runs, {todo} to run{why}")
        if self.gpu is not None and self.planned:
            out.append(f"  {self.gpu.line()}")
        if not self.planned:
            out.append("  nothing to run: no benchmark has a grid at this preset (each line above says why)")
        elif not self.pending:
            out.append("  nothing to run: every planned run has its record (the report rebuilds from them)")
        if not self.pending:
            return out
        if self.expected_s is None:
            out.append("  expected time: unknown (no finished record of the same dataset and model to go on)")
        else:
            hours = self.expected_s / 3600
            on = ", ".join(self.processors) or "-"
            out.append(f"  expected time: about {hours:.1f} h at {jobs} job(s), from the time per optimiser step of "
                       f"finished records of the same dataset, model, method and DP mode ({self.estimated} of "
                       f"{self.pending} runs; the rest from their dataset and model), measured on {on}")
        return out


MIN_RECORDS_OF_KIND = 3  # fewer finished records of a run's exact kind: time it by its dataset and model


def make_plan(runs: list[PlannedRun], members: dict[str, list[str]], jobs: int, retry_failed: bool = False,
              gpu_times: Path | None = None) -> Plan:
    """The sweep's plan. Each pending run's time: its optimiser steps times the median wall time per step of
    the finished records of its kind in the records directories of ``runs`` (dataset, model, method and DP
    mode where three or more records have it, else dataset and model), so that a run on twice the data is
    expected to take twice as long (the median wall time where a run's steps cannot be counted).
    ``gpu_times``: also the GPU hours of all planned runs from the step times in that file (``make
    gpu-check`` writes it)."""
    import statistics

    todo = pending(runs, retry_failed)
    todo_ids = {r.run_id for r in todo}
    per_step: dict[tuple, list[float]] = {}  # seconds per optimiser step of finished runs, by kind
    per_run: dict[tuple, list[float]] = {}  # their whole wall times, by kind
    processors: set[str] = set()
    # every finished record where these runs keep theirs, planned here or not (another table's runs of the
    # same method time this one's on other data)
    record_paths = {p for d in {run.result_path.parent.parent for run in runs} for p in d.glob("*/result.json")}
    for path in sorted(record_paths):
        record = read_record(path)
        if not record or record.get("status") != "ok":
            continue
        rounds = record.get("rounds") or []
        wall = sum(r.get("wall_s", 0.0) for r in rounds)
        steps = sum(sum(r.get("client_steps") or []) for r in rounds)
        config = record.get("config") or {}
        for kind in _kinds(record.get("dataset"), record.get("model"), record.get("method"), config.get("dp", "none")):
            per_run.setdefault(kind, []).append(wall)
            if steps:
                per_step.setdefault(kind, []).append(wall / steps)
        processors.add(str(record.get("processor") or "an unrecorded processor"))
    total, known, estimated = 0.0, True, 0
    for run in todo:
        cfg = run.config
        exact, near = _kinds(cfg.dataset, cfg.model, cfg.method, cfg.dp)
        steps = planned_steps(run.config)
        # a kind timed by fewer than three records falls back to its dataset and model: one record's time can be
        # an outlier (a run that shared its core with another sweep)
        kind = exact if len(per_run.get(exact, [])) >= MIN_RECORDS_OF_KIND else near if near in per_run else None
        if kind is None:
            known = False
            continue
        estimated += kind == exact
        if steps and kind in per_step:
            total += statistics.median(per_step[kind]) * steps
        else:
            total += statistics.median(per_run[kind])
    per = {name: (len(ids), sum(1 for i in ids if i in todo_ids)) for name, ids in members.items()}
    gpu = gpu_estimate(runs, gpu_times) if gpu_times is not None else None
    return Plan(per, len(runs), len(todo), total / max(1, jobs) if known else None, estimated, sorted(processors), gpu)


def _kinds(dataset: Any, model: Any, method: Any, dp: Any) -> tuple[tuple, tuple]:
    """A run's kind for timing it, exact (its method and DP mode too: DP-SGD's per-sample gradients cost
    more) and near (dataset and model only)."""
    return (dataset, model, method, dp), (dataset, model)


# ------------------------------------------------------------------------------------------- GPU hours
# Where ``make gpu-check`` (benchmarks/perf/gpu_check.py) writes its measured step times.
GPU_TIMES = Path(__file__).resolve().parents[1] / "results" / "perf" / "gpu.json"
# Train-split sizes of the paper grid's datasets (the hub's train splits; dbpedia14 and yahoo_answers: the
# suite's stratified subsample, ilora/data/hub.py), to count a planned run's training steps.
TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "tiny_imagenet": 100_000, "qqp": 363_846, "qnli": 104_743,
               "sst2": 67_349, "imdb": 25_000, "ag_news": 120_000, "dbpedia14": 50_000, "yahoo_answers": 100_000}


def planned_steps(cfg: RunConfig) -> int | None:
    """A run's optimiser steps, all clients and rounds together (None: its dataset's size is not known).

    Per round each trained client makes ``local_steps`` steps, else ``local_epochs`` passes over its share of
    the train split (an even share; one more step per client for its last, partial batch).
    """
    sizes = [n for n in (TRAIN_SIZES.get(cfg.dataset), cfg.max_train_samples) if n]
    if not sizes:
        return None
    clients = max(1, round(cfg.num_clients * cfg.participation))
    if cfg.local_steps:
        per_round = clients * cfg.local_steps
    else:
        share = min(sizes) * clients / cfg.num_clients
        per_round = cfg.local_epochs * (math.ceil(share / cfg.batch_size) + clients)
    return cfg.rounds * per_round


@dataclass
class GpuEstimate:
    """GPU hours of planned runs: each run's training steps times its model's measured step time."""

    runs: int
    steps: int
    hours: float | None  # None: no measured step time (or none for some model or dataset)
    gpu: str = ""
    date: str = ""
    missing: list[str] = field(default_factory=list)  # models without a step time, datasets without a size

    def line(self) -> str:
        if self.hours is None and not self.gpu:
            return "GPU hours: unknown until `make gpu-check` has measured a step time on a GPU"
        if self.hours is None:
            return (f"GPU hours: unknown: results/perf/gpu.json ({self.gpu}) has nothing for "
                    f"{', '.join(self.missing)}")
        return (f"GPU hours: about {self.hours:.1f} h on one {self.gpu} for the {self.runs} planned runs "
                f"({self.steps:,} training steps at the step times `make gpu-check` measured on {self.date}; "
                f"evaluation passes not counted)")


def gpu_estimate(runs: list[PlannedRun], path: Path = GPU_TIMES) -> GpuEstimate:
    """The GPU hours of ``runs`` from ``path``'s step times (``{"models": {name: {"step_s", "batch_size"}}}``),
    a step's time scaled linearly to the run's batch size."""
    steps = [planned_steps(run.config) for run in runs]
    total_steps = sum(s or 0 for s in steps)
    try:
        measured = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return GpuEstimate(len(runs), total_steps, None)
    models = measured.get("models") or {}
    seconds, missing = 0.0, set()
    for run, n in zip(runs, steps):
        cfg = run.config
        step = models.get(cfg.model)
        if step is None or n is None:
            missing.add(f"model {cfg.model}" if step is None else f"dataset {cfg.dataset}")
            continue
        seconds += n * float(step["step_s"]) * cfg.batch_size / int(step["batch_size"])
    hours = None if missing else seconds / 3600
    return GpuEstimate(len(runs), total_steps, hours, str(measured.get("gpu") or "GPU"),
                       str(measured.get("date") or "an unrecorded date"), sorted(missing))


def pending(runs: list[PlannedRun], retry_failed: bool = False) -> list[PlannedRun]:
    """Runs whose results record is absent (or failed, with ``retry_failed``)."""
    todo = []
    for run in runs:
        record = read_record(run.result_path)
        if record is None or (retry_failed and record.get("status") == "failed"):
            todo.append(run)
    return todo


def run_sweep(
    runs: list[PlannedRun],
    jobs: int | None = 1,
    runner: Runner | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    backend: str = "local",
    ray_options: RayOptions | None = None,
) -> SweepSummary:
    """Run what is missing of ``runs``: in ``jobs`` local processes, or as Ray tasks (``backend="ray"``,
    at most ``jobs`` at a time, None: as many as the cluster holds). Failures are recorded and skipped over."""
    from tqdm.auto import tqdm

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (valid: {', '.join(BACKENDS)})")
    runner = runner or run_one
    todo = pending(runs, retry_failed)
    summary = SweepSummary(planned=len(runs), skipped=len(runs) - len(todo))
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=not progress or not todo, file=sys.stderr)
    say = log or bar.write

    def done(run_id: str, record: dict[str, Any], seconds: float) -> None:
        summary.ran += 1
        status = record.get("status", "failed")
        acc = record.get("final_accuracy")
        if status == "failed":
            summary.failed.append((run_id, str(record.get("error"))))
        elif status == "diverged":
            summary.diverged.append(run_id)
        elif status == "lost":
            summary.lost.append((run_id, str(record.get("error"))))
        elif status == "locked":
            summary.locked.append((run_id, str(record.get("error"))))
            say(f"[  locked] {run_id}: skipped: {record.get('error')}")
            bar.update(1)
            return
        acc_text = f"{acc:.4f}" if isinstance(acc, (int, float)) else "-"
        say(f"[{status:>8}] {run_id}  accuracy {acc_text}  {seconds:.0f}s")
        bar.update(1)

    try:
        if backend == "ray":
            from ilora.ray_sweep import RayOptions, run_on_ray

            run_on_ray(todo, runner, _execute_in_worker, done, ray_options or RayOptions(), jobs, say)
        else:
            _run_local(todo, jobs or 1, runner, done)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - t0
    return summary


def _run_local(todo: list[PlannedRun], jobs: int, runner: Runner,
               done: Callable[[str, dict[str, Any], float], None]) -> None:
    """The local backend: one after another, or in a pool of ``jobs`` spawned processes."""
    if jobs <= 1 or len(todo) <= 1:
        for run in todo:
            done(*_execute(runner, run.config, run.run_id))
        return
    ctx = get_context("spawn")
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_pool_worker_init, initargs=(jobs,))
    try:
        futures: set[Future] = {pool.submit(_execute, runner, r.config, r.run_id) for r in todo}
        while futures:
            finished, futures = wait(futures, return_when=FIRST_COMPLETED)
            for fut in finished:
                done(*fut.result())
    except BaseException:  # interrupted: drop what has not started, stop what runs (records are
        workers = list((getattr(pool, "_processes", None) or {}).values())  # all-or-nothing; a run
        pool.shutdown(wait=False, cancel_futures=True)  # resumes from its round checkpoint)
        for process in workers:
            process.terminate()
        for process in workers:
            process.join(timeout=10)
        pool.shutdown(wait=True)  # the pool's queues go with it (no leaked semaphores at exit)
        raise
    pool.shutdown()
