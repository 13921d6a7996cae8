"""Benchmarks as data: expand a benchmark's grid into resolved runs, run the missing ones, resume.

A benchmark is one YAML under ``benchmarks/`` (one per paper table or figure)::

    name: nlp_dir05
    title: Text classification, Dirichlet alpha = 0.5
    table: {rows: [method], columns: [dataset], average: true}
    plots: [rounds, communication]
    presets:
      cpu:
        base: {model: minilm, dirichlet_alpha: 0.5, max_train_samples: 300}
        grid:
          dataset: [bbc_news, tweets]                  # a list: the axis is a config key
          method: [fedit, ilora]
          seed: [42]
      ...
    known:                                             # the paper's reported numbers (percent)
      - {preset: paper, cell: {method: ilora, dataset: average}, value: 85.02}

An axis given as a mapping names each value with a label and the overrides it stands for, e.g.
``optimizer: {sgd: {optimizer: sgd, lr: 0.01}, adamw: {optimizer: adamw, lr: 1.0e-4}}``. The axis
``seed`` is the one the report averages over. ``method: all`` stands for every registered method.

Each grid point becomes a ``RunConfig`` through ``resolve_config`` (the benchmark preset's
``configs/preset/<preset>.yaml``, then ``base``, then the axis overrides, then the command line's
``key=value`` overrides). Its run id is keyed by the resolved config, so a run is skipped when its
``result.json`` exists; runs shared by several benchmarks run once.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

from ilora.config import PUBLIC_KEYS, RunConfig, available_presets, resolve_config
from ilora.errors import ConfigError

BENCHMARK_ROOT = Path(__file__).resolve().parent.parent / "benchmarks"
SWEEP_PRESETS = ("paper", "cpu", "smoke")


@dataclass(frozen=True)
class Axis:
    """One grid dimension: ordered labels, each with the config overrides it stands for."""

    name: str
    values: dict[str, dict[str, Any]]


@dataclass
class Benchmark:
    name: str
    title: str
    description: str
    rows: list[str]
    columns: list[str]
    average: bool
    plots: list[str]
    presets: dict[str, dict[str, Any]]
    known: list[dict[str, Any]]
    path: Path
    x_axis: str | None = None  # the column axis plotted on x (e.g. dirichlet_alpha), if any
    reference: str | None = None  # the row label of the paired differences (default: fedit, if present)
    extra: list[str] = field(default_factory=list)  # per-run metrics shown next to accuracy (report.EXTRA_METRICS)
    in_all: bool = True  # part of ``all`` (``make reproduce-tables``); false: run by name only

    def axes(self, preset: str) -> list[Axis]:
        if preset not in self.presets:
            raise ConfigError(
                f"benchmark {self.name!r} has no preset {preset!r} (valid: {', '.join(self.presets)})"
            )
        grid = (self.presets[preset] or {}).get("grid") or {}
        return [_axis(self.name, name, spec) for name, spec in grid.items()]

    def base(self, preset: str) -> dict[str, Any]:
        self.axes(preset)  # validates the preset name
        return dict(self.presets[preset].get("base") or {})

    def runs_at(self, preset: str) -> bool:
        """Whether ``preset`` has a grid (a preset may only say what it ``dropped``)."""
        self.axes(preset)
        return bool(self.presets[preset].get("grid"))

    def known_for(self, preset: str) -> list[dict[str, Any]]:
        return [k for k in self.known if k.get("preset", "paper") == preset]


@dataclass
class PlannedRun:
    """One grid point: its labels (axis -> label), resolved config and run id."""

    benchmark: str
    labels: dict[str, str]
    config: RunConfig
    run_id: str

    @property
    def cell(self) -> dict[str, str]:
        return {k: v for k, v in self.labels.items() if k != "seed"}

    @property
    def result_path(self) -> Path:
        return Path(self.config.out_dir) / self.run_id / "result.json"


def _axis(bench: str, name: str, spec: Any) -> Axis:
    if name == "method" and spec == "all":
        from ilora.algorithm import available_algorithms

        spec = list(available_algorithms())
    if isinstance(spec, dict):
        values = {}
        for label, overrides in spec.items():
            if not isinstance(overrides, dict):
                raise ConfigError(f"benchmark {bench}: axis {name!r} label {label!r} must map to overrides")
            values[str(label)] = dict(overrides)
        return Axis(name, values)
    if isinstance(spec, list) and spec:
        if name not in PUBLIC_KEYS:
            raise ConfigError(
                f"benchmark {bench}: axis {name!r} is not a config key; give it as a mapping "
                f"label -> overrides (config keys: {', '.join(PUBLIC_KEYS)})"
            )
        return Axis(name, {_label(v): {name: v} for v in spec})
    raise ConfigError(f"benchmark {bench}: axis {name!r} must be a non-empty list or a mapping")


def _label(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def available_benchmarks(root: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (root or BENCHMARK_ROOT).glob("*.yaml"))


def load_benchmark(name: str, root: Path | None = None) -> Benchmark:
    """A benchmark by name (``benchmarks/<name>.yaml``) or by path to a YAML file."""
    root = root or BENCHMARK_ROOT
    path = Path(name) if name.endswith((".yaml", ".yml")) else root / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown benchmark {name!r} (valid: {', '.join(available_benchmarks(root))})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"benchmark {path}: cannot parse: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict) or "presets" not in data:
        raise ConfigError(f"benchmark {path}: must be a mapping with a 'presets' section")
    table = data.get("table") or {}
    bench = Benchmark(
        name=str(data.get("name", path.stem)),
        title=str(data.get("title", path.stem)),
        description=str(data.get("description", "")).strip(),
        rows=list(table.get("rows", ["method"])),
        columns=list(table.get("columns", [])),
        average=bool(table.get("average", False)),
        plots=list(data.get("plots", ["rounds", "communication"])),
        presets=dict(data["presets"]),
        known=list(data.get("known") or []),
        path=path,
        x_axis=table.get("x_axis"),
        reference=table.get("reference"),
        extra=list(table.get("extra") or []),
        in_all=bool(data.get("in_all", True)),
    )
    for preset in bench.presets:
        if not bench.runs_at(preset):
            continue
        axes = {a.name for a in bench.axes(preset)}
        missing = [a for a in bench.rows + bench.columns if a not in axes]
        if missing:
            raise ConfigError(f"benchmark {bench.name}: preset {preset!r} has no grid axis {missing[0]!r}")
    return bench


def resolve_benchmarks(names: list[str], root: Path | None = None) -> list[Benchmark]:
    """Benchmarks by name; ``all`` (or nothing) stands for every benchmark under ``benchmarks/`` that does
    not say ``in_all: false`` (studies run by name, e.g. the audit of the authors' baselines)."""
    names = names or ["all"]
    benches = []
    for name in names:
        if name == "all":
            benches += [b for b in (load_benchmark(n, root) for n in available_benchmarks(root)) if b.in_all]
        else:
            benches.append(load_benchmark(name, root))
    return list({b.name: b for b in benches}.values())  # each once, first mention's order


def _dotlist(overrides: dict[str, Any]) -> list[str]:
    out = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        out.append(f"{key}={text}")
    return out


def default_out_dir(preset: str) -> str:
    return os.path.join("runs", preset)


def expand(
    bench: Benchmark, preset: str, overrides: list[str] | None = None, out_dir: str | None = None
) -> list[PlannedRun]:
    """Every grid point of ``bench`` under ``preset`` as a resolved, validated run (none without a grid)."""
    if not bench.runs_at(preset):
        return []
    axes = bench.axes(preset)
    base = bench.base(preset)
    config_preset = base.pop("preset", preset if preset in available_presets() else "cpu")
    from ilora.runner import run_id_for

    out = out_dir or default_out_dir(preset)
    runs = []
    for combo in itertools.product(*(list(a.values.items()) for a in axes)):
        labels = {a.name: label for a, (label, _) in zip(axes, combo)}
        merged: dict[str, Any] = dict(base)
        for _, values in combo:
            merged.update(values)
        cell = "/".join(f"{k}={v}" for k, v in labels.items() if k not in ("seed", "method"))
        group = f"{bench.name}/{cell}" if cell else bench.name
        fixed = {"preset": config_preset, "progress": False, "wandb_group": group}
        cfg = _resolve(tuple(_dotlist(fixed) + _dotlist(merged) + list(overrides or []) + [f"out_dir={out}"]))
        runs.append(PlannedRun(bench.name, labels, cfg, run_id_for(cfg)))
    return runs


@functools.lru_cache(maxsize=4096)
def _resolve(overrides: tuple[str, ...]) -> RunConfig:
    """``resolve_config``, memoised: a report expands the same grids several times."""
    return resolve_config(list(overrides))


def plan(
    benches: list[Benchmark], preset: str, overrides: list[str] | None = None, out_dir: str | None = None
) -> list[PlannedRun]:
    """All runs of several benchmarks, each distinct run once (first benchmark wins)."""
    seen: set[str] = set()
    runs = []
    for bench in benches:
        for run in expand(bench, preset, overrides, out_dir):
            if run.run_id not in seen:
                seen.add(run.run_id)
                runs.append(run)
    return runs


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
    from ilora.runner import write_record

    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        record = runner(cfg)
    except Exception as exc:
        record = _failure_record(cfg, run_id, exc, started)
        write_record(Path(cfg.out_dir) / run_id, record)
    return run_id, record, time.perf_counter() - t0


def _worker_init(jobs: int) -> None:
    os.environ["ILORA_JOBS"] = str(jobs)  # threads=auto in each run: the cores divided by the jobs
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


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
    seconds: float = 0.0

    def line(self) -> str:
        text = (f"{self.planned} runs: {self.skipped} already done, {self.ran} run now in {self.seconds:.0f}s"
                f" ({len(self.failed)} failed, {len(self.diverged)} diverged)")
        return text


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
    jobs: int = 1,
    runner: Runner | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> SweepSummary:
    """Run what is missing of ``runs`` in ``jobs`` processes; failures are recorded and skipped over."""
    from tqdm.auto import tqdm

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
        acc_text = f"{acc:.4f}" if isinstance(acc, (int, float)) else "-"
        say(f"[{status:>8}] {run_id}  accuracy {acc_text}  {seconds:.0f}s")
        bar.update(1)

    try:
        if jobs <= 1 or len(todo) <= 1:
            for run in todo:
                done(*_execute(runner, run.config, run.run_id))
        else:
            ctx = get_context("spawn")
            pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                       initargs=(jobs,))
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
                raise
            pool.shutdown()
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - t0
    return summary


