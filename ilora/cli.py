"""The ``ilora`` command line: ``ilora run``, ``ilora list`` (and more as the suite grows)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ilora.errors import UserError  # importing ilora sets the OpenMP defaults before torch (ilora/__init__.py)


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
    from ilora.config import resolve_config
    from ilora.runner import run_experiment, run_id_for
    from ilora.tracking import create_tracker

    cfg = resolve_config(args.overrides)
    tracker = create_tracker(cfg, run_id_for(cfg))
    record = None
    try:
        record = run_experiment(cfg, tracker=tracker)
    finally:
        tracker.finish(record)
    path = os.path.join(cfg.out_dir, run_id_for(cfg), "result.json")
    rounds = record["rounds"]
    if record["status"] != "ok":
        print(f"run {record['status']}: {record['error'] or 'non-finite loss'}", file=sys.stderr)
    if rounds:
        last = rounds[-1]
        compute = sum(r["compute_s"] for r in rounds)
        wall = sum(r["wall_s"] for r in rounds)
        print(
            f"{cfg.method} on {cfg.dataset}/{cfg.model}: final accuracy {last['accuracy']:.4f} "
            f"(best {record['best_accuracy']:.4f}), {len(rounds)} rounds in {wall:.1f}s, "
            f"{100 * (1 - compute / wall):.1f}% outside forward/backward/optimizer steps"
        )
    print(f"results record: {path}")
    return 0 if record["status"] == "ok" else 1


def cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from ilora.algorithm import available_algorithms, get_algorithm
    from ilora.config import available_presets
    from ilora.data import available_datasets
    from ilora.models import available_models

    methods = [[n, (get_algorithm(n).__doc__ or "").strip().splitlines()[0]] for n in available_algorithms()]
    print(tabulate(methods, headers=["method", "what it does"]), end="\n\n")
    datasets = [[n, k, "yes" if off else "needs the HF cache"] for n, (k, off) in available_datasets().items()]
    print(tabulate(datasets, headers=["dataset", "kind", "offline"]), end="\n\n")
    models = [[n, k, "yes" if off else "needs the HF cache"] for n, (k, off) in available_models().items()]
    print(tabulate(models, headers=["model", "kind", "offline"]), end="\n\n")
    print("presets: " + ", ".join(available_presets()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ilora", description="Federated LoRA benchmark suite")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment: ilora run [key=value ...]")
    run.add_argument("overrides", nargs="*", help="config overrides, e.g. method=ilora rounds=3 ranks=[2,4,6]")
    run.set_defaults(func=cmd_run)
    lst = sub.add_parser("list", help="registered methods, datasets, models and presets")
    lst.set_defaults(func=cmd_list)
    from ilora.datacli import add_data_parser

    add_data_parser(sub)
    from ilora.sweep import add_sweep_parsers

    add_sweep_parsers(sub)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a run or a sweep (and its workers) as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
