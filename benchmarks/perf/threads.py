"""Wall time of ``ilora run preset=smoke`` by CPU threads and OpenMP wait setting, quiet and next to a busy process.

Settings: ``threads`` 1 or 2 (the default ``threads=auto`` is the available cores, 2 on a 2-core machine)
crossed with the OpenMP wait setting (``WAITS``): the suite's default (neither variable set: importing
``ilora`` sets ``OMP_WAIT_POLICY=PASSIVE`` and ``GOMP_SPINCOUNT=1000``), ``PASSIVE`` alone (no spinning),
``ACTIVE`` (idle threads spin), and libgomp's own default (``GOMP_SPINCOUNT=300000``, what the suite did
before it set anything). Each setting runs as a subprocess
(``.venv/bin/ilora run preset=smoke method=fedit out_dir=<fresh tmp> threads=T``) on a quiet machine and
next to a busy neighbour: a separate Python process spinning a CPU-bound loop (one core's worth), started
before and killed after each block of runs. Settings are interleaved (order rotating) and repeated.

Writes ``results/perf/threads.md``.

    .venv/bin/python benchmarks/perf/threads.py [--quick] [--repeats 3] [--threads 1 2] [--conditions quiet busy]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ILORA, RESULTS, fmt_range, header, load_average, ratio, stats, write_report

# name -> the OpenMP variables set in the run's environment (the others removed)
WAITS = {
    "default": {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "libgomp": {"GOMP_SPINCOUNT": "300000"},
}
BUSY_LOOP = "while True:\n    pass\n"
CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ILORA_JOBS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def smoke_run(threads: str, policy: str, extra: list[str]) -> dict:
    """One ``ilora run preset=smoke`` in a subprocess: its wall time, the rounds' time, the threads it used."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update({**WAITS[policy], "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    with tempfile.TemporaryDirectory(prefix="perf-threads-") as out_dir:
        cmd = [str(ILORA), "run", "preset=smoke", "method=fedit", f"out_dir={out_dir}", f"threads={threads}", *extra]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        record = json.loads(next(Path(out_dir).glob("*/result.json")).read_text())
    return {"wall_s": wall, "rounds_s": sum(r["wall_s"] for r in record["rounds"]), "threads": record["threads"]}


def start_neighbour() -> subprocess.Popen:
    """A CPU-bound Python loop in its own process (one core's worth of work); warm up briefly."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    time.sleep(0.5)
    return proc


def stop_neighbour(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def run_all(args: argparse.Namespace) -> dict[tuple[str, str, str], list[dict]]:
    settings = list(itertools.product(args.threads, args.policies))
    results: dict[tuple[str, str, str], list[dict]] = {
        (c, t, p): [] for c in args.conditions for t, p in settings
    }
    for rep in range(args.repeats):
        conditions = args.conditions if rep % 2 == 0 else args.conditions[::-1]
        for condition in conditions:
            neighbour = start_neighbour() if condition == "busy" else None
            try:
                shift = rep % len(settings)
                for t, p in settings[shift:] + settings[:shift]:
                    res = smoke_run(t, p, args.extra)
                    results[(condition, t, p)].append(res)
                    print(f"{condition}: threads={t} ({res['threads']}) wait={p}: "
                          f"wall {res['wall_s']:.2f} s, rounds {res['rounds_s']:.2f} s", flush=True)
            finally:
                if neighbour is not None:
                    stop_neighbour(neighbour)
    return results


def report(results: dict[tuple[str, str, str], list[dict]], args: argparse.Namespace, load: str) -> list[str]:
    auto = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = header(
        "`ilora run preset=smoke`: threads and OpenMP waiting, quiet and next to a busy process",
        "benchmarks/perf/threads.py",
        load,
        [f"`threads=auto` resolves to {auto} here (available cores / concurrent jobs)"],
    )
    extra = " ".join(args.extra)
    lines += [
        "## Method",
        "",
        f"Each run: `ilora run preset=smoke method=fedit out_dir=<fresh tmp> threads=T{' ' + extra if extra else ''}`",
        "as a subprocess with the wait setting's variables in its environment (`OMP_NUM_THREADS` unset):",
        "`default` = neither `OMP_WAIT_POLICY` nor `GOMP_SPINCOUNT` set, so the suite sets `PASSIVE` with",
        "`GOMP_SPINCOUNT=1000` (spin briefly, then sleep); `PASSIVE` = no spinning; `ACTIVE` = spin;",
        "`libgomp` = `GOMP_SPINCOUNT=300000`, libgomp's own default, what runs did before. `wall`: the",
        "subprocess from start to exit (start-up included); `rounds`: the sum of its record's `rounds[].wall_s`.",
        "`busy`: a separate process spinning `while True: pass` (one core's worth of CPU-bound work) runs",
        "during the block of runs, started before it and killed after. Settings interleaved (order rotating),",
        f"quiet and busy blocks alternating, {args.repeats} run(s) per cell; median (min-max) in seconds.",
        f"The suite's default is `threads=auto` ({auto} here) with the `default` wait setting.",
        "",
        "| condition | threads | wait | wall (s) | rounds (s) | wall vs quiet | rounds vs quiet |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for (condition, t, p), runs in results.items():
        walls, rounds = [r["wall_s"] for r in runs], [r["rounds_s"] for r in runs]
        quiet = results.get(("quiet", t, p)) if condition != "quiet" else None
        vs_wall = ratio(walls, [r["wall_s"] for r in quiet]) if quiet else "-"
        vs_rounds = ratio(rounds, [r["rounds_s"] for r in quiet]) if quiet else "-"
        default = " (default)" if p == "default" and t in ("auto", str(auto)) else ""
        lines.append(
            f"| {condition} | {t}{default} | {p} | {fmt_range(walls, digits=2)} | "
            f"{fmt_range(rounds, digits=2)} | {vs_wall} | {vs_rounds} |"
        )

    def med(key: tuple[str, str, str], field: str = "rounds_s") -> float | None:
        runs = results.get(key)
        return stats([r[field] for r in runs])[0] if runs else None

    notes = []
    for t in args.threads:
        for p in args.policies:
            quiet, busy = med(("quiet", t, p)), med(("busy", t, p))
            fastest_quiet = min((v for q in args.policies if (v := med(("quiet", t, q)))), default=None)
            if quiet and busy and fastest_quiet:
                notes.append(f"- threads={t}, {p}: busy / quiet = **{busy / quiet:.2f}x**; quiet against the "
                             f"fastest quiet setting = **{quiet / fastest_quiet:.2f}x**")
    return lines + ["", "Ratios of the median round-loop times:", "", *notes, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds: 1 thread, 1 round of 1 step, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", nargs="+", default=["1", "2"])
    parser.add_argument("--policies", nargs="+", default=list(WAITS), choices=list(WAITS))
    parser.add_argument("--conditions", nargs="+", default=["quiet", "busy"], choices=["quiet", "busy"])
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    parser.add_argument("--out", type=Path, default=RESULTS / "threads.md")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.threads, args.extra = 1, ["1"], ["rounds=1", "local_steps=1", *args.extra]
    load = load_average()
    write_report(args.out, report(run_all(args), args, load))


if __name__ == "__main__":
    main()
