"""Sweeps on Ray (``--backend ray``): the same records and tables as the local pool, retries, and the drill.

The drill starts a Ray cluster on this machine (a head and a worker node, each ``ray start --block`` in
a session of its own), kills the worker node with -9 while it trains a run, adds a new worker node,
and checks that the sweep finishes, that the run resumed from its round checkpoint, and that the
tables and plots are byte for byte those of a local-pool sweep. Only the started processes are stopped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from ilora.benchmark import expand, load_benchmark
from ilora.config import RunConfig
from ilora.flower.local import descendants, free_port  # the same process bookkeeping as the Flower deployment
from ilora.ray_sweep import RayOptions
from ilora.runner import run_id_for, write_record
from ilora.sweep import run_sweep

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="needs ray (installed with the flower extra: pip install -e '.[flower]')")

BENCH = """
name: {name}
title: Ray backend check
table: {{rows: [method], columns: [dataset]}}
plots: [rounds, communication]
presets:
  smoke:
    base: {{rounds: {rounds}, local_steps: 2, max_train_samples: 60, max_test_samples: 30, max_length: 16,
            threads: 1}}
    grid:
      dataset: [bbc_news]
      method: {methods}
      seed: [1]
"""
ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
ILORA = [sys.executable, "-m", "ilora.cli"]
RAY = str(Path(sys.executable).parent / "ray")
TIMINGS = ("started", "finished", "train_s", "aggregate_s", "eval_s", "wall_s", "compute_s", "overhead_share",
           "versions", "threads")


def write_bench(root: Path, name: str, methods: list[str], rounds: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(BENCH.format(name=name, methods=json.dumps(methods), rounds=rounds)))
    return path


def sweep(bench: Path, out: Path, results: Path, *extra: str, cwd: Path, timeout: float = 600,
          **popen: Any) -> subprocess.CompletedProcess:
    argv = [*ILORA, "sweep", str(bench), "--preset", "smoke", "--out-dir", str(out), "--results-dir", str(results),
            "--report", *extra]
    return subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, **popen)


def tables(results: Path) -> dict[str, bytes]:
    """Every table and plot a report wrote (PROVENANCE.md names the records' directory and the time)."""
    return {str(p.relative_to(results)): p.read_bytes() for p in sorted(results.rglob("*"))
            if p.is_file() and p.name != "PROVENANCE.md"}


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    """A record without what differs between two runs of the same config (clock times, threads, paths)."""
    keep = {k: v for k, v in record.items() if k not in TIMINGS}
    keep["config"] = {k: v for k, v in record["config"].items() if k != "out_dir"}
    keep["rounds"] = [{k: v for k, v in r.items() if k not in TIMINGS} for r in record["rounds"]]
    return keep


def records(out: Path) -> dict[str, dict[str, Any]]:
    return {p.parent.name: comparable(json.loads(p.read_text())) for p in sorted(out.glob("*/result.json"))}


@pytest.mark.slow
def test_a_ray_sweep_writes_the_records_and_tables_of_the_local_pool(tmp_path, capsys):
    from ilora.cli import main

    bench = write_bench(tmp_path, "raycheck", ["fedit", "ilora_s"], rounds=2)
    assert main(["sweep", str(bench), "--preset", "smoke", "--out-dir", str(tmp_path / "local"),
                 "--results-dir", str(tmp_path / "local-results"), "--report"]) == 0, capsys.readouterr().err
    # relative --out-dir: the tasks run in the driver's working directory
    on_ray = sweep(bench, Path("ray"), Path("ray-results"), "--backend", "ray", cwd=tmp_path)
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    text = on_ray.stdout + on_ray.stderr  # the per-run lines go where tqdm writes (stdout when not a terminal)
    assert "on a new local Ray instance" in text and "ray: a local Ray instance, 1 node(s)" in text
    assert "[      ok] fedit-bbc_news" in text and "(0 failed, 0 diverged)" in text
    assert records(tmp_path / "ray") == records(tmp_path / "local") and len(records(tmp_path / "local")) == 2
    assert (tmp_path / "ray" / next(iter(records(tmp_path / "ray"))) / "metrics.csv").exists()
    written = tables(tmp_path / "local-results")
    assert written and tables(tmp_path / "ray-results") == written
    # everything is there: a second Ray sweep runs nothing and starts no Ray instance
    lines: list[str] = []
    summary = run_sweep(expand(load_benchmark(str(bench)), "smoke", out_dir=str(tmp_path / "ray")), backend="ray",
                        progress=False, log=lines.append, ray_options=RayOptions(address="127.0.0.1:1"))
    assert (summary.skipped, summary.ran, lines) == (2, 0, [])


# --------------------------------------------------------------------- retries, in this process
def dying_runner(cfg: RunConfig) -> dict[str, Any]:
    """Seed 1 kills its worker every time; seed 2 only the first time (a marker file remembers)."""
    marker = Path(cfg.out_dir) / f"died-{cfg.seed}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    if cfg.seed == 1 or not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    record = {"run_id": run_id_for(cfg), "status": "ok", "error": None, "final_accuracy": 0.5, "rounds": []}
    write_record(Path(cfg.out_dir) / record["run_id"], record)
    return record


def test_a_killed_worker_is_retried_and_a_run_out_of_retries_is_left_without_a_record(tmp_path):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    bench = load_benchmark(str(write_bench(tmp_path, "dying", ["fedit"], rounds=1)))
    runs = expand(bench, "smoke", out_dir=str(tmp_path / "runs"))
    runs += expand(bench, "smoke", ["seed=2"], out_dir=str(tmp_path / "runs"))
    lines: list[str] = []
    summary = run_sweep(runs, runner=dying_runner, progress=False, log=lines.append, backend="ray",
                        ray_options=RayOptions(max_retries=1))
    always, once = runs
    assert summary.ran == 2 and [r for r, _ in summary.lost] == [always.run_id], lines
    assert "1 lost" in summary.line()
    assert not always.result_path.exists()
    assert json.loads(once.result_path.read_text())["status"] == "ok"
    assert any(line.startswith("[    lost] " + always.run_id) for line in lines), lines
    assert any(line.startswith(f"ray: {always.run_id} ran out of its 1 retries: ") for line in lines), lines
    print("\n".join(lines))


# --------------------------------------------------------------------------------- the drill
def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class LocalRayCluster:
    """A Ray head and worker nodes on this machine, each a ``ray start --block`` process in a session of
    its own; ``stop`` ends exactly those and what they started (never ``ray stop``, which ends every Ray)."""

    def __init__(self, root: Path, logs: Path):
        self.root, self.logs, self.port = root, logs, free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.started: set[int] = set()

    def start(self, name: str, head: bool = False) -> None:
        client = f"--ray-client-server-port={free_port()}"
        where = ["--head", f"--port={self.port}", "--include-dashboard=false", client] if head \
            else [f"--address={self.address}"]
        command = [RAY, "start", *where, f"--temp-dir={self.root}", "--num-cpus=1", "--num-gpus=0",
                   "--disable-usage-stats",
                   f"--dashboard-agent-listen-port={free_port()}", "--block"]
        log = self.logs / f"{name}.log"
        with open(log, "w") as output:
            process = subprocess.Popen(command, cwd=self.root, env=ENV, stdout=output, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes[name] = process
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        self.started.update([process.pid, *descendants(process.pid)])

    def tasks(self, name: str) -> dict[str, int]:
        """The runs a node's workers are executing: run id -> worker pid."""
        busy = {}
        for pid in descendants(self.processes[name].pid):
            self.started.add(pid)
            line = command_line(pid)
            if line.startswith("ray::ilora "):
                busy[line.split()[1]] = pid
        return busy

    def kill(self, name: str) -> None:
        """``kill -9`` a node: its ``ray start``, raylet, agents and workers (a machine that dies)."""
        process = self.processes.pop(name)
        for pid in [process.pid, *descendants(process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()

    def stop(self) -> None:
        """SIGTERM each ``ray start --block`` (it ends its node), then SIGKILL whatever started is left."""
        for process in self.processes.values():
            self.started.update(descendants(process.pid))
            process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in self.started:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.processes.clear()


@pytest.mark.drill
def test_a_sweep_survives_a_worker_node_killed_mid_run_and_gives_the_local_pool_tables(tmp_path):
    bench = write_bench(tmp_path, "raydrill", ["fedit", "ilora_s", "flora"], rounds=3)
    t0 = time.monotonic()
    reference = sweep(bench, tmp_path / "local", tmp_path / "local-results", "--jobs", "2", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    t_local = time.monotonic() - t0

    out, results = tmp_path / "runs", tmp_path / "results"
    root = Path(tempfile.mkdtemp(prefix="ilray-", dir="/tmp"))  # short: Ray's socket paths live under it
    cluster = LocalRayCluster(root, tmp_path)
    driver: subprocess.Popen | None = None
    try:
        t0 = time.monotonic()
        cluster.start("head", head=True)
        cluster.start("worker-1")
        log = tmp_path / "sweep.log"
        with open(log, "w") as output:
            argv = [*ILORA, "sweep", str(bench), "--preset", "smoke", "--out-dir", str(out), "--results-dir",
                    str(results), "--report", "--backend", "ray", "--address", cluster.address]
            driver = subprocess.Popen(argv, cwd=tmp_path, env=ENV, stdout=output, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 300
            victim = None
            while victim is None:  # the worker node trains a run and has checkpointed its round 1
                assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                victim = next((r for r in cluster.tasks("worker-1")
                               if any((out / r / "checkpoint").glob("checkpoint-*.json"))), None)
                time.sleep(0.2)
            cluster.kill("worker-1")
            assert not (out / victim / "result.json").exists()
            cluster.start("worker-2")
            assert driver.wait(timeout=300) == 0, log.read_text()[-3000:]
        t_ray = time.monotonic() - t0
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    text = log.read_text()
    assert f"resuming {victim} after round" in text, text[-3000:]
    assert "3 runs: 0 already done, 3 run now" in text and "(0 failed, 0 diverged)" in text, text[-3000:]
    assert records(out) == records(tmp_path / "local")
    written = tables(tmp_path / "local-results")
    assert written and tables(results) == written
    time.sleep(1)
    left = [pid for pid in cluster.started if alive(pid)]
    assert not left, f"processes left running: {[command_line(p) for p in left]}"
    print(f"\nlocal pool {t_local:.0f}s; cluster start + ray sweep with a node killed {t_ray:.0f}s")


def test_runs_declare_a_share_of_a_gpu_so_that_several_share_one():
    from ilora.ray_sweep import run_resources

    cfg = RunConfig(threads="1")
    assert run_resources(cfg, RayOptions(), cluster_gpus=1) == {"num_cpus": 1, "num_gpus": 1.0}
    assert run_resources(cfg, RayOptions(gpus_per_run=0.25), cluster_gpus=1) == {"num_cpus": 1, "num_gpus": 0.25}
    assert run_resources(cfg, RayOptions(gpus_per_run=0.25), cluster_gpus=0)["num_gpus"] == 0  # CPU cluster


@pytest.mark.parametrize("value", ["0", "1.5", "-1"])
def test_gpus_per_run_out_of_range_is_a_one_line_error(value, capsys):
    from ilora.cli import main

    assert main(["sweep", "x", "--backend", "ray", "--gpus-per-run", value]) == 2
    assert "--gpus-per-run must be in (0, 1]" in capsys.readouterr().err
