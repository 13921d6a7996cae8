"""Flower's per-round overhead against the in-process simulator, and what it puts on the wire.

For each setting (``smoke``, and the cpu text setting, BBC News / MiniLM, FedIT, 2 of its 5 rounds) the same run goes
through three engines as subprocesses, each with a fresh output directory:

- in-process: ``ilora run`` (one client after another, ``threads=auto``), and with ``threads=1``;
- Flower's simulation engine: ``ilora run engine=flower`` (a Ray pool; one CPU and one thread per
  client, so two clients train at once on two cores);
- a local deployment (smoke only): ``python -m ilora.flower.local``: SuperLink, one SuperNode per
  client, ``flwr run``; every message starts a fresh ClientApp process on its SuperNode.

From each record: the rounds' wall time (median over rounds, and round 1 apart, which pays the
clients' first set-up), the start-up (the subprocess's wall time minus the rounds'), and bytes per
round: the methods' payload and, on Flower, what Flower serialised (array data + framing).
The one-thread records of all engines are checked to be identical round for round (CPU kernels may
round differently with another thread count).

Writes ``results/perf/flower.md``.

    .venv/bin/python benchmarks/perf/flower.py [--quick] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ILORA, RESULTS, VENV_PYTHON, fmt_range, header, load_average, package_version, write_report

# The cpu text setting's rounds take about a minute each on 2 cores: two rounds give the per-round cost.
SETTINGS = {"smoke": ["preset=smoke", "method=fedit"], "cpu text": ["preset=cpu", "method=fedit", "rounds=2"]}
SAME = ("clients", "accuracy", "loss", "train_loss", "uplink_bytes", "downlink_bytes")


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def one_run(engine: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="perf-flower-") as tmp:
        args = [*overrides, f"out_dir={tmp}/runs", "progress=false"]
        if engine == "in-process":
            cmd = [str(ILORA), "run", *args]
        elif engine == "in-process, 1 thread":
            cmd = [str(ILORA), "run", *args, "threads=1"]
        elif engine == "flower simulation":
            cmd = [str(ILORA), "run", *args, "engine=flower", "threads=1"]
        else:
            cmd = [str(VENV_PYTHON), "-m", "ilora.flower.local", "--workdir", f"{tmp}/deployment", *args, "threads=1"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env(), capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}\n{out.stdout[-2000:]}")
        record = json.loads(next(Path(tmp, "runs").glob("*/result.json")).read_text())
    rounds = record["rounds"]
    return {
        "wall_s": wall, "rounds": rounds,
        "startup_s": wall - sum(r["wall_s"] for r in rounds),
        "round1_s": rounds[0]["wall_s"],
        "round_s": statistics.median(r["wall_s"] for r in rounds[1:]) if len(rounds) > 1 else rounds[0]["wall_s"],
    }


def per_round(rounds: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in rounds) if key in rounds[0] else float("nan")


def report(results: dict, args: argparse.Namespace, load: str) -> list[str]:
    lines = header("Flower against the in-process simulator", "benchmarks/perf/flower.py", load,
                   [f"flwr {package_version('flwr')}, ray {package_version('ray')}",
                    f"runs per engine: {args.repeats} at smoke size, {args.cpu_repeats} on the cpu text setting; "
                   "median (min-max) over runs, seconds"])
    lines += [
        "## Time",
        "",
        "Start-up: the subprocess's wall time minus its rounds' (interpreter, imports, data, model; on Flower",
        "also starting Ray or the SuperLink and SuperNodes, and stopping them). Round 1 pays the clients'",
        "first set-up on Flower (each Ray worker builds its data and model once); later rounds: the median.",
        "Overhead: the later rounds' median minus in-process's (default threads: all cores for one client",
        "at a time; on Flower one thread per client, clients in parallel).",
        "",
        "| setting | engine | start-up | round 1 | later rounds | overhead per round |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for setting, engines in results.items():
        base = statistics.median(r["round_s"] for r in engines["in-process"])
        for engine, runs in engines.items():
            later = [r["round_s"] for r in runs]
            overhead = "" if engine == "in-process" else (
                f"{statistics.median(later) - base:+.2f} ({100 * (statistics.median(later) / base - 1):+.0f}%)")
            lines.append(f"| {setting} | {engine} | {fmt_range([r['startup_s'] for r in runs], digits=1)} | "
                         f"{fmt_range([r['round1_s'] for r in runs], digits=2)} | {fmt_range(later, digits=2)} | "
                         f"{overhead} |")
    lines += [
        "",
        "## Bytes per round",
        "",
        "Payload: the method's messages (tensor elements x element size), identical on every engine.",
        "Flower: what it serialised for the same messages, one hop (envelope + object tree + objects,",
        "identical objects once); framing = Flower minus the tensors' `.npy` data (HTTP headers not counted).",
        "",
        "| setting | engine | payload up | Flower up | framing up | payload down | Flower down | framing down |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for setting, engines in results.items():
        for engine, runs in engines.items():
            rounds = runs[0]["rounds"]
            keys = ("uplink_bytes", "flower_uplink_bytes", "flower_uplink_framing_bytes",
                    "downlink_bytes", "flower_downlink_bytes", "flower_downlink_framing_bytes")
            cells = [per_round(rounds, k) for k in keys]
            lines.append(f"| {setting} | {engine} | " + " | ".join(
                "" if c != c else f"{c / 1e3:,.1f} kB" for c in cells) + " |")
    lines += ["", "Every one-thread record (in-process, simulation, deployment) is the same round for round (accuracy,",
              "loss, training loss, clients, payload bytes): checked by this script on every run.", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke only, one run each")
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine at smoke size")
    parser.add_argument("--cpu-repeats", type=int, default=1, help="runs per engine on the cpu text setting")
    parser.add_argument("--out", type=Path, default=RESULTS / "flower.md")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    load = load_average()
    results: dict[str, dict[str, list[dict]]] = {}
    for setting, overrides in SETTINGS.items():
        if args.quick and setting != "smoke":
            continue
        engines = ["in-process", "in-process, 1 thread", "flower simulation"] + (
            ["flower deployment"] if setting == "smoke" else [])
        results[setting] = {}
        for engine in engines:
            repeats = args.repeats if setting == "smoke" else args.cpu_repeats
            runs = [one_run(engine, overrides) for _ in range(repeats)]
            results[setting][engine] = runs
            print(f"{setting} / {engine}: start-up {runs[0]['startup_s']:.1f} s, round 1 {runs[0]['round1_s']:.2f} s,"
                  f" later rounds {runs[0]['round_s']:.2f} s", flush=True)
        reference = [{k: r[k] for k in SAME} for r in results[setting]["in-process, 1 thread"][0]["rounds"]]
        for engine, runs in results[setting].items():
            for run in runs if engine != "in-process" else []:
                if [{k: r[k] for k in SAME} for r in run["rounds"]] != reference:
                    sys.exit(f"{setting}: {engine} gave a different record than in-process")
    write_report(args.out, report(results, args, load))


if __name__ == "__main__":
    main()
