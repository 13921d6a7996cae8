"""Kill drill: kill -9 a smoke sweep at points placed by its progress, rerun it after each kill, then check that
its tables and plots are byte for byte those of an uninterrupted sweep. Run by ``make drill``.

Each kill takes the sweep's whole process group (the sweep and its pool workers) once the run directories
show the moment it is meant for, whatever the machine's speed:

1. during round 2 of a run: the run's ``checkpoint/checkpoint-1.json`` is new and its ``result.json`` absent;
2. during round 3 of a run: likewise with ``checkpoint-2.json``;
3. mid-record-write: a run's ``metrics.csv`` is written and its ``result.json`` not yet;
4. between runs: a run finished in this attempt, a worker has not begun its next run, and one is waiting;
5. during the report: every run has its record, some tables or plots are rewritten, ``PROVENANCE.md``
   (written last) is not.

The moments of 3 and 4 last milliseconds; the sweep's test hook ``ILORA_DRILL_PAUSE`` (``drill_pause`` in
ilora/runner.py) widens them to a few seconds in those attempts only. After each kill the drill reads the run
directories again and says where the kill landed; it fails if a planned kill missed its moment, if a run
killed mid-way is not resumed from its checkpoint, if a stale ``run.lock`` keeps a rerun from a run, or if a
table or plot differs (``PROVENANCE.md`` is left out: it names the records directory and their finish times).

Usage: python scripts/kill_drill.py [--work DIR]  (DIR is kept; without it a temporary directory is used)
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = """\
name: drill
title: Kill drill
table: {rows: [method], columns: [dataset]}
plots: [rounds, communication]
presets:
  smoke:
    base: {rounds: 3, local_steps: 2, max_train_samples: 60, max_test_samples: 30, max_length: 16}
    grid:
      dataset: [bbc_news]
      method: [fedit, ilora_s, flora]
      seed: [1, 2]
