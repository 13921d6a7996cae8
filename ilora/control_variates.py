"""Rank-aware control variates (SCAFFOLD, option I) as a component any method can switch on.

The server keeps ``c`` shaped like a rank-``r_max`` client's trained tensors (factors zero-padded);
client ``i`` keeps ``c_i`` at its own rank ``r_i``. Per round and sampled client:

- down: ``c`` cut to ``r_i`` (the first ``r_i`` rows of ``A``-shaped, columns of ``B``-shaped entries);
- before local training: ``c_i_new`` = the full local gradient at the received model;
- every local step: the gradient gets ``c - c_i`` added;
- up: ``dc_i = c_i_new - c_i``; the client keeps ``c_i <- c_i_new``;
- server: ``c <- c + (1 / N) sum_i pad(dc_i)`` with ``N`` the number of clients (all of them, not
  only the sampled ones, as SCAFFOLD).

``estimator``: ``scaffold`` is the true mean gradient in training mode; ``code`` reproduces the ILoRA
authors' estimate (model in eval mode, gradients of each batch's mean loss summed and divided by the
number of examples, about ``1 / batch_size`` of the mean gradient). The messages carry the same
shapes as the trained tensors, so control variates double a method's traffic both ways.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from ilora.algorithm import Federation, Gradients, Message
from ilora.lowrank import cut_flat, pad_flat

CV_PREFIX = "cv/"
Estimator = Literal["scaffold", "code"]


class ControlVariates:
    """Server and client control variates of one run (checkpointed with the algorithm's state)."""

    checkpoint_static = ("fed",)  # attributes that the checkpoint leaves out (rebuilt on resume)

    def __init__(
        self, fed: Federation, head: Mapping[str, Tensor], factors: Iterable[str] = ("A", "B"),
        estimator: str = "scaffold",
    ):
        self.fed = fed
        self.estimator = estimator
        self.factors = tuple(factors)
        self.c = self.zeros(fed.max_rank, head)  # server control variate at r_max
        self.client_c: dict[int, Message] = {}  # c_i at r_i, created on first use
        self.pending: dict[int, Message] = {}  # c_i_new of the clients training this round
        self.received: dict[int, Message] = {}  # a client replica's copy of c (cut), from its download

    def zeros(self, rank: int, head: Mapping[str, Tensor]) -> Message:
        """Zero tensors shaped like a rank-``rank`` client's trained tensors (flat names)."""
        fed, z = self.fed, {}
        for name, spec in fed.layers.items():
            if "A" in self.factors:
                z[f"lora_A/{name}"] = torch.zeros(rank, spec.in_features, device=fed.device, dtype=fed.dtype)
            if "B" in self.factors:
                z[f"lora_B/{name}"] = torch.zeros(spec.out_features, rank, device=fed.device, dtype=fed.dtype)
        for name, h in head.items():
            z[f"head/{name}"] = torch.zeros_like(h)
        return z

    def client(self, cid: int) -> Message:
        if cid not in self.client_c:
            rank = self.fed.ranks[cid]
            self.client_c[cid] = {k: torch.zeros_like(cut_flat(k, v, rank)) for k, v in self.c.items()}
        return self.client_c[cid]

    # -- client side ---------------------------------------------------------------------------
    def download(self, cid: int) -> Message:
        """``c`` cut to client ``cid``'s rank, under ``cv/`` names."""
        r = self.fed.ranks[cid]
        return {CV_PREFIX + k: cut_flat(k, v, r) for k, v in self.c.items()}

    def receive(self, cid: int, message: Message) -> None:
        """Client replica: keep the ``c`` (cut to the client's rank) that came with the download."""
        self.received[cid] = {k[len(CV_PREFIX):]: v for k, v in message.items() if k.startswith(CV_PREFIX)}

    def local_start(self, cid: int, full_gradient: Callable[..., Gradients]) -> None:
        """``c_i_new``: the full local gradient at the received model (by ``estimator``)."""
        old = self.client(cid)
        code = self.estimator == "code"
        grads = full_gradient(batch_means=code, eval_mode=code)
        self.pending[cid] = {k: grads[k].detach().to(old[k]) for k in old}

    def correction(self, cid: int) -> Gradients:
        """``c - c_i`` (``c`` cut to the client's rank), added to every local gradient."""
        r = self.fed.ranks[cid]
        c_i = self.client(cid)
        c = self.received.pop(cid, None)  # on a client replica, else the server's own (in-process)
        return {k: (c[k] if c is not None else cut_flat(k, self.c[k], r)) - c_i[k] for k in c_i}

    def upload(self, cid: int) -> Message:
        """``dc_i = c_i_new - c_i`` under ``cv/`` names; the client keeps ``c_i_new``."""
        old, new = self.client(cid), self.pending.pop(cid)
        self.client_c[cid] = new
        return {CV_PREFIX + k: new[k] - old[k] for k in new}

    # -- server side ---------------------------------------------------------------------------
    def aggregate(self, uploads: Mapping[int, Message]) -> None:
        """``c <- c + (1 / N) sum_i pad(dc_i)`` over the uploads."""
        r_max, n_clients = self.fed.max_rank, self.fed.num_clients
        for k in self.c:
            dc = sum(pad_flat(k, uploads[c][CV_PREFIX + k], r_max) for c in uploads)
            self.c[k] = self.c[k] + dc / n_clients


def without_control_variates(uploads: Mapping[int, Message]) -> dict[int, Message]:
    """The uploads with the ``cv/`` entries left out (what the method itself aggregates)."""
    return {c: {k: v for k, v in msg.items() if not k.startswith(CV_PREFIX)} for c, msg in uploads.items()}


def attach(algorithm: Any, factors: Iterable[str] = ("A", "B"), estimator: str = "scaffold") -> ControlVariates:
    """Switch control variates on for ``algorithm`` (its ``Algorithm`` hooks then use them)."""
    algorithm.control_variates = ControlVariates(algorithm.fed, algorithm.head, factors, estimator)
    return algorithm.control_variates
