"""The client side on Flower: one partition, trained with the simulator's own local-training code.

A ClientApp process may serve several clients (Flower's simulation engine runs many virtual nodes in
a few worker processes): the data, backbone and algorithm replica are built once per process and run
config; what belongs to one client (its partition, its state) is looked up by partition id. A
client's state lives in Flower's context (``context.state``) and is also written to its node's disk
after every round it trains, versioned by round, so that a restarted SuperNode picks up where the
killed one stopped and a round the server repeats after a crash starts from the state before it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ilora.checkpoint import from_tensors, to_tensors
from ilora.config import RunConfig, config_hash
from ilora.flower.records import from_array_record, state_from_records, state_records, to_array_record
from ilora.quiet import quiet_libraries
from ilora.runner import RunParts, build_partition, build_parts, resolve_threads, run_id_for

STATE_KEY = "ilora.client"  # the record names of a client's state in context.state
STATE_VERSIONS_KEPT = 2  # on disk: the state after the client's last round and the one before it


@dataclass
class ClientSide:
    """What one process builds once per run config: the shared backbone, the replica, each client's data."""

    parts: RunParts
    replica: Any  # an Algorithm used only for its client side
    data: dict[int, dict] = field(default_factory=dict)
    test: dict | None = None

    def simulation(self, cid: int):
        if cid not in self.data:
            self.data[cid] = self.parts.client_data(cid)
        return self.parts.simulation(self.replica, {cid: self.data[cid]}, {})


_BUILT: dict[str, ClientSide] = {}


def client_side(cfg: RunConfig) -> ClientSide:
    key = f"{config_hash(cfg)}:{cfg.out_dir}:{cfg.device}:{cfg.threads}"
    if key not in _BUILT:
        _BUILT.clear()  # one run at a time per process
        quiet_libraries()  # a ClientApp's process (a Ray actor) is not the CLI's: quiet it too
        torch.set_num_threads(resolve_threads(cfg.threads))
        parts = build_parts(cfg)
        _BUILT[key] = ClientSide(parts, parts.algorithm())
    return _BUILT[key]


def partition_id(context: Context, num_clients: int) -> int:
    """The client id this node serves: ``partition-id`` of its node config (0-based)."""
    try:
        pid = int(context.node_config["partition-id"])
    except (KeyError, ValueError):
        raise ValueError("this SuperNode has no integer partition-id in its node config "
                         "(start it with --node-config 'partition-id=<i> num-partitions=<N>')") from None
    if not 0 <= pid < num_clients:
        raise ValueError(f"partition-id {pid} is outside the run's clients 0..{num_clients - 1}")
    return pid


# ------------------------------------------------------------------------------------------- state
def state_dir(cfg: RunConfig, context: Context, cid: int) -> Path:
    """Where this client keeps its state on disk: ``<state-dir>/<run id>/client-<i>`` with the node config's
    ``state-dir``, else ``<out_dir>/<run id>/flower-clients/client-<i>`` (removed when the run is complete)."""
    if context.node_config.get("state-dir"):
        return Path(str(context.node_config["state-dir"])) / run_id_for(cfg) / f"client-{cid}"
    return Path(cfg.out_dir) / run_id_for(cfg) / "flower-clients" / f"client-{cid}"


def save_state(cfg: RunConfig, context: Context, cid: int, state: Any, round_index: int) -> None:
    """Keep the client's state after round ``round_index``: in the context, and on disk (last two versions)."""
    arrays, config = state_records(state, round_index)
    context.state[f"{STATE_KEY}.arrays"] = arrays
    context.state[f"{STATE_KEY}.config"] = config
    folder = state_dir(cfg, context, cid)
    folder.mkdir(parents=True, exist_ok=True)
    skeleton, tensors = to_tensors(state)
    path = folder / f"state-{round_index:05d}.safetensors"
    tmp = folder / f".{path.name}.tmp"
    save_file(tensors, str(tmp), metadata={"skeleton": json.dumps(skeleton), "round": str(round_index)})
    os.replace(tmp, path)
    for old in sorted(folder.glob("state-*.safetensors"))[:-STATE_VERSIONS_KEPT]:
        old.unlink(missing_ok=True)


