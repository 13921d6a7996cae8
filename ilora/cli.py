"""The ``ilora`` command line: ``run``, ``export``, ``list``, ``data``, ``sweep``, ``report`` and ``compare``."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from pathlib import Path
from typing import Any

# importing ilora sets the OpenMP defaults before torch (ilora/__init__.py)
from ilora.errors import RunInterrupted, UserError


def cmd_run(args: argparse.Namespace) -> int:
    """One run; its progress, status and summary all go to stderr (stdout stays free for data)."""
    from ilora.benchmark import read_record
    from ilora.config import resolve_config
    from ilora.runner import run_id_for

    if args.benchmark:
        from ilora.benchmark import load_benchmark, select_cell

        preset = args.preset or "cpu"
        _check_preset(preset)
        cell = select_cell(load_benchmark(args.benchmark), preset, args.overrides)
        cfg = cell.config
        print(f"cell {' '.join(f'{k}={v}' for k, v in cell.labels.items())} of {args.benchmark} ({preset} preset)",
              file=sys.stderr)
    else:
        if args.preset:
            raise UserError("--preset goes with --benchmark; for a single run give preset=NAME")
        cfg = resolve_config(args.overrides)
    path = os.path.join(cfg.out_dir, run_id_for(cfg), "result.json")
    existing = read_record(Path(path))
    if existing is not None and not args.force:
        print(f"already done ({existing.get('status')}): {path} (--force runs it again)", file=sys.stderr)
        return after_the_fact(cfg, existing, Path(path).parent)
    from ilora.locks import RunLocked, acquire, release

    try:
        lock = acquire(Path(path).parent)
    except RunLocked as exc:
        print(f"skipped: {exc}; rerun when it is done", file=sys.stderr)
        return 1
    try:
        return _run_locked(cfg, args, path, existing)
    finally:
        release(lock)


def after_the_fact(cfg: Any, record: dict, run_dir: Path) -> int:
    """A finished run asked again with ``wandb=...`` or ``export=...``: mirror or export it from its record and
    saved model, without training."""
    if cfg.wandb != "disabled":
        from ilora.tracking import create_tracker

        tracker = create_tracker(cfg, record["run_id"])
        for row in record.get("rounds") or []:
            tracker.log_round(row)
        tracker.finish(record)
        print(f"mirrored the finished run to W&B ({cfg.wandb}) from its record", file=sys.stderr)
    if cfg.export != "none":
        from ilora.export import default_export_dir, export_run

        export_run(run_dir, cfg.export)
        print(f"exported the finished run's model: {default_export_dir(run_dir, cfg.export)}", file=sys.stderr)
    return 0 if record.get("status") == "ok" else 1


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a run's saved model or an export on the run's test split; 0 when it equals the record."""
    from ilora.evaluate import evaluate_path

    score = evaluate_path(Path(args.path))
    print(score.line())
    return 0 if score.matches else 1


def _run_locked(cfg: Any, args: argparse.Namespace, path: str, existing: dict | None) -> int:
    from ilora.runner import run_experiment, run_id_for
    from ilora.tracking import create_tracker

    if existing is not None:
        os.remove(path)
    tracker = create_tracker(cfg, run_id_for(cfg))
    record = None
    try:
        if cfg.engine == "flower":
            from ilora.flower.simulation import run_on_flower

            record = run_on_flower(cfg, tracker=tracker)
        else:
            record = run_experiment(cfg, tracker=tracker)
    finally:
        tracker.finish(record)
    rounds = record["rounds"]
    if record["status"] == "diverged":
        reason = f": {record['error']}" if record.get("error") else ""
        print(f"run diverged at round {record.get('diverged_round') or len(rounds)}{reason}", file=sys.stderr)
    elif record["status"] != "ok":
        print(f"run {record['status']}: {record['error']}", file=sys.stderr)
    if rounds and record["status"] == "ok":
        last = rounds[-1]
        compute = sum(r["compute_s"] for r in rounds)
        wall = sum(r["wall_s"] for r in rounds)
        print(
            f"{cfg.method} on {cfg.dataset}/{cfg.model}: final accuracy {last['accuracy']:.4f} "
            f"(best {record['best_accuracy']:.4f}), {len(rounds)} rounds in {wall:.1f}s, "
            f"{max(0.0, 100 * (1 - compute / wall)):.1f}% outside forward/backward/optimizer steps",
            file=sys.stderr,
        )
    print(f"results record: {path}", file=sys.stderr)
    if cfg.preset in ("smoke", "quick"):
        print(f"({cfg.preset} preset: a first look that it runs, not a result; the cpu preset is the regime the "
              "tables use)", file=sys.stderr)
    if not cfg.pretrained:
        size = record.get("backbone_parameters")
        print(f"(pretrained=false: a dry run of {cfg.model} at full size"
              + (f" ({size:,} backbone parameters)" if size else "")
              + " with random weights; it proves the path runs, it is not a result)", file=sys.stderr)
    if cfg.export != "none" and record["status"] == "ok":
        print(f"exported ({cfg.export}): {os.path.join(cfg.out_dir, run_id_for(cfg), 'export', cfg.export)}",
              file=sys.stderr)
    return 0 if record["status"] == "ok" else 1


