"""Reading what W&B wrote offline, for the tests: the records of an offline run's ``.wandb`` file.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then 32 KiB blocks
of chunks (crc32, length, type: full / first / middle / last), each record a ``wandb.proto`` ``Record``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    """Every record of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, (ident, magic)
    pos, pending, records = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _key(item: Any) -> tuple[str, ...]:
    return (item.key,) if item.key else tuple(item.nested_key)


def _nest(items: Any) -> dict[str, Any]:
    """Key/value items (nested keys as nested dicts) with their JSON values decoded."""
    out: dict[str, Any] = {}
    for item in items:
        *parents, last = _key(item)
        target = out
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = json.loads(item.value_json)
    return out


@dataclass
class OfflineRun:
    """What one offline run holds, decoded."""

    directory: Path
    run: Any  # the RunRecord: run_group, job_type, display_name, tags, project, host
    config: dict[str, Any]
    history: list[dict[str, Any]]  # one dict per logged step, with its "_step"
    summary: dict[str, Any]
    artifacts: list[Any] = field(default_factory=list)  # ArtifactRecords
    kinds: set[str] = field(default_factory=set)  # the record types present

    @property
    def files(self) -> Path:
        return self.directory / "files"


def offline_run(directory: Path) -> OfflineRun:
    """Decode the ``offline-run-*`` directory's ``.wandb`` file."""
    (path,) = directory.glob("*.wandb")
    records = read_records(path)
    run, history, summary, artifacts, kinds = None, [], {}, [], set()
    for record in records:
        kind = record.WhichOneof("record_type")
        kinds.add(kind)
        if kind == "run" and run is None:
            run = record.run
        elif kind == "history":
            history.append(_nest(record.history.item))
        elif kind == "summary":
            summary.update(_nest(record.summary.update))
        elif kind == "artifact":
            artifacts.append(record.artifact)
    assert run is not None, f"no run record in {path}"
    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    return OfflineRun(directory, run, config, history, summary, artifacts, kinds)


def offline_runs(root: Path) -> list[Path]:
    """Every ``offline-run-*`` directory under ``root``."""
    return sorted(root.rglob("offline-run-*"))