def load_state(cfg: RunConfig, context: Context, cid: int, before_round: int, device) -> tuple[Any, int]:
    """The client's newest state from a round before ``before_round`` (context first, then disk);
    ``({}, -1)`` if it has none (it has not trained yet)."""
    if f"{STATE_KEY}.config" in context.state.config_records:
        config = context.state.config_records[f"{STATE_KEY}.config"]
        round_index = int(config["round"])
        if round_index < before_round:
            return state_from_records(context.state.array_records[f"{STATE_KEY}.arrays"], config, device), round_index
    folder = state_dir(cfg, context, cid)
    versions = sorted(folder.glob("state-*.safetensors")) if folder.is_dir() else []
    for path in reversed(versions):
        round_index = int(path.stem.split("-")[1])
        if round_index < before_round:
            with safe_open(str(path), "pt") as f:
                skeleton = f.metadata()["skeleton"]
            return from_tensors(json.loads(skeleton), load_file(str(path)), device), round_index
    return {}, -1


# ------------------------------------------------------------------------------------------- handlers
def handle_query(cfg: RunConfig, msg: Message, context: Context) -> Message:
    """``hello``: which client this node serves and how many examples it holds; ``weight_gradient``:
    its share of the gradient at ``W0`` (Fed-SB's initialisation); ``evaluate``: a personalised
    method's own model of this client on the global test set."""
    cid = partition_id(context, cfg.num_clients)
    what = str(msg.content.config_records["query"]["what"])
    if what == "hello":  # the partition only: no model to build
        metrics = {"partition_id": cid, "num_examples": len(build_partition(cfg)[2][cid])}
        return Message(RecordDict({"hello": MetricRecord(metrics)}), reply_to=msg)
    side = client_side(cfg)
    if what == "weight_gradient":
        q = msg.content.config_records["query"]
        sim = side.simulation(cid)
        per_batch = sim.weight_gradient_parts(cid, int(q["per_client"]), int(q["total"]))
        arrays = {f"{i}/{name}": g for i, batch in enumerate(per_batch) for name, g in batch.items()}
        return Message(RecordDict({"gradient": to_array_record(arrays)}), reply_to=msg)
    if what == "evaluate":
        q = msg.content.config_records["query"]
        round_index = int(q["round"])
        state, _ = load_state(cfg, context, cid, round_index, side.parts.device)
        side.replica.load_client_side_state(cid, state)
        model = side.replica.receive(cid, from_array_record(msg.content.array_records["message"], side.parts.device),
                                     round_index)
        side.replica.load_client_side_state(cid, {})
        if side.test is None:
            side.test = side.parts.test_data()
        sim = side.parts.simulation(side.replica, {}, side.test)
        accuracy, loss = sim.evaluate(model)
        return Message(RecordDict({"evaluation": MetricRecord({"accuracy": accuracy, "loss": loss})}), reply_to=msg)
    raise ValueError(f"unknown query {what!r} (valid: hello, weight_gradient, evaluate)")


def handle_train(cfg: RunConfig, msg: Message, context: Context) -> Message:
    """One round of local training for this node's client: receive, train, upload, keep the state."""
    side = client_side(cfg)
    cid = partition_id(context, cfg.num_clients)
    round_config = msg.content.config_records["round"]
    round_index, expected = int(round_config["round"]), int(round_config["client"])
    if expected != cid:
        raise ValueError(f"message for client {expected} reached the node serving client {cid}")
    device = side.parts.device
    state, state_round = load_state(cfg, context, cid, round_index, device)
    replica = side.replica
    replica.load_client_side_state(cid, state)
    try:
        model = replica.receive(cid, from_array_record(msg.content.array_records["message"], device), round_index)
        sim = side.simulation(cid)
        t0 = time.perf_counter()
        upload, loss, first_step, steps = sim.client_round(round_index, cid, model)
        save_state(cfg, context, cid, replica.client_side_state(cid), round_index)
    finally:
        replica.load_client_side_state(cid, {})
    metrics = MetricRecord({
        "train_loss": loss, "first_step_update": first_step, "compute_s": sim.compute_s, "steps": steps,
        "train_s": time.perf_counter() - t0, "state_round": state_round,
    })
    return Message(RecordDict({"upload": to_array_record(upload), "metrics": metrics}), reply_to=msg)
