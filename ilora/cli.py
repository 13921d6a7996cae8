"""The ``ilora`` command line: ``run``, ``list``, ``data``, ``sweep``, ``report`` and ``compare``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

# importing ilora sets the OpenMP defaults before torch (ilora/__init__.py)
from ilora.errors import RunInterrupted, UserError


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def cmd_run(args: argparse.Namespace) -> int:
    """One run; its progress, status and summary all go to stderr (stdout stays free for data)."""
    from ilora.benchmark import read_record
    from ilora.config import resolve_config
    from ilora.runner import run_experiment, run_id_for
    from ilora.tracking import create_tracker

    cfg = resolve_config(args.overrides)
    path = os.path.join(cfg.out_dir, run_id_for(cfg), "result.json")
    existing = read_record(Path(path))
    if existing is not None and not args.force:
        print(f"already done ({existing.get('status')}): {path} (--force runs it again)", file=sys.stderr)
        return 0 if existing.get("status") == "ok" else 1
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
        print(f"run diverged at round {len(rounds)} (non-finite loss)", file=sys.stderr)
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
    return 0 if record["status"] == "ok" else 1


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


def _check_jobs(jobs: int) -> None:
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")


def _check_preset(preset: str) -> None:
    from ilora.benchmark import SWEEP_PRESETS

    if preset not in SWEEP_PRESETS:
        raise UserError(f"unknown preset {preset!r} (valid: {', '.join(SWEEP_PRESETS)})")


def cmd_sweep(args: argparse.Namespace) -> int:
    from ilora.benchmark import default_out_dir, plan, resolve_benchmarks
    from ilora.sweep import run_sweep, threads_per_job

    _check_preset(args.preset)
    _check_jobs(args.jobs)
    names, overrides = _split(args.items)
    benches = resolve_benchmarks(names)
    runs = plan(benches, args.preset, overrides, args.out_dir)
    out = args.out_dir or default_out_dir(args.preset)
    print(f"{len(benches)} benchmark(s), {len(runs)} distinct runs, preset {args.preset}, {args.jobs} job(s) "
          f"x {threads_per_job(args.jobs)} thread(s), records under {out}", file=sys.stderr)
    summary = run_sweep(runs, args.jobs, retry_failed=args.retry_failed)
    print(summary.line(), file=sys.stderr)
    if args.report:
        from ilora.report import report

        written = report(benches, args.preset, overrides, args.out_dir, Path(args.results_dir))
        print(f"report: {len(written)} files under {args.results_dir}/", file=sys.stderr)
    return _unfinished(runs)


def _unfinished(runs: list[Any]) -> int:
    """Name every planned run whose record says failed or diverged (also from earlier sweeps); 1 if any."""
    from ilora.benchmark import read_record

    bad = []
    for run in runs:
        record = read_record(run.result_path) or {}
        if record.get("status") in ("failed", "diverged"):
            rounds = len(record.get("rounds") or [])
            detail = record.get("error") if record["status"] == "failed" else f"diverged at round {rounds}"
            bad.append(f"  {record['status']}: {run.run_id}: {detail}")
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


def cmd_report(args: argparse.Namespace) -> int:
    from ilora.benchmark import resolve_benchmarks
    from ilora.report import report

    _check_preset(args.preset)
    names, overrides = _split(args.items)
    benches = resolve_benchmarks(names)
    written = report(benches, args.preset, overrides, args.out_dir, Path(args.results_dir),
                     plots=not args.no_plots)
    for path in written:
        print(path)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Every registered method on one setting (``benchmarks/compare.yaml``): sweep, rank, plot."""
    from tabulate import tabulate

    from ilora.benchmark import expand, load_benchmark
    from ilora.report import build_table, collect, plot_communication, plot_rounds, ranking, write_table
    from ilora.sweep import run_sweep

    _check_preset(args.preset)
    _check_jobs(args.jobs)
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
    return _unfinished(runs)


def _common_options(parser: argparse.ArgumentParser, run: bool) -> None:
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``, exit 2), for every subcommand too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


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
    run.set_defaults(func=cmd_run)
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
    _quiet_libraries()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