# ------------------------------------------------------------------------------------ command line
def _split(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional words into benchmark names and ``key=value`` overrides."""
    names = [i for i in items if "=" not in i]
    return names, [i for i in items if "=" in i]


def _check_preset(preset: str) -> None:
    if preset not in SWEEP_PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (valid: {', '.join(SWEEP_PRESETS)})")


def cmd_sweep(args: Any) -> int:
    _check_preset(args.preset)
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    names, overrides = _split(args.items)
    benches = resolve_benchmarks(names)
    runs = plan(benches, args.preset, overrides, args.out_dir)
    out = args.out_dir or default_out_dir(args.preset)
    print(f"{len(benches)} benchmark(s), {len(runs)} distinct runs, preset {args.preset}, {args.jobs} job(s) "
          f"x {threads_per_job(args.jobs)} thread(s), records under {out}", file=sys.stderr)
    summary = run_sweep(runs, args.jobs, retry_failed=args.retry_failed)
    print(summary.line(), file=sys.stderr)
    for run_id, error in summary.failed:
        print(f"  failed: {run_id}: {error}", file=sys.stderr)
    if args.report:
        from ilora.report import report

        written = report(benches, args.preset, overrides, args.out_dir, Path(args.results_dir))
        print(f"report: {len(written)} files under {args.results_dir}/", file=sys.stderr)
    return 0


def cmd_report(args: Any) -> int:
    from ilora.report import report

    _check_preset(args.preset)
    names, overrides = _split(args.items)
    benches = resolve_benchmarks(names)
    written = report(benches, args.preset, overrides, args.out_dir, Path(args.results_dir),
                     plots=not args.no_plots)
    for path in written:
        print(path)
    return 0


def cmd_compare(args: Any) -> int:
    """Every registered method on one setting (``benchmarks/compare.yaml``): sweep, rank, plot."""
    from tabulate import tabulate

    from ilora.report import build_table, collect, plot_communication, plot_rounds, ranking, write_table

    _check_preset(args.preset)
    bench = load_benchmark(args.benchmark)
    runs = expand(bench, args.preset, args.overrides, args.out_dir)
    summary = run_sweep(runs, args.jobs, retry_failed=args.retry_failed)
    print(summary.line(), file=sys.stderr)
    df = collect(runs)
    first = runs[0].config
    print(f"\n{bench.title}: {first.dataset} / {first.model}, ranks {list(first.ranks)}, "
          f"Dirichlet {first.dirichlet_alpha}, {first.rounds} rounds ({args.preset} preset)\n")
    print(tabulate(ranking(df), headers="keys", showindex=False, floatfmt=".2f"))
    results = Path(args.results_dir)
    written = write_table(build_table(bench, args.preset, df), bench.name, args.preset,
                          results / "tables" / args.preset, bench.description)
    written += plot_rounds(bench, args.preset, df, results / "plots" / args.preset / f"{bench.name}_rounds")
    written += plot_communication(bench, args.preset, df,
                                  results / "plots" / args.preset / f"{bench.name}_communication")
    print("\nwritten: " + ", ".join(str(p) for p in written))
    return 0 if not summary.failed else 1


def _common_options(parser: Any, run: bool) -> None:
    """Options shared by ``sweep``, ``report`` and ``compare`` (``run``: those that launch runs)."""
    parser.add_argument("--preset", default="cpu", help="paper | cpu | smoke (default cpu)")
    if run:
        parser.add_argument("--jobs", type=int, default=1, help="parallel processes (CPU threads are split)")
        parser.add_argument("--retry-failed", action="store_true", help="also redo runs recorded as failed")
    parser.add_argument("--out-dir", default=None, help="where run records live (default runs/<preset>)")
    parser.add_argument("--results-dir", default="results", help="where tables and plots go")


def add_sweep_parsers(sub: Any) -> None:
    """``ilora sweep``, ``ilora report`` and ``ilora compare``."""
    sweep = sub.add_parser("sweep", help="run benchmark grids: ilora sweep BENCHMARK... --preset P --jobs N")
    sweep.add_argument("items", nargs="*", help="benchmark names (or all), then key=value overrides")
    _common_options(sweep, run=True)
    sweep.add_argument("--report", action="store_true", help="build the tables and plots afterwards")
    sweep.set_defaults(func=cmd_sweep)

    rep = sub.add_parser("report", help="tables and plots from the results records")
    rep.add_argument("items", nargs="*", help="benchmark names (default all), then key=value overrides")
    _common_options(rep, run=False)
    rep.add_argument("--no-plots", action="store_true", help="tables only")
    rep.set_defaults(func=cmd_report)

    cmp_ = sub.add_parser("compare", help="all methods on one setting: run, rank, plot")
    cmp_.add_argument("overrides", nargs="*", help="key=value overrides of the setting, e.g. dataset=tweets")
    cmp_.add_argument("--benchmark", default="compare", help="the benchmark holding the setting")
    _common_options(cmp_, run=True)
    cmp_.set_defaults(func=cmd_compare)
