"""Peak resident memory of a smoke-size federated run against the number of simulated clients.

Each setting runs in a fresh subprocess (this script with ``--child N``), which calls
``resolve_config`` + ``run_experiment`` for the smoke preset's MiniLM on BBC News with ``N`` clients,
an iid partition of the whole training split (1,780 articles; at 1,000 clients one or two each), ranks
2/4/6 repeated, ``participation = 3 / N`` (3 clients train per round whatever ``N``), one local step, and
prints its own peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). The suite keeps one frozen
backbone whatever ``N``; what grows with ``N`` is the per-client data slices, partition and state.

Writes ``results/perf/memory.md``.

    .venv/bin/python benchmarks/perf/memory.py [--quick] [--clients 10 100 1000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, VENV_PYTHON, fmt_range, header, load_average, stats, write_report

TRAIN_PER_ROUND = 3


def overrides(clients: int, rounds: int, out_dir: str) -> list[str]:
    ranks = ",".join(str((2, 4, 6)[i % 3]) for i in range(clients))
    return [
        "preset=smoke", "method=fedit", f"num_clients={clients}", f"ranks=[{ranks}]",
        f"participation={TRAIN_PER_ROUND / clients!r}", "partition=iid", "max_train_samples=100000",
        "local_steps=1", f"rounds={rounds}", "threads=1", f"out_dir={out_dir}", "progress=false",
    ]


def imports_only() -> None:
    """The reference: the libraries a run imports (torch, transformers, datasets, the suite), nothing run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets  # noqa: F401
    import flwr_datasets.partitioner  # noqa: F401
    import transformers  # noqa: F401

    import ilora.models.text  # noqa: F401
    import ilora.runner  # noqa: F401

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"clients": 0, "peak_mb": peak_kb / 1024, "wall_s": 0.0, "status": "imports only"}))


def child(clients: int, rounds: int) -> None:
    """Run one setting in this process; print one JSON line with the peak RSS and facts of the run."""
    if clients == 0:
        imports_only()
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ilora.config import resolve_config
    from ilora.runner import run_experiment

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="perf-memory-") as out_dir:
        record = run_experiment(resolve_config(overrides(clients, rounds, out_dir)))
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    sizes = record["client_sizes"]
    print(json.dumps({
        "clients": clients, "peak_mb": peak_kb / 1024, "wall_s": wall, "status": record["status"],
        "trained_per_round": len(record["rounds"][0]["clients"]), "min_size": min(sizes), "max_size": max(sizes),
        "num_train": record["num_train"],
    }))


def measure(clients: int, rounds: int, cache: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if cache == "off":
        env["ILORA_CACHE"] = "off"
    python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    cmd = [python, __file__, "--child", str(clients), "--rounds", str(rounds)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(rows: dict[int, list[dict]], args: argparse.Namespace, load: str) -> list[str]:
    lines = header(
        "Peak resident memory against the number of simulated clients",
        "benchmarks/perf/memory.py",
        load,
        ["torch threads: 1 (`threads=1`, `OMP_NUM_THREADS=1`); the suite's data caches: "
         + ("off (`ILORA_CACHE=off`: every run partitions and tokenises afresh)" if args.cache == "off"
            else "on (reused between runs)")],
    )
    lines += [
        "## Method",
        "",
        "One subprocess per run: `resolve_config` + `run_experiment` of",
        f"`{' '.join(overrides(3, args.rounds, '<tmp>'))}`".replace("=3 ", "=N ").replace("[2,4,6]", "[2,4,6,...]")
        .replace("participation=1.0", f"participation={TRAIN_PER_ROUND}/N"),
        "(the smoke preset's MiniLM-L6 on BBC News, 32 tokens, 100 test articles; `max_train_samples` above the",
        f"split's size keeps all of it), so {TRAIN_PER_ROUND} clients train per round whatever N. Each child",
        "prints its own peak resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`) at the end of the run.",
        "The reference row `imports only` is a child that imports what a run imports (torch, transformers,",
        "datasets, flwr-datasets, the suite) and exits: most of the peak is libraries, not the federation.",
        f"Settings interleaved (order rotating), {args.repeats} run(s) each; median (min-max).",
        "",
        "| clients N | trained / round | examples per client | peak RSS (MB) | wall (s) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n, runs in rows.items():
        r = runs[0]
        if n == 0:
            lines.append(f"| imports only | - | - | {fmt_range([x['peak_mb'] for x in runs], digits=0)} | - |")
            continue
        lines.append(
            f"| {n} | {r['trained_per_round']} | {r['min_size']}-{r['max_size']} | "
            f"{fmt_range([x['peak_mb'] for x in runs], digits=0)} | {fmt_range([x['wall_s'] for x in runs])} |"
        )
    ns = sorted(n for n in rows if n > 0)
    if len(ns) > 1:
        lo, hi = ns[0], ns[-1]
        grow = stats([x["peak_mb"] for x in rows[hi]])[0] - stats([x["peak_mb"] for x in rows[lo]])[0]
        spread = max(max(x["peak_mb"] for x in rows[n]) - min(x["peak_mb"] for x in rows[n]) for n in ns)
        lines += [
            "",
            f"From {lo} to {hi} clients the median peak changes by {grow:+.0f} MB "
            f"({1024 * grow / (hi - lo):+.1f} KB per added client); the largest run-to-run range of one",
            f"setting is {spread:.0f} MB.",
        ]
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds: 10 and 100 clients, 1 round, 1 run each")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", choices=["off", "on"], default="off", help="the suite's partition/data caches")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "memory.md")
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.rounds)
        return
    if args.quick:
        args.clients, args.repeats, args.rounds = [10, 100], 1, 1
    load = load_average()
    settings = [0, *args.clients]  # 0: the imports-only reference
    rows: dict[int, list[dict]] = {n: [] for n in settings}
    for rep in range(args.repeats):
        shift = rep % len(settings)
        for n in settings[shift:] + settings[:shift]:
            res = measure(n, args.rounds, args.cache)
            rows[n].append(res)
            print(f"{n} clients: peak {res['peak_mb']:.0f} MB, {res['wall_s']:.1f} s ({res['status']})", flush=True)
    write_report(args.out, report(rows, args, load))


if __name__ == "__main__":
    main()
