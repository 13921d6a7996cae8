"""A Flower deployment on this machine: a SuperLink and one SuperNode per client as separate
processes on localhost, a run of the suite's Flower App through ``flwr run``, then exactly the
started processes stopped (``make flower-local``; docs/flower.md).

Insecure mode (plain HTTP on 127.0.0.1, no node authentication): for a local trial only; give
``--tls DIR`` (``ca.crt``, ``server.pem``, ``server.key``) for TLS. Ports are picked free at start.

    python -m ilora.flower.local [--supernodes N] [--keep] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ilora.flower import SERVER_OVERRIDES_ENV, set_offline_environment, split_overrides

BIN = Path(sys.executable).parent
APP_DIR = Path(__file__).resolve().parents[2] / "flower"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with code {process.returncode} (see its log)")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class LocalDeployment:
    """A SuperLink and SuperNodes started by this object, and only those stopped by it."""

    def __init__(self, workdir: Path, supernodes: int, tls: Path | None = None, operator: list[str] = ()):
        """``operator``: the ``key=value`` settings of the machines' operator (``out_dir``, ``threads``, ...),
        given to the SuperLink and SuperNodes in ``ILORA_FLOWER_SERVER_OVERRIDES``; a ``flwr run`` caller
        cannot set them."""
        self.workdir, self.supernodes, self.tls = workdir, supernodes, tls
        self.processes: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.env = {**os.environ, **set_offline_environment(), "FLWR_HOME": str(workdir / "flwr-home"),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", SERVER_OVERRIDES_ENV: shlex.join(operator)}
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"

    def security(self, node: bool) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        if node:
            return ["--root-certificates", str(self.tls / "ca.crt")]
        return ["--ssl-ca-certfile", str(self.tls / "ca.crt"), "--ssl-certfile", str(self.tls / "server.pem"),
                "--ssl-keyfile", str(self.tls / "server.key")]

    def start(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        tls = "insecure = true" if self.tls is None else f'root-certificates = "{self.tls / "ca.crt"}"'
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\n'
            f'address = "127.0.0.1:{self.port}"\n{tls}\n')
        self.spawn("superlink", [str(BIN / "flower-superlink"), *self.security(False), "--port", str(self.port),
                                 "--database", str(self.workdir / "superlink.db"),
                                 "--disable-runtime-dependency-installation"])
        wait_for_port(self.port, 60, self.processes["superlink"])
        for i in range(self.supernodes):
            self.start_supernode(i)

    def start_supernode(self, i: int) -> None:
        node_config = f"partition-id={i} num-partitions={self.supernodes}"
        self.spawn(f"supernode-{i}", [str(BIN / "flower-supernode"), *self.security(True), "--superlink",
                                      f"127.0.0.1:{self.port}", "--port", str(free_port()),
                                      "--node-config", node_config])

    def spawn(self, name: str, command: list[str]) -> None:
        log = open(self.workdir / "logs" / f"{name}.log", "a")  # noqa: SIM115 (kept open for the process)
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True)

    def submit(self, overrides: list[str], output=None) -> subprocess.Popen:
        """Start ``flwr run`` on the app with the caller's overrides, streaming the run's output to ``output``."""
        command = [str(BIN / "flwr"), "run", str(APP_DIR), "local-deployment", "--stream",
                   "-c", f"overrides={json.dumps(shlex.join(overrides))}"]
        return subprocess.Popen(command, env=self.env, stdout=output, stderr=subprocess.STDOUT if output else None)

    def run(self, overrides: list[str], timeout: float, output=None) -> int:
        """``flwr run`` to its end (or ``timeout``); its exit code (Flower's: 0 even when the ServerApp failed)."""
        process = self.submit(overrides, output)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            print(f"flwr run did not finish within {timeout:g}s", file=sys.stderr)
            return 124

    def kill(self, name: str) -> None:
        """``kill -9`` one started process (e.g. a SuperNode in the fault drill)."""
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        """SIGTERM the started processes, SIGKILL whatever of them and their children is left after 15 s."""
        tree = {name: [p.pid, *descendants(p.pid)] for name, p in self.processes.items()}
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in (pid for pids in tree.values() for pid in pids):
            try:
                os.kill(pid, signal.SIGKILL)  # a child left behind (e.g. a ClientApp still training)
            except ProcessLookupError:
                pass
        self.processes.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ilora.flower.local", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="the suite's key=value settings (default: preset=smoke)")
    parser.add_argument("--supernodes", type=int, default=None, help="SuperNodes to start (default: num_clients)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/flower-local"), help="logs and Flower's state")
    parser.add_argument("--tls", type=Path, default=None, help="a directory with ca.crt, server.pem, server.key")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds flwr run may take")
    args = parser.parse_args(argv)

    from ilora.config import resolve_config
    from ilora.errors import UserError
    from ilora.runner import run_id_for

    overrides = args.overrides or ["preset=smoke"]
    try:
        cfg = resolve_config(overrides)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    caller, operator = split_overrides([*overrides, f"out_dir={Path(cfg.out_dir).resolve()}"])
    deployment = LocalDeployment(args.workdir.resolve(), args.supernodes or cfg.num_clients, args.tls, operator)
    try:
        deployment.start()
        print(f"SuperLink on 127.0.0.1:{deployment.port}, {deployment.supernodes} SuperNodes "
              f"(logs: {deployment.workdir / 'logs'})", file=sys.stderr)
        code = deployment.run(caller, args.timeout)
    finally:
        deployment.stop()
    record_path = Path(cfg.out_dir).resolve() / run_id_for(cfg) / "result.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is None or record.get("status") != "ok":
        print(f"error: the run did not finish (flwr run exit code {code}); see {deployment.workdir / 'logs'} "
              "and the ServerApp's output above; rerunning resumes from the last finished round", file=sys.stderr)
        return 1
    print(f"results record: {record_path} (final accuracy {record['final_accuracy']:.4f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
