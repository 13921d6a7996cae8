"""Running a sweep's pending runs as Ray tasks, on a local Ray instance or an existing Ray cluster.

Each run is one task that calls the local pool's ``_execute``, so records, failures and resuming are
the same: the worker writes ``<out_dir>/<run_id>/result.json`` (atomically) and keeps the round
checkpoint under the run's directory. The task also returns the record, and the driver writes it
where it is still absent (a worker without the driver's filesystem). A worker or node that dies is
retried by Ray (``max_retries``) and the retry resumes from the round checkpoint; a run that runs out
of retries is left without a record (the next sweep resumes it). See docs/ray.md.

Ray is imported only when a Ray sweep starts. No dashboard, no usage statistics, no runtime-env
packages: only environment variables travel with the job.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ilora.benchmark import PlannedRun
from ilora.config import RunConfig
from ilora.errors import UserError

# Ray must never try the network on its own: no usage statistics, no dashboard (see connect()).
RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}
# The driver's variables that the runs read, passed on to every worker (offline switches, caches, W&B).
FORWARDED_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "ILORA_", "WANDB_")
FORWARDED_NAMES = ("TOKENIZERS_PARALLELISM", "TORCH_HOME", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# set per task, and secrets, which stay on the driver's machine
NOT_FORWARDED = ("ILORA_JOBS", "WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
MAX_RETRIES = 3  # a task whose worker or node dies is run again up to this many times

Result = tuple[str, dict[str, Any], float]  # run id, record, seconds
Execute = Callable[[Any, RunConfig, str, int], Result]  # (runner, config, run id, jobs): ilora.sweep's
Done = Callable[[str, dict[str, Any], float], None]


@dataclass
class RayOptions:
    """Where and how a Ray sweep runs."""

    address: str | None = None  # a cluster's HOST:PORT (or auto, ray://...); None: $RAY_ADDRESS, else local
    cpus_per_run: int | None = None  # None: the run's ``threads`` when a number, else 1
    max_retries: int = MAX_RETRIES
    gpus_per_run: float = 1.0  # a fraction lets several runs share one GPU (the stand-ins are small)

    def target(self) -> str:
        """The address handed to ``ray.init``: ``local`` starts a new Ray instance on this machine."""
        return self.address or os.environ.get("RAY_ADDRESS") or "local"

    def source(self) -> str:
        """Where the address comes from, for messages."""
        return "--address" if self.address or not os.environ.get("RAY_ADDRESS") else "RAY_ADDRESS"


def check_address(options: RayOptions) -> None:
    """Fail fast, in one line, when nothing listens at a ``HOST:PORT`` address (Ray itself waits minutes)."""
    address, name = options.target(), options.source()
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{name} {address!r} is not HOST:PORT (valid: HOST:PORT, ray://HOST:PORT, auto)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        leave = "leave --address out" if name == "--address" else "unset RAY_ADDRESS"
        raise UserError(f"{name} {address}: no Ray cluster answers there ({exc.strerror or exc}); start one "
                        f"with `ray start --head`, or {leave} for a local Ray instance") from None


def forwarded_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of ``environ`` (default: this process's) that every worker gets."""
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in sorted(environ.items())
            if (k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES) and k not in NOT_FORWARDED}


def connect(options: RayOptions) -> Any:
    """``ray.init`` quietly and offline: a new local instance, or the cluster at ``options.address``."""
    os.environ.update(RAY_ENVIRONMENT)
    target = options.target()
    check_address(options)
    import ray

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
        try:
            ray.init(address=target, include_dashboard=False, logging_level=logging.WARNING,
                     runtime_env={"env_vars": forwarded_environment()})
        except ConnectionError as exc:
            raise UserError(f"{options.source()} {target}: {str(exc).splitlines()[0]}") from None
    return ray


def needs_gpu(device: str, cluster_gpus: float) -> bool:
    """A run takes one GPU when its device names CUDA, or is ``auto`` and the cluster has GPUs."""
    return device.startswith("cuda") or (device == "auto" and cluster_gpus > 0)