def cmd_export(args: argparse.Namespace) -> int:
    """A finished run's global model as a PEFT adapter or merged weights (the files on stdout)."""
    from ilora.export import export_run

    for path in export_run(Path(args.run_dir), args.format, Path(args.out) if args.out else None):
        print(path)
    return 0


def method_option_rows() -> list[list[str]]:
    """Every registered method's own options (its config dataclass): name, type and default."""
    import dataclasses

    from ilora.algorithm import available_algorithms, get_algorithm

    rows = []
    for name in available_algorithms():
        fields = dataclasses.fields(get_algorithm(name).Config)
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            rows.append([name, f.name, kind, repr(default)])
        if not fields:
            rows.append([name, "(none)", "", ""])
    return rows


def federated_option_rows() -> list[list[str]]:
    """Per method at its default options: which server optimisers and DP levels it takes, and how it fares
    under additive secure aggregation (docs/optimisers.md, docs/privacy.md)."""
    from ilora.algorithm import SECURE_AGGREGATION, Algorithm, available_algorithms, get_algorithm

    rows = []
    for name in available_algorithms():
        cls = get_algorithm(name)
        config = cls.Config()
        kind, why = cls.aggregation(config)
        stateful = cls.server_state_problem(config) is None
        client_dp = stateful and kind == "weighted_sum" and not getattr(config, "control_variates", False)
        sample_dp = cls.initialize is Algorithm.initialize and not getattr(config, "control_variates", False)
        rows.append([name, "all" if stateful else "fedavg only", "yes" if client_dp else "no",
                     "yes" if sample_dp else "no", SECURE_AGGREGATION[kind], why])
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from ilora.algorithm import available_algorithms, get_algorithm
    from ilora.config import available_presets
    from ilora.data import available_datasets
    from ilora.models import available_models

    methods = []
    for n in available_algorithms():
        cls = get_algorithm(n)
        methods.append([n, cls.info.display_name, ", ".join(cls.info.groups), cls.info.comm_text,
                        (cls.__doc__ or "").strip().splitlines()[0]])
    print(tabulate(methods, headers=["method", "name", "groups", "per layer and client", "what it does"]),
          end="\n\n")
    print(tabulate(method_option_rows(), headers=["method", "option (method_args.<option>=...)", "type", "default"]),
          end="\n\n")
    print(tabulate(federated_option_rows(), headers=["method", "server_optimizer", "dp=client", "dp=sample",
                                                     "secure aggregation", "why"]), end="\n\n")
    datasets = [[n, k, "yes" if off else "needs the HF cache"] for n, (k, off) in available_datasets().items()]
    print(tabulate(datasets, headers=["dataset", "kind", "offline"]), end="\n\n")
    models = [[n, k, "yes" if off else "needs the HF cache"] for n, (k, off) in available_models().items()]
    print(tabulate(models, headers=["model", "kind", "offline"]), end="\n\n")
    print("presets: " + ", ".join(available_presets()))
    return 0