"""
RUNS, JOBS = 6, 2
PAUSE_S = 2  # how long ILORA_DRILL_PAUSE widens a moment; the drill looks every POLL_S
POLL_S = 0.02
ATTEMPT_TIMEOUT_S = 600


def say(text: str) -> None:
    print(f"kill drill: {text}", flush=True)


# ----------------------------------------------------------------------------------------- the out dir
@dataclass
class Run:
    """What a run directory shows; times are modification times (None: the file is absent)."""

    name: str
    finished: bool
    metrics: float | None
    lock: float | None
    checkpoints: dict[int, float]  # round -> its checkpoint's time

    def newest_checkpoint(self) -> int:
        return max(self.checkpoints, default=0)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def scan(out: Path) -> dict[str, Run]:
    runs = {}
    for run_dir in sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []:
        checkpoints = {}
        for meta in run_dir.glob("checkpoint/checkpoint-*.json"):
            n = meta.stem.partition("-")[2]
            if n.isdigit() and (t := _mtime(meta)) is not None:
                checkpoints[int(n)] = t
        runs[run_dir.name] = Run(run_dir.name, (run_dir / "result.json").is_file(), _mtime(run_dir / "metrics.csv"),
                                 _mtime(run_dir / "run.lock"), checkpoints)
    return runs


def files(directory: Path) -> dict[str, float]:
    """Every file under ``directory`` (relative path -> modification time)."""
    found = {p.relative_to(directory).as_posix(): _mtime(p) for p in directory.rglob("*") if p.is_file()}
    return {k: t for k, t in found.items() if t is not None}  # a temporary file renamed meanwhile: left out


# ---------------------------------------------------------------------------------------- an attempt
@dataclass
class Attempt:
    """One start of the sweep, killed when ``Kill.ready`` says its moment has come."""

    out: Path
    results: Path
    started: float  # time.time() at the start: files at least this new were written by this attempt
    finished_before: int
    target: str = ""  # what ``ready`` found (a run's name, a count), for ``landed``
    locks: set[str] = field(default_factory=set)

    def runs(self) -> dict[str, Run]:
        return scan(self.out)

    def live(self, runs: dict[str, Run]) -> set[str]:
        """Runs this attempt is training: their lock is this attempt's (a killed one's lock is older)."""
        return {r.name for r in runs.values() if r.lock is not None and r.lock >= self.started}

    def new(self, t: float | None) -> bool:
        return t is not None and t >= self.started


@dataclass
class Kill:
    """A planned kill: ``ready`` names the moment once it has come (else None); ``landed``, after the kill,
    says what it hit (None: it missed); ``pause`` is ILORA_DRILL_PAUSE for its attempts."""

    phase: str
    ready: Callable[[Attempt], str | None]
    landed: Callable[[Attempt], str | None]
    pause: str = ""
    tries: int = 2


def in_round(k: int) -> Kill:
    """Kill once a run of this attempt has saved its checkpoint after round ``k``: it is in round k + 1."""

    def ready(a: Attempt) -> str | None:
        runs = a.runs()
        for name in sorted(a.live(runs)):
            run = runs[name]
            if not run.finished and run.metrics is None and a.new(run.checkpoints.get(k)):
                a.target = name
                return name
        return None

    def landed(a: Attempt) -> str | None:
        run = a.runs().get(a.target)
        if run is None or run.finished or run.metrics is not None or not run.checkpoints:
            return None
        return f"killed during round {run.newest_checkpoint() + 1} of {a.target}"

    return Kill(f"during round {k + 1} of a run", ready, landed)


def mid_record() -> Kill:
    def ready(a: Attempt) -> str | None:
        runs = a.runs()
        for name in sorted(a.live(runs)):
            if not runs[name].finished and a.new(runs[name].metrics):
                a.target = name
                return name
        return None

    def landed(a: Attempt) -> str | None:
        run = a.runs().get(a.target)
        if run is None or run.finished or run.metrics is None:
            return None
        return f"killed mid-record-write of {a.target} (its metrics.csv written, its result.json not)"

    return Kill("mid-record-write", ready, landed, pause=f"record:{PAUSE_S}")


def between_runs() -> Kill:
    def ready(a: Attempt) -> str | None:
        runs = a.runs()
        done = sum(r.finished for r in runs.values())
        live = a.live(runs)
        if a.finished_before < done and len(live) < JOBS and done + len(live) < RUNS:
            a.target, a.locks = str(done), live
            return a.target
        return None

    def landed(a: Attempt) -> str | None:
        runs = a.runs()
        done = sum(r.finished for r in runs.values())
        if str(done) != a.target or a.live(runs) != a.locks:  # a run finished or began meanwhile
            return None
        busy = f"; {len(a.locks)} run in progress in the other worker" if a.locks else ""
        return f"killed between runs ({done} of {RUNS} finished{busy})"

    return Kill("between runs", ready, landed, pause=f"run:{PAUSE_S}")


def in_report() -> Kill:
    def written(a: Attempt) -> tuple[int, bool]:
        """(tables and plots rewritten by this attempt, whether PROVENANCE.md was)."""
        now = files(a.results)
        provenance = [k for k in now if k.endswith("PROVENANCE.md")]
        return (sum(a.new(t) for k, t in now.items() if k not in provenance and not Path(k).name.startswith(".")),
                any(a.new(now[k]) for k in provenance))

    def ready(a: Attempt) -> str | None:
        if sum(r.finished for r in a.runs().values()) < RUNS:
            return None
        count, done = written(a)
        return f"{count} files" if count and not done else None

    def landed(a: Attempt) -> str | None:
        count, done = written(a)
        files_so_far = f"{count} table or plot file{'s' if count != 1 else ''} rewritten"
        return None if done else f"killed during the report ({files_so_far}, PROVENANCE.md not yet)"

    return Kill("during the report", ready, landed, tries=4)


PLAN = [in_round(1), in_round(2), mid_record(), between_runs(), in_report()]


# ------------------------------------------------------------------------------------------- processes
def sweep_command(bench: Path, out: Path, results: Path) -> list[str]:
    return [sys.executable, "-m", "ilora.cli", "sweep", str(bench), "--preset", "smoke", "--jobs", str(JOBS),
            "--out-dir", str(out), "--results-dir", str(results), "--report"]


def environment(pause: str = "") -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ILORA_DRILL_PAUSE", None)
    if pause:
        env["ILORA_DRILL_PAUSE"] = pause
    return env


def group_members(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that have not exited (zombies left out: they hold nothing)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def kill_group(proc: subprocess.Popen) -> int:
    """kill -9 the sweep's whole process group; wait until every member is gone; the sweep's exit status."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    status = proc.wait()
    end = time.monotonic() + 30
    while group_members(proc.pid) and time.monotonic() < end:
        time.sleep(0.05)
    if left := group_members(proc.pid):
        raise SystemExit(f"kill drill: processes {left} survived kill -9 of their group")
    return status


