"""The server side on Flower: the simulator's round loop with the clients behind Flower's Grid.

Per round: the pre-drawn sampled clients' download messages go out as ArrayRecords, the clients
train (in parallel), their uploads come back, and the server aggregates, evaluates and records the
round exactly as ``ilora.simulation.Simulation.run`` does. The results record and the checkpoints
are written by ``ilora.runner.run_experiment``, as for an in-process run.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from ilora.algorithm import message_bytes
from ilora.config import check_splits
from ilora.errors import RunInterrupted
from ilora.flower.records import from_array_record, to_array_record, transmitted_bytes
from ilora.runner import RunParts
from ilora.server_update import aggregate_round
from ilora.simulation import RoundRecord, sum_in_order


class FlowerError(RunInterrupted):
    """A federation problem the run cannot go on from (one line; rerunning resumes)."""


class FlowerServer:
    """``run`` / ``algorithm`` as ``Simulation`` has them, for ``run_experiment``."""

    def __init__(self, parts: RunParts, grid: Grid, engine: str):
        self.cfg, self.parts, self.grid, self.engine = parts.cfg, parts, grid, engine
        check_splits(self.cfg)  # also when the config came through flwr run
        self.algorithm = parts.algorithm()
        self.evaluator = parts.simulation(self.algorithm, [], parts.test_data())  # the global test set
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.sizes: dict[int, int] = {}  # client id -> its number of training examples

    # ---------------------------------------------------------------------------- the round loop
    def run(self, start_round: int = 0, on_round: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
        cfg, algo = self.cfg, self.algorithm
        self.connect()
        if start_round == 0:
            algo.initialize(self.weight_gradient)
        trained_in = self.parts.sampling[:start_round]  # every sampled client trained in every finished round
        records = []
        rounds = tqdm(total=cfg.rounds, initial=start_round, desc="rounds", unit="round", disable=not cfg.progress)
        for t in range(start_round, cfg.rounds):
            wall0 = time.perf_counter()
            messages = {}
            for cid in self.parts.sampling[t]:
                download, _ = algo.download(cid)
                messages[cid] = (download, self.train_message(cid, t, download))
            replies = self.exchange({c: m for c, (_, m) in messages.items()}, t)
            uploads = {c: from_array_record(r.content.array_records["upload"], self.parts.device)
                       for c, r in sorted(replies.items())}
            metrics = {c: r.content.metric_records["metrics"] for c, r in replies.items()}
            self.check_states(t, metrics, trained_in)
            train_s = time.perf_counter() - wall0

            total = sum(self.sizes[c] for c in uploads)
            agg0 = time.perf_counter()
            aggregate_round(algo, uploads, {c: self.sizes[c] / total for c in uploads}, t)
            aggregate_s = time.perf_counter() - agg0

            eval0 = time.perf_counter()
            self.evaluator._compute_s = 0.0
            accuracy, loss, client_accuracy = self.evaluate_round(t + 1)
            eval_s = time.perf_counter() - eval0

            record = RoundRecord(
                round=t + 1, clients=list(uploads), accuracy=accuracy, loss=loss,
                train_loss=float(np.mean([metrics[c]["train_loss"] for c in uploads])),
                uplink_bytes=sum(message_bytes(u) for u in uploads.values()),
                downlink_bytes=sum(message_bytes(messages[c][0]) for c in uploads),
                train_s=train_s, compute_s=self.evaluator.compute_s + sum(metrics[c]["compute_s"] for c in uploads),
                aggregate_s=aggregate_s, eval_s=eval_s, wall_s=time.perf_counter() - wall0,
                first_step_update=float(np.mean([metrics[c]["first_step_update"] for c in uploads])),
                client_accuracy=client_accuracy, client_steps=[int(metrics[c]["steps"]) for c in uploads],
            )
            up = [transmitted_bytes(replies[c]) for c in uploads]
            down = [transmitted_bytes(messages[c][1]) for c in uploads]
            record.extra = {  # what Flower itself moved: the messages as serialised (array data + framing)
                "flower_uplink_bytes": sum(u[0] for u in up),
                "flower_uplink_framing_bytes": sum(u[0] - u[1] for u in up),
                "flower_downlink_bytes": sum(d[0] for d in down),
                "flower_downlink_framing_bytes": sum(d[0] - d[1] for d in down),
                "missing_clients": sorted(set(messages) - set(uploads)),
            }
            trained_in.append(list(uploads))
            records.append(record)
            rounds.set_postfix(acc=f"{accuracy:.4f}", loss=f"{loss:.3f}", refresh=False)
            rounds.update(1)
            if on_round is not None:
                on_round(record)
            if not math.isfinite(loss):
                break
        rounds.close()
        return records

    # ---------------------------------------------------------------------------- messages
    def train_message(self, cid: int, round_index: int, download: dict) -> Message:
        content = RecordDict({
            "message": to_array_record(download),
            "round": ConfigRecord({"round": round_index, "client": cid}),
        })
        return Message(content, dst_node_id=self.nodes[cid], message_type="train")

    def query(self, cid: int, what: str, values: dict | None = None, arrays: dict | None = None) -> Message:
        content = RecordDict({"query": ConfigRecord({"what": what, **(values or {})})})
        if arrays is not None:
            content["message"] = to_array_record(arrays)
        return Message(content, dst_node_id=self.nodes[cid], message_type="query")

    def exchange(self, messages: dict[int, Message], round_index: int | None) -> dict[int, Message]:
        """Send, wait for the replies (``flower_timeout``), and return them by client id; a client that
        failed or did not answer ends the run with one clear error unless ``flower_min_clients`` replies
        came back (then the round goes on without it, and the record names it)."""
        replies = list(self.grid.send_and_receive(list(messages.values()), timeout=self.cfg.flower_timeout))
        sent = {m.metadata.message_id: c for c, m in messages.items()}  # ids set by the push
        answered, failed, failures = {}, set(), []
        for reply in replies:  # an error for a node Flower found dead comes from the SuperLink: match by id
            cid = sent.get(reply.metadata.reply_to_message_id)
            if cid is None:
                continue
            if reply.has_error():
                failed.add(cid)
                failures.append(f"client {cid} failed: {reply.error.reason.strip().splitlines()[-1]}")
            else:
                answered[cid] = reply
        silent = sorted(set(messages) - set(answered) - failed)
        failures += [f"client {c} did not reply within flower_timeout={self.cfg.flower_timeout:g}s" for c in silent]
        where = f"round {round_index + 1}" if round_index is not None else "setup"
        needed = len(messages) if self.cfg.flower_min_clients is None or round_index is None else min(
            len(messages), self.cfg.flower_min_clients)
        if len(answered) < needed:
            raise FlowerError(f"{where}: {'; '.join(failures)} ({len(answered)} of {len(messages)} replied, "
                              f"{needed} needed); rerun the same command to resume from the last finished round")
        for failure in failures:
            print(f"warning: {where}: {failure}; the round goes on without it", file=sys.stderr)
        return answered

    # ---------------------------------------------------------------------------- setup and evaluation
    def connect(self) -> None:
        """Wait (up to ``flower_timeout``) for a node serving every client; learn their partition sizes."""
        deadline = time.monotonic() + self.cfg.flower_timeout
        while True:
            nodes = list(self.grid.get_node_ids())
            if len(nodes) >= self.cfg.num_clients or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        hello = [Message(RecordDict({"query": ConfigRecord({"what": "hello"})}), dst_node_id=n, message_type="query")
                 for n in nodes]
        for reply in self.grid.send_and_receive(hello, timeout=self.cfg.flower_timeout):
            if not reply.has_error():
                facts = reply.content.metric_records["hello"]
                cid = int(facts["partition_id"])
                self.nodes[cid], self.sizes[cid] = reply.metadata.src_node_id, int(facts["num_examples"])
        missing = sorted(set(range(self.cfg.num_clients)) - set(self.nodes))
        if missing:
            raise FlowerError(f"no SuperNode serves client(s) {missing} (connected nodes: {len(nodes)}); start one "
                              f"per client with --node-config 'partition-id=<i> num-partitions={self.cfg.num_clients}'")

    def weight_gradient(self, examples: int) -> dict:
        """``Simulation.weight_gradient`` with every client computing its part (summed here in the same order)."""
        per_client = -(-examples // self.cfg.num_clients)
        total = sum(min(per_client, self.sizes[c]) for c in range(self.cfg.num_clients))
        queries = {c: self.query(c, "weight_gradient", {"per_client": per_client, "total": total})
                   for c in range(self.cfg.num_clients)}
        replies = self.exchange(queries, None)
        parts = []
        for cid in range(self.cfg.num_clients):
            arrays = from_array_record(replies[cid].content.array_records["gradient"], self.parts.device)
            for i in range(1 + max((int(k.split("/")[0]) for k in arrays), default=-1)):
                parts.append({k.partition("/")[2]: v for k, v in arrays.items() if k.split("/")[0] == str(i)})
        return sum_in_order(parts)

    def evaluate_round(self, next_round: int) -> tuple[float, float, list[float]]:
        """The global model on the server; a personalised method's models on their own clients."""
        if not self.algorithm.info.personalised:
            accuracy, loss = self.evaluator.evaluate(self.algorithm.eval_model())
            return accuracy, loss, []
        queries = {c: self.query(c, "evaluate", {"round": next_round}, self.algorithm.download(c)[0])
                   for c in range(self.cfg.num_clients)}
        replies = self.exchange(queries, None)
        results = [replies[c].content.metric_records["evaluation"] for c in range(self.cfg.num_clients)]
        accuracies = [float(r["accuracy"]) for r in results]
        return float(np.mean(accuracies)), float(np.mean([float(r["loss"]) for r in results])), accuracies

    def check_states(self, round_index: int, metrics: dict, trained_in: list[list[int]]) -> None:
        """Each client must have started from its state after the last round it trained in (not checked when
        ``flower_min_clients`` lets rounds go on without some clients)."""
        if self.cfg.flower_min_clients is not None:
            return
        for cid, m in metrics.items():
            expected = max((t for t, clients in enumerate(trained_in) if cid in clients), default=-1)
            if int(m["state_round"]) != expected:
                raise FlowerError(
                    f"round {round_index + 1}: client {cid} started from its state of round {int(m['state_round']) + 1}"
                    f" but last trained in round {expected + 1}: its node lost its state dir (node config state-dir)")