# ------------------------------------------------------------------------------------ benchmarks
def _split(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional words into benchmark names and ``key=value`` overrides."""
    names = [i for i in items if "=" not in i]
    return names, [i for i in items if "=" in i]


def _check_jobs(jobs: int | None) -> None:
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")


def _check_run_options(args: argparse.Namespace) -> None:
    """``--jobs``, ``--backend``, ``--address`` and ``--cpus-per-run``, before anything runs or is written."""
    _check_jobs(args.jobs)
    if args.cpus_per_run is not None and args.cpus_per_run < 1:
        raise UserError(f"--cpus-per-run must be at least 1, got {args.cpus_per_run}")
    if args.gpus_per_run is not None and not 0 < args.gpus_per_run <= 1:
        raise UserError(f"--gpus-per-run must be in (0, 1], got {args.gpus_per_run}")
    if args.backend != "ray":
        if args.address is not None or args.cpus_per_run is not None or args.gpus_per_run is not None:
            raise UserError("--address, --cpus-per-run and --gpus-per-run need --backend ray (valid backends: "
                            "local, ray)")
        return
    from ilora.ray_sweep import RayOptions, check_address

    check_address(RayOptions(args.address))


def _backend(args: argparse.Namespace) -> dict[str, Any]:
    """``run_sweep``'s keyword arguments for the backend options."""
    if args.backend == "ray":
        from ilora.ray_sweep import RayOptions

        return {"backend": "ray", "jobs": args.jobs, "ray_options": RayOptions(args.address, args.cpus_per_run,
                                                                          gpus_per_run=args.gpus_per_run or 1.0)}
    return {"backend": "local", "jobs": args.jobs or 1}


def _parallelism(args: argparse.Namespace) -> str:
    """How the runs of a sweep share the machine(s), for its first line."""
    from ilora.sweep import threads_per_job

    if args.backend == "ray":
        from ilora.ray_sweep import RayOptions

        target = RayOptions(args.address).target()
        where = "a new local Ray instance" if target == "local" else f"the Ray cluster at {target}"
        cpus = str(args.cpus_per_run) if args.cpus_per_run else "its threads (1 for auto)"
        limit = f", at most {args.jobs} at a time" if args.jobs else ""
        gpus = f"{args.gpus_per_run:g}" if args.gpus_per_run else "1"
        return f"on {where}, per run {cpus} CPU(s) + {gpus} GPU if the cluster has GPUs{limit}"
    jobs = args.jobs or 1
    return f"{jobs} job(s) x {threads_per_job(jobs)} thread(s)"


def _check_preset(preset: str) -> None:
    from ilora.benchmark import SWEEP_PRESETS

    if preset not in SWEEP_PRESETS:
        raise UserError(f"unknown preset {preset!r} (valid: {', '.join(SWEEP_PRESETS)})")


def cmd_sweep(args: argparse.Namespace) -> int:
    from ilora.benchmark import default_out_dir, expand, plan, resolve_benchmarks
    from ilora.sweep import GPU_TIMES, make_plan, run_sweep

    _check_preset(args.preset)
    _check_run_options(args)
    _check_wandb(args)
    names, overrides = _split(args.items)
    benches = resolve_benchmarks(names)
    if args.report:
        from ilora.report import guard_committed

        guard_committed(Path(args.results_dir), args.preset, args.out_dir, args.overwrite_results)
    runs = plan(benches, args.preset, overrides, args.out_dir)
    out = args.out_dir or default_out_dir(args.preset)
    print(f"{len(benches)} benchmark(s), {len(runs)} distinct runs, preset {args.preset}, "
          f"{_parallelism(args)}, records under {out}", file=sys.stderr)
    members = {b.name: [r.run_id for r in expand(b, args.preset, overrides, args.out_dir)] for b in benches}
    reasons = {b.name: b.presets.get(args.preset, {}).get("dropped") or "no grid" for b in benches}
    gpu_times = GPU_TIMES if args.preset == "paper" else None  # the paper grid's GPU hours
    for line in make_plan(runs, members, args.jobs or 1, args.retry_failed, gpu_times).lines(args.jobs or 1, reasons):
        print(line, file=sys.stderr)
    if args.plan:
        return 0
    summary = run_sweep(runs, retry_failed=args.retry_failed, **_backend(args))
    print(summary.line(), file=sys.stderr)
    if args.report:
        written = _report(args, benches, overrides)
        print(f"report: {len(written)} files under {args.results_dir}/", file=sys.stderr)
        return max(_unfinished(runs), _report_gaps(written))
    return _unfinished(runs)


def _unfinished(runs: list[Any]) -> int:
    """Name every planned run whose record says failed or diverged (also from earlier sweeps); 1 if any."""
    from ilora.benchmark import read_record

    bad = []
    for run in runs:
        record = read_record(run.result_path) or {}
        if not record:  # e.g. a Ray task that ran out of retries: its checkpoint stays
            bad.append(f"  missing: {run.run_id}: no results record (rerun the same command to resume it)")
        if record.get("status") in ("failed", "diverged"):
            rounds = len(record.get("rounds") or [])
            detail = record.get("error") if record["status"] == "failed" else \
                f"diverged at round {record.get('diverged_round') or rounds}" + \
                (f" ({record['error']})" if record.get("error") else "")
            bad.append(f"  {record['status']}: {run.run_id}: {detail}")
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


def cmd_report(args: argparse.Namespace) -> int:
    from ilora.benchmark import resolve_benchmarks

    _check_preset(args.preset)
    _check_wandb(args)
    names, overrides = _split(args.items)
    benches = resolve_benchmarks(names)
    written = _report(args, benches, overrides, plots=not args.no_plots)
    for path in written:
        print(path)
    return _report_gaps(written)


def _report_gaps(written: Any) -> int:
    """Say which tables were left alone (no records) and which are partial; 1 if any was left alone."""
    for name, runs in getattr(written, "missing", {}).items():
        print(f"partial: {name}: {len(runs)} planned runs have no record: {'; '.join(runs[:6])}"
              + (f"; and {len(runs) - 6} more" if len(runs) > 6 else ""), file=sys.stderr)
    for name in getattr(written, "skipped", []):
        print(f"not written: {name}: none of its planned runs has a record (its table and plots are left as "
              "they were; run the sweep first, or give --out-dir)", file=sys.stderr)
    return 1 if getattr(written, "skipped", []) else 0


def _check_wandb(args: argparse.Namespace) -> None:
    """``--wandb`` (sweep: with ``--report`` only; online: an API key), before anything is written."""
    if args.wandb is None:
        return
    if not getattr(args, "report", True):
        raise UserError("--wandb logs the report: give --report too (the runs themselves: the wandb=offline "
                        "override)")
    from ilora.config import check_writable_dir
    from ilora.wandb_report import check_mode

    check_mode(args.wandb)
    if args.wandb_dir:
        check_writable_dir("--wandb-dir", args.wandb_dir)


def _report(args: argparse.Namespace, benches: list[Any], overrides: list[str], plots: bool = True) -> list[Path]:
    """The tables and plots; with ``--wandb``, also logged as one W&B run (where it is goes to stderr)."""
    from ilora.report import report

    built: list[Any] = []
    written = report(benches, args.preset, overrides, args.out_dir, Path(args.results_dir), plots=plots,
                     built=built if args.wandb else None, overwrite=args.overwrite_results)
    if args.wandb:
        from ilora.wandb_report import default_directory, log_report

        directory = Path(args.wandb_dir) if args.wandb_dir else default_directory(args.preset, args.out_dir)
        logged = log_report(built, written, args.preset, Path(args.results_dir), args.wandb, args.wandb_project,
                            directory, overrides)
        for line in logged.lines():
            print(line, file=sys.stderr)
    return written


def cmd_compare(args: argparse.Namespace) -> int:
    """Every registered method on one setting (``benchmarks/compare.yaml``): sweep, rank, plot."""
    from tabulate import tabulate

    from ilora.benchmark import expand, load_benchmark
    from ilora.report import (
        NOT_THE_REGIME,
        build_table,
        collect,
        guard_committed,
        plot_communication,
        plot_rounds,
        rankings,
        write_table,
    )
    from ilora.sweep import run_sweep

    _check_preset(args.preset)
    _check_run_options(args)
    guard_committed(Path(args.results_dir), args.preset, args.out_dir, args.overwrite_results)
    bench = load_benchmark(args.benchmark)
    runs = expand(bench, args.preset, args.overrides, args.out_dir)
    summary = run_sweep(runs, retry_failed=args.retry_failed, **_backend(args))
    print(summary.line(), file=sys.stderr)
    df = collect(runs)
    for cell, ranked in rankings(bench, args.preset, df):
        first = next(r.config for r in runs if all(r.labels.get(k) == v for k, v in cell.items()))
        setting = ", ".join(f"{k} {v}" for k, v in cell.items())
        print(f"\n{bench.title}{': ' + setting if setting else ''} ({first.dataset} / {first.model}, ranks "
              f"{list(first.ranks)}, Dirichlet {first.dirichlet_alpha}, {first.rounds} rounds; "
              f"{args.preset} preset)\n")
        if args.preset in NOT_THE_REGIME:
            print(NOT_THE_REGIME[args.preset] + "\n")
        print(tabulate(ranked, headers="keys", showindex=False, floatfmt=".2f"))
    print("\ngroup: top = the leader and every method whose paired 95% interval against it contains 0 "
          "(not distinguishable from it); below = outside it.")
    results = Path(args.results_dir)
    written = write_table(build_table(bench, args.preset, df), bench.name, args.preset,
                          results / "tables" / args.preset, bench.description)
    written += plot_rounds(bench, args.preset, df, results / "plots" / args.preset / f"{bench.name}_rounds")
    written += plot_communication(bench, args.preset, df,
                                  results / "plots" / args.preset / f"{bench.name}_communication")
    print("\nwritten: " + ", ".join(str(p) for p in written))
    return _unfinished(runs)


def _common_options(parser: argparse.ArgumentParser, run: bool) -> None:
    """Options shared by ``sweep``, ``report`` and ``compare`` (``run``: those that launch runs)."""
    parser.add_argument("--preset", default="cpu", help="paper | cpu | quick | smoke (default cpu)")
    if run:
        parser.add_argument("--jobs", type=int, default=None,
                            help="parallel processes (CPU threads are split; default 1); "
                                 "with --backend ray: the most runs at a time (default: as many as fit)")
        parser.add_argument("--backend", default="local", choices=("local", "ray"),
                            help="local: a process pool on this machine (default); ray: one Ray task per run "
                                 "(docs/ray.md)")
        parser.add_argument("--address", default=None,
                            help="--backend ray: the cluster's HOST:PORT (default $RAY_ADDRESS, else a new local "
                                 "Ray instance)")
        parser.add_argument("--cpus-per-run", type=int, default=None,
                            help="--backend ray: CPUs each run declares (default its threads setting, auto: 1)")
        parser.add_argument("--gpus-per-run", type=float, default=None,
                            help="--backend ray on GPUs: the share of a GPU each run declares (default 1; 0.25: four "
                                 "stand-in runs share one GPU)")
        parser.add_argument("--retry-failed", action="store_true", help="also redo runs recorded as failed")
    parser.add_argument("--out-dir", default=None,
                        help="where run records live (default results/records/<preset> for cpu and paper, whose "
                             "records are committed; runs/<preset> otherwise)")
    parser.add_argument("--results-dir", default="results", help="where tables and plots go")
    parser.add_argument("--overwrite-results", action="store_true",
                        help="allow replacing the committed cpu/paper tables in results/ from records other than "
                             "the committed ones under results/records/<preset>")


def _wandb_options(parser: argparse.ArgumentParser) -> None:
    """``--wandb [offline|online]``, ``--wandb-project``, ``--wandb-dir``: the report as a W&B run (docs/wandb.md)."""
    parser.add_argument("--wandb", nargs="?", const="offline", default=None, choices=("offline", "online"),
                        help="also log the report's tables, plots and files as one W&B run (default offline)")
    parser.add_argument("--wandb-project", default="ilora-bench", help="W&B project of the report run")
    parser.add_argument("--wandb-dir", default=None,
                        help="where the report run's W&B files go (default the records directory; W&B adds wandb/)")


def add_sweep_parsers(sub: Any) -> None:
    """``ilora sweep``, ``ilora report`` and ``ilora compare``."""
    sweep = sub.add_parser("sweep", help="run benchmark grids: ilora sweep BENCHMARK... --preset P --jobs N")
    sweep.add_argument("items", nargs="*", help="benchmark names (or all), then key=value overrides")
    _common_options(sweep, run=True)
    sweep.add_argument("--report", action="store_true", help="build the tables and plots afterwards")
    sweep.add_argument("--plan", action="store_true",
                       help="print the plan (runs per benchmark, what is left, the expected time) and stop")
    _wandb_options(sweep)
    sweep.set_defaults(func=cmd_sweep)

    rep = sub.add_parser("report", help="tables and plots from the results records")
    rep.add_argument("items", nargs="*", help="benchmark names (default all), then key=value overrides")
    _common_options(rep, run=False)
    rep.add_argument("--no-plots", action="store_true", help="tables only")
    _wandb_options(rep)
    rep.set_defaults(func=cmd_report)

    cmp_ = sub.add_parser("compare", help="all methods on one setting: run, rank, plot")
    cmp_.add_argument("overrides", nargs="*", help="key=value overrides of the setting, e.g. dataset=tweets")
    cmp_.add_argument("--benchmark", default="compare", help="the benchmark holding the setting")
    _common_options(cmp_, run=True)
    cmp_.set_defaults(func=cmd_compare)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``, exit 2), for every subcommand too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {one_line(message)} (see: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


# Errors of a path's shape, not of the machine: a name too long, a file where a directory is expected, ...
BAD_PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP, errno.EINVAL, errno.EISDIR})