def run_resources(cfg: RunConfig, options: RayOptions, cluster_gpus: float) -> dict[str, float]:
    """What one run declares: its CPUs (``--cpus-per-run``, else its ``threads``, else 1) and, if it uses a GPU,
    ``--gpus-per-run`` of one (1: a whole GPU; 0.25: four runs share one)."""
    if cfg.device.startswith("cuda:") and cfg.device != "cuda:0":
        raise UserError(f"device={cfg.device}: on Ray a run uses the GPU Ray assigns it "
                        f"(valid with --backend ray: auto, cpu, cuda)")
    cpus = options.cpus_per_run or (int(cfg.threads) if cfg.threads.isdigit() else 1)
    return {"num_cpus": cpus, "num_gpus": options.gpus_per_run if needs_gpu(cfg.device, cluster_gpus) else 0}


def _check_feasible(ray: Any, resources: dict[str, float]) -> None:
    """Refuse a run that no node of the cluster can hold (Ray would wait for it forever)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(n.get("CPU", 0) >= resources["num_cpus"] and n.get("GPU", 0) >= resources["num_gpus"] for n in nodes):
        largest = max((int(n.get("CPU", 0)) for n in nodes), default=0)
        gpus = max((float(n.get("GPU", 0)) for n in nodes), default=0)
        raise UserError(f"a run needs {resources['num_cpus']} CPU(s) and {resources['num_gpus']} GPU(s), but the "
                        f"largest node of the Ray cluster has {largest} CPU(s) and {gpus:g} GPU(s) "
                        f"(lower --cpus-per-run, or use device=cpu)")


def _run_task(execute: Execute, runner: Any, cfg: RunConfig, run_id: str, cwd: str, cpus: int) -> Result:
    """One run inside a Ray worker: the driver's working directory, ``threads=auto`` as the CPUs declared."""
    from ilora.runner import available_cores

    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative paths (out_dir, caches) mean what they mean for the driver
    return execute(runner, cfg, run_id, -(-available_cores() // cpus))  # auto threads: cores // jobs <= cpus


def _one_line(exc: BaseException) -> str:
    """Ray's errors span many lines; the last one says what happened."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


def run_on_ray(todo: list[PlannedRun], runner: Any, execute: Execute, done: Done, options: RayOptions,
               jobs: int | None, say: Callable[[str], None]) -> None:
    """Run ``todo`` as Ray tasks, at most ``jobs`` at a time (None: as many as the cluster holds).

    Each task calls ``execute(runner, config, run_id, jobs)`` (the sweep's, passed in: no import cycle);
    ``done(run_id, record, seconds)`` is called as each finishes; a run whose worker died more than
    ``max_retries`` times is reported with status ``lost`` and no record is written."""
    from ilora.runner import write_record

    if not todo:
        return  # nothing to run: no cluster needed
    ray = connect(options)
    running: dict[Any, tuple[PlannedRun, float]] = {}
    try:
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        plan = [(run, run_resources(run.config, options, gpus)) for run in todo]
        for need in {tuple(sorted(r.items())) for _, r in plan}:
            _check_feasible(ray, dict(need))
        where = "a local Ray instance" if options.target() == "local" else f"the Ray cluster at {options.target()}"
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        say(f"ray: {where}, {nodes} node(s), {resources.get('CPU', 0):g} CPU(s), {gpus:g} GPU(s)")
        task = ray.remote(_run_task)
        cwd = os.getcwd()
        waiting = list(reversed(plan))
        while waiting or running:
            while waiting and (jobs is None or len(running) < jobs):
                run, need = waiting.pop()
                ref = task.options(name=f"ilora {run.run_id}", max_retries=options.max_retries, **need).remote(
                    execute, runner, run.config, run.run_id, cwd, need["num_cpus"])
                running[ref] = (run, time.perf_counter())
            finished, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in finished:
                run, t0 = running.pop(ref)
                try:
                    run_id, record, seconds = ray.get(ref)
                except ray.exceptions.RayError as exc:  # out of retries: no record, the checkpoint stays
                    error = _one_line(exc)
                    say(f"ray: {run.run_id} ran out of its {options.max_retries} retries: {error}")
                    done(run.run_id, {"status": "lost", "error": error}, time.perf_counter() - t0)
                    continue
                if not run.result_path.exists():  # a worker that does not share the driver's filesystem
                    write_record(run.result_path.parent, record)
                done(run_id, record, seconds)
    except BaseException:  # interrupted: stop every task (a run resumes from its round checkpoint)
        for ref in running:
            ray.cancel(ref, force=True)
        raise
    finally:
        ray.shutdown()
