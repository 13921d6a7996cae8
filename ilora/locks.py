"""One process trains a run at a time: a lock file per run directory, taken over when its holder is dead.

Two sweeps (or a sweep and an ``ilora run``) on the same out dir would otherwise both train every pending
run. The lock is ``<run_dir>/run.lock``, created atomically (``O_EXCL``) with the holder's host, process
id and start time. A lock whose process no longer exists on this host, or has exited and awaits reaping
(a zombie: a killed sweep's worker), is stale: it is moved aside atomically, so that of two processes finding it
only one takes it over. So is a lock left empty by a process killed between creating and writing it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = "run.lock"
TORN_AFTER_S = 10.0  # an unreadable lock this old was left by a process killed while writing it
_created: dict[Path, list[Path]] = {}  # lock -> the directories acquire() created for it, innermost first


class RunLocked(Exception):
    """Another live process holds the run's lock."""

    def __init__(self, path: Path, holder: dict) -> None:
        self.path, self.holder = path, holder
        super().__init__(f"process {holder.get('pid')} on {holder.get('host')} is training this run "
                         f"(since {holder.get('started')}; lock {path})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits to be reaped (its parent was killed, say): it holds nothing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc here, or gone meanwhile
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _read(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _create(path: Path) -> bool:
    """Create the lock file with our details; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    return True


def _torn(path: Path) -> bool:
    """An unreadable lock that is too old to be being written: its writer was killed."""
    try:
        return time.time() - path.stat().st_mtime > TORN_AFTER_S
    except FileNotFoundError:
        return False


def acquire(run_dir: Path) -> Path:
    """Take ``run_dir``'s lock, taking over a stale one; ``RunLocked`` if a live process holds it.

    The directories it had to create are remembered, so that ``release`` removes them again when the run
    left nothing in them."""
    missing = [d for d in [run_dir, *run_dir.parents] if not d.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    _created[path] = missing
    for _ in range(3):
        if _create(path):
            return path
        holder = _read(path)
        if holder is None:  # being written right now (look again), or torn by a kill (stale)
            if not _torn(path):
                time.sleep(0.1)
                continue
        elif holder.get("host") != socket.gethostname() or _alive(int(holder.get("pid", -1))):
            raise RunLocked(path, holder)
        stale = path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(path, stale)  # only one of several processes finding the stale lock gets it
        except FileNotFoundError:
            continue
        stale.unlink(missing_ok=True)
    holder = _read(path) or {}
    raise RunLocked(path, holder)


def release(path: Path) -> None:
    """Remove the lock if it is still ours, and the run directory with it if nothing else is in it (a run
    stopped by bad input before any work leaves nothing behind)."""
    holder = _read(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
        for directory in _created.pop(path, [path.parent]):
            try:
                directory.rmdir()
            except OSError:  # not empty: the run's record and files
                break


@contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """``with run_lock(dir):`` train; ``RunLocked`` before anything if another live process is training it."""
    path = acquire(run_dir)
    try:
        yield path
    finally:
        release(path)