def one_line(message: object) -> str:
    """``message`` as one printable line: a user's input echoed in it may hold line breaks or control
    characters (a newline, U+0085, U+2028, ...), which are shown escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(message))


# The positional list of each command that takes ``key=value`` overrides (they may also come after options).
_OVERRIDE_LISTS = ("overrides", "items")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, accepting ``key=value`` overrides anywhere on the line, also after the options."""
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if "=" not in e or e.startswith("-")]
    target = next((name for name in _OVERRIDE_LISTS if isinstance(getattr(args, name, None), list)), None)
    if unknown or (extra and target is None):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        getattr(args, target).extend(extra)
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ilora", description="Federated LoRA benchmark suite")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment: ilora run [key=value ...]")
    run.add_argument("overrides", nargs="*", help="config overrides, e.g. method=ilora rounds=3 ranks=[2,4,6]")
    run.add_argument("--force", action="store_true", help="run again even if the run's record exists")
    run.add_argument("--benchmark", default=None,
                     help="run one table cell exactly as the sweep does (same config, run id and record): "
                          "ilora run --benchmark NAME --preset P axis=label ...")
    run.add_argument("--preset", default=None, help="with --benchmark: the preset of the grid (default cpu)")
    run.set_defaults(func=cmd_run)
    export = sub.add_parser("export", help="a finished run's final model as a PEFT adapter or merged weights")
    export.add_argument("run_dir", metavar="RUN_DIR", help="the run's directory, e.g. runs/cpu/<run_id>")
    export.add_argument("--format", choices=["peft", "merged"], default="peft",
                        help="peft: adapter_config.json + adapter_model.safetensors (default); merged: full weights")
    export.add_argument("--out", default=None, help="where to write (default RUN_DIR/export/<format>)")
    export.set_defaults(func=cmd_export)
    evaluation = sub.add_parser("eval", help="score a finished run's model or an export on its test split")
    evaluation.add_argument("path", metavar="RUN_DIR|EXPORT_DIR",
                            help="a run's directory (result.json + global_model.safetensors) or an export's "
                                 "(export.json); exit 0 when the accuracy equals the record's")
    evaluation.set_defaults(func=cmd_eval)
    lst = sub.add_parser("list", help="registered methods, datasets, models and presets")
    lst.set_defaults(func=cmd_list)
    from ilora.datacli import add_data_parser

    add_data_parser(sub)
    add_sweep_parsers(sub)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a run or a sweep (and its workers) as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    from ilora.models.hub import offline_without_network
    from ilora.quiet import quiet_libraries

    if getattr(args, "data_command", None) != "prepare":  # prepare downloads: it must see the network as it is
        offline_without_network()
    quiet_libraries()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in BAD_PATH_ERRNOS:
            raise
        print(f"error: {one_line(exc.filename)}: {exc.strerror} (a path given on the command line)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (finished runs are kept; an unfinished run goes on "
              "from its last round's checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
