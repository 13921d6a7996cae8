"""What the server does around a method's aggregation, the same for every method: the server optimiser
(Reddi et al. 2021) and client-level differential privacy (DP-FedAvg, McMahan et al. 2018).

``aggregate_round`` is the one call both engines make per round. With ``server_optimizer=fedavg`` and
``dp=none`` it is the method's ``aggregate`` and nothing else. Otherwise it works on the method's global
tensors (``Algorithm.server_state``), restricted to the tensors the clients sent this round:

1. the method aggregates as usual, giving ``x_agg``;
2. client-level DP: Gaussian noise on ``x_agg`` (the uploads were clipped on the clients, ``clip_update``);
3. the optimiser steps from the state the clients held: ``x_t`` times each entry's coverage (the share of
   the round's weight whose clients trained that entry: a rank-2 client never held rows 3.. of ``A``),
   along the pseudo-gradient ``Delta = x_agg - coverage * x_t``. The coverage keeps a method's own
   zero-padding (FedIT's average shrinks rows few clients train) out of the pseudo-gradient, so only
   trained changes drive momentum and the adaptive moments (docs/optimisers.md).

Tensors the clients did not send this round (FFA-LoRA's frozen ``A``, RoLoRA's resting factor) keep their
values and their moments. The optimiser's moments are attributes of a component on the algorithm, so the
round checkpoints save them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ilora.algorithm import Algorithm, ClientModel, Message
from ilora.control_variates import CV_PREFIX

DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadagrad": 0.01, "fedadam": 0.01, "fedyogi": 0.01}


class ServerOptimizer:
    """FedAvgM / FedAdagrad / FedAdam / FedYogi on flat-named global tensors (moments created on first use)."""

    checkpoint_static = ("kind", "lr", "momentum", "beta1", "beta2", "tau")

    def __init__(self, kind: str, lr: float | None = None, momentum: float = 0.9, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3):
        self.kind = kind
        self.lr = DEFAULT_SERVER_LR[kind] if lr is None else float(lr)
        self.momentum, self.beta1, self.beta2, self.tau = momentum, beta1, beta2, tau
        self.m: dict[str, Tensor] = {}  # FedAvgM's velocity, or the adaptive optimisers' first moment
        self.v: dict[str, Tensor] = {}  # the adaptive optimisers' second moment (starts at tau^2)

    def step(self, key: str, base: Tensor, aggregated: Tensor) -> Tensor:
        """The new value of one global tensor from where the clients started (``base``) and ``x_agg``."""
        delta = aggregated - base
        if self.kind == "fedavgm":
            previous = self.m.get(key, torch.zeros_like(delta))
            self.m[key] = self.momentum * previous + delta
            # x_agg + (lr - 1) Delta + lr beta m_prev == base + lr m, written so that lr 1 and beta 0 give
            # x_agg exactly (FedAvg, bit for bit)
            return aggregated + ((self.lr - 1.0) * delta + (self.lr * self.momentum) * previous)
        m = self.m.get(key, torch.zeros_like(delta))
        v = self.v.get(key, torch.full_like(delta, self.tau**2))
        m = self.beta1 * m + (1 - self.beta1) * delta
        square = delta * delta
        if self.kind == "fedadagrad":
            v = v + square
        elif self.kind == "fedadam":
            v = self.beta2 * v + (1 - self.beta2) * square
        elif self.kind == "fedyogi":
            v = v - (1 - self.beta2) * square * torch.sign(v - square)
        else:
            raise ValueError(f"unknown server_optimizer {self.kind!r}")
        self.m[key], self.v[key] = m, v
        return base + self.lr * m / (v.sqrt() + self.tau)


class ClientPrivacy:
    """Client-level DP: each client's update clipped to ``clip`` (on the client), Gaussian noise on the aggregate.

    Noise standard deviation per round: ``sigma * clip * max_i p_i u_i`` over the round's clients, with ``p_i``
    the method's aggregation weight and ``u_i`` the factor a method applies to a client's ``B`` in the global
    units (1 unless it folds scales): the most one client's clipped update can move an aggregated entry. With
    equal weights it is DP-FedAvg's ``sigma C / m``. The noise is drawn from a generator seeded by the run seed
    and the round, so both engines and a resumed run draw the same.
    """

    checkpoint_static = ("clip", "noise_multiplier", "seed")

    def __init__(self, clip: float, noise_multiplier: float, seed: int):
        self.clip, self.noise_multiplier, self.seed = clip, noise_multiplier, seed

    def noise_std(self, algo: Algorithm, weights: Mapping[int, float]) -> float:
        unit = getattr(algo, "unit", lambda cid: 1.0)
        return self.noise_multiplier * self.clip * max(w * max(1.0, unit(c)) for c, w in weights.items())

    def add_noise(self, state: dict[str, Tensor], std: float, round_index: int) -> dict[str, Tensor]:
        if std == 0:
            return state
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([self.seed, round_index, 0xD9]).generate_state(1)[0]))
        noisy = {}
        for key in sorted(state):
            t = state[key]
            noise = torch.randn(t.shape, generator=g, dtype=torch.float64) * std
            noisy[key] = t + noise.to(t.device, t.dtype)
        return noisy


def clip_update(upload: Message, start: ClientModel, clip: float) -> Message:
    """``start + u * min(1, clip / ||u||)`` with ``u`` the upload minus what the client started from, over all
    the uploaded tensors together (a tensor cut by the client, e.g. HetLoRA's pruned rank, is compared with
    the same block of its start)."""
    origin = start.flat(factors=("A", "B", "R"))
    updates = {}
    for key, t in upload.items():
        if key.startswith(CV_PREFIX) or key not in origin:
            raise ValueError(f"client-level DP cannot clip the uploaded tensor {key!r}: it is not a trained tensor")
        o = origin[key][tuple(slice(0, n) for n in t.shape)]
        updates[key] = t - o.to(t)
    norm = float(torch.sqrt(sum((u.double() ** 2).sum() for u in updates.values())))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    if factor == 1.0:
        return dict(upload)
    return {k: upload[k] - updates[k] + updates[k] * factor for k in upload}


def coverage(key: str, shape: torch.Size, uploads: Mapping[int, Message], weights: Mapping[int, float],
             like: Tensor) -> Tensor:
    """Per entry of a global tensor: the total weight of the clients whose upload held that entry."""
    total = torch.zeros(shape, dtype=torch.float64, device=like.device)
    for c, msg in uploads.items():
        if key in msg:
            ones = torch.ones(msg[key].shape, dtype=torch.float64, device=like.device)
            padded = torch.zeros(shape, dtype=torch.float64, device=like.device)
            padded[tuple(slice(0, n) for n in ones.shape)] = ones
            total += weights[c] * padded
    return total.to(like.dtype)


def aggregate_round(algo: Algorithm, uploads: dict[int, Message], weights: dict[int, float], round_index: int) -> None:
    """The method's aggregation, then client-level DP noise and the server optimiser when they are on."""
    optimizer: ServerOptimizer | None = getattr(algo, "server_optimizer", None)
    privacy: ClientPrivacy | None = getattr(algo, "client_privacy", None)
    if optimizer is None and privacy is None:
        algo.aggregate(uploads, weights)
        return
    sent = sorted({k for msg in uploads.values() for k in msg if not k.startswith(CV_PREFIX)})
    before = {k: v.clone() for k, v in algo.server_state().items() if k in sent}
    algo.aggregate(uploads, weights)
    after = {k: v for k, v in algo.server_state().items() if k in before}
    if privacy is not None:
        after = privacy.add_noise(after, privacy.noise_std(algo, weights), round_index)
    if optimizer is not None:
        after = {k: optimizer.step(k, before[k] * coverage(k, before[k].shape, uploads, weights, before[k]), x)
                 for k, x in after.items()}
    algo.load_server_state(after)


def attach_server_update(algo: Algorithm, cfg: Any, noise_multiplier: float | None) -> None:
    """Switch on the run's server optimiser and client-level DP on ``algo`` (from a ``RunConfig``)."""
    if cfg.server_optimizer != "fedavg":
        algo.server_optimizer = ServerOptimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_momentum,
                                                cfg.server_beta1, cfg.server_beta2, cfg.server_tau)
    if cfg.dp == "client":
        algo.client_privacy = ClientPrivacy(cfg.dp_clip, float(noise_multiplier or 0.0), algo.fed.seed)