def attempt(kill: Kill, bench: Path, out: Path, results: Path, log: Path) -> tuple[str | None, str]:
    """Start the sweep, kill it at ``kill``'s moment; (what the kill hit or None, the sweep's output)."""
    a = Attempt(out, results, time.time(), sum(r.finished for r in scan(out).values()))
    with log.open("w") as sink:
        proc = subprocess.Popen(sweep_command(bench, out, results), cwd=ROOT, env=environment(kill.pause),
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + ATTEMPT_TIMEOUT_S
        moment = None
        try:
            while proc.poll() is None and time.monotonic() < end and not (moment := kill.ready(a)):
                time.sleep(POLL_S)
        finally:
            status = kill_group(proc)
    output = log.read_text()
    if moment is None or status != -signal.SIGKILL:  # it ended by itself, or timed out: the moment never came
        return None, output
    return kill.landed(a), output


def check_resumed(output: str, to_resume: dict[str, int], who: str) -> list[str]:
    """Say which runs ``output`` resumed, and drop them from ``to_resume``; failures: a run resumed from
    another round than its newest checkpoint's."""
    failures = []
    for m in re.finditer(r"resuming (\S+) after round (\d+)", output):
        run, k = m[1], int(m[2])
        say(f"  ({who} resumed {run} after round {k})")
        if to_resume.pop(run, k) != k:
            failures.append(f"{who} resumed {run} after round {k}, not from its newest checkpoint")
    return failures


# ------------------------------------------------------------------------------------------------ drill
def run_drill(work: Path) -> int:
    bench = work / "drill.yaml"
    bench.write_text(BENCH)
    t0 = time.monotonic()

    say("uninterrupted reference sweep")
    ref_out, ref_results = work / "reference", work / "reference-results"
    ref = subprocess.run(sweep_command(bench, ref_out, ref_results), cwd=ROOT, env=environment(),
                         capture_output=True, text=True, timeout=ATTEMPT_TIMEOUT_S)
    if ref.returncode != 0:
        print(ref.stderr[-3000:], file=sys.stderr)
        return 1
    reference = sorted(k for k in files(ref_results) if not k.endswith("PROVENANCE.md"))
    say(f"reference: {RUNS} runs and {len(reference)} table and plot files in {time.monotonic() - t0:.0f} s")

    out, results = work / "runs", work / "results"
    failures: list[str] = []
    to_resume: dict[str, int] = {}  # run killed mid-way -> the round its checkpoint holds
    number = 0
    for kill in PLAN:
        hit = None
        for _ in range(kill.tries):
            number += 1
            hit, output = attempt(kill, bench, out, results, work / f"attempt-{number}.log")
            failures += check_resumed(output, to_resume, f"attempt {number}")
            if "[  locked]" in output:
                failures.append(f"attempt {number}: a run was skipped as locked (a stale run.lock)")
            if hit:
                break
            say(f"attempt {number} missed its moment ({kill.phase}); trying again")
        done = sum(r.finished for r in scan(out).values())
        if hit is None:
            failures.append(f"no kill landed {kill.phase}")
            continue
        say(f"kill {PLAN.index(kill) + 1} (attempt {number}): {hit}; {done} of {RUNS} runs finished so far "
            f"[{time.monotonic() - t0:.0f} s]")
        for run in scan(out).values():
            if not run.finished and run.checkpoints:
                to_resume[run.name] = run.newest_checkpoint()

    say("final rerun")
    final = subprocess.run(sweep_command(bench, out, results), cwd=ROOT, env=environment(),
                           capture_output=True, text=True, timeout=ATTEMPT_TIMEOUT_S)
    failures += check_resumed(final.stderr, to_resume, "the final rerun")
    if final.returncode != 0:
        failures.append(f"the final rerun exited with {final.returncode}: {final.stderr[-1500:]}")
    if "[  locked]" in final.stderr:
        failures.append("the final rerun skipped a run as locked (a stale run.lock)")
    failures += [f"{run} was killed after round {k} but never resumed from it" for run, k in to_resume.items()]
    if left := sorted(p.relative_to(out).as_posix() for p in out.glob("*/run.lock")):
        failures.append(f"run.lock files left after the final rerun: {left}")
    if (done := sum(r.finished for r in scan(out).values())) != RUNS:
        failures.append(f"{done} of {RUNS} runs have a record after the final rerun")

    produced = files(results)
    stray = sorted(k for k in produced if Path(k).name.startswith(".") and k.endswith(".tmp"))
    if stray:
        say(f"note: temporary files of killed writes are left in the results: {stray}")
    produced_set = {k for k in produced if k not in stray and not k.endswith("PROVENANCE.md")}
    for name in sorted(produced_set ^ set(reference)):
        failures.append(f"{name} is {'missing' if name in reference else 'extra'} after the kills")
    for name in sorted(produced_set & set(reference)):
        if not filecmp.cmp(ref_results / name, results / name, shallow=False):
            failures.append(f"{name} differs from the uninterrupted sweep's")

    for failure in failures:
        say(f"FAILED: {failure}")
    if failures:
        return 1
    say(f"{len(reference)} table and plot files byte-identical after {len(PLAN)} kills, each where it was planned "
        f"({time.monotonic() - t0:.0f} s in all)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="working directory (kept); default: a temporary one, removed")
    args = parser.parse_args()
    if args.work:
        if args.work.exists() and any(args.work.iterdir()):
            parser.error(f"--work {args.work} is not empty")
        args.work.mkdir(parents=True, exist_ok=True)
        return run_drill(args.work)
    work = Path(tempfile.mkdtemp(prefix="kill-drill-"))
    try:
        return run_drill(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
