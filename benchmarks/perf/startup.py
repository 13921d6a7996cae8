"""Start-up of ``ilora run preset=smoke``: the wall time of a one-round run outside its round.

Each run is a subprocess ``.venv/bin/ilora run preset=smoke method=fedit rounds=1 local_steps=1
out_dir=<fresh tmp>``; its start-up is the subprocess's wall time minus the round's own time from its
``result.json`` (``rounds[0].wall_s``): interpreter start, imports, config, data, model, and after the
round the record's writing and exit. One more run under ``python -X importtime`` breaks the imports down.

Writes ``results/perf/startup.md``.

    .venv/bin/python benchmarks/perf/startup.py [--quick] [--repeats 5] [--threads auto]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from common import ILORA, RESULTS, VENV_PYTHON, fmt_range, header, load_average, write_report

IMPORT_LINE = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s*(\S+)")


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def args_for(out_dir: str, threads: str) -> list[str]:
    return ["run", "preset=smoke", "method=fedit", "rounds=1", "local_steps=1", f"out_dir={out_dir}",
            f"threads={threads}"]


def one_run(threads: str) -> dict:
    """Wall time of one subprocess run, its round's time, and the difference (the start-up)."""
    with tempfile.TemporaryDirectory(prefix="perf-startup-") as out_dir:
        cmd = [str(ILORA), *args_for(out_dir, threads)]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env(), capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        record = json.loads(next(Path(out_dir).glob("*/result.json")).read_text())
    round_s = record["rounds"][0]["wall_s"]
    return {"wall_s": wall, "round_s": round_s, "startup_s": wall - round_s}


def import_breakdown(threads: str) -> tuple[float, list[tuple[str, float]]]:
    """Total import time of one run under ``-X importtime`` and the packages that take it (seconds).

    Each module's own (``self``) time is counted once, for its top-level package, so nothing is counted twice."""
    with tempfile.TemporaryDirectory(prefix="perf-startup-") as out_dir:
        cmd = [str(VENV_PYTHON), "-X", "importtime", "-m", "ilora.cli", *args_for(out_dir, threads)]
        out = subprocess.run(cmd, env=env(), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    by_package: dict[str, float] = {}
    for line in out.stderr.splitlines():
        m = IMPORT_LINE.match(line)
        if m:
            package = m.group(3).split(".")[0]
            by_package[package] = by_package.get(package, 0.0) + int(m.group(1)) / 1e6
    ranked = sorted(by_package.items(), key=lambda kv: -kv[1])
    return sum(by_package.values()), ranked


def report(runs: list[dict], imports: tuple[float, list[tuple[str, float]]], args: argparse.Namespace,
           load: str) -> list[str]:
    total, ranked = imports
    lines = header("Start-up of `ilora run preset=smoke`", "benchmarks/perf/startup.py", load)
    lines += [
        "## Method",
        "",
        f"{args.repeats} runs of `ilora run {' '.join(args_for('<fresh tmp>', args.threads)[1:])}` as subprocesses",
        "(" + ("no warm-up, --quick" if args.quick else
               "one untimed warm-up run first, so that the page cache holds the libraries and the model")
        + "). Start-up is",
        "the subprocess's wall time minus the round's time from its `result.json` (`rounds[0].wall_s`): the",
        "time to the first round plus writing the record and exiting. Median (min-max) in seconds.",
        "",
        "| | seconds |",
        "|---|---:|",
        f"| whole run (wall) | {fmt_range([r['wall_s'] for r in runs], digits=2)} |",
        f"| the round (`rounds[0].wall_s`) | {fmt_range([r['round_s'] for r in runs], digits=2)} |",
        f"| **start-up** (wall - round) | **{fmt_range([r['startup_s'] for r in runs], digits=2)}** |",
        "",
        f"Imports, from one more run under `python -X importtime -m ilora.cli ...`: {total:.2f} s in all",
        "(every module's own import time, those imported lazily during the run included, summed by top-level",
        "package; `-X importtime` itself adds some overhead). The largest:",
        "",
        "| package | import (s) |",
        "|---|---:|",
        *[f"| `{name}` | {seconds:.2f} |" for name, seconds in ranked[:10]],
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 runs, no warm-up")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="auto", help="the runs' threads setting")
    parser.add_argument("--out", type=Path, default=RESULTS / "startup.md")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 2
    load = load_average()
    if not args.quick:
        one_run(args.threads)  # warm-up
    runs = []
    for _ in range(args.repeats):
        runs.append(r := one_run(args.threads))
        print(f"wall {r['wall_s']:.2f} s, round {r['round_s']:.2f} s, start-up {r['startup_s']:.2f} s", flush=True)
    imports = import_breakdown(args.threads)
    print(f"imports {imports[0]:.2f} s: " + ", ".join(f"{n} {s:.2f}" for n, s in imports[1][:5]))
    write_report(args.out, report(runs, imports, args, load))


if __name__ == "__main__":
    main()
