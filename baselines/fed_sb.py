"""Fed-SB (Singhal et al., 2025), on LoRA-SB (Ponkshe et al., 2024): ``W0 + B R A`` with ``B``, ``A``
fixed and only the small ``r x r`` matrix ``R`` trained and averaged.

Initialisation (LoRA-SB, as the authors' code computes it before federated training): the gradient of
the training loss with respect to every adapted dense weight at ``W0`` over ``init_samples`` training
examples (spread evenly over the clients), turned into an approximate first update
``G = -init_step * sign(grad)``; its truncated SVD ``G ~ U_r S_r V_r^T`` gives ``B = U_r``,
``A = V_r^T`` (both frozen for the whole run) and ``R_0 = diag(S_r)`` at ``r_max``. The LoRA scale is 1
(LoRA-SB sets ``alpha = r``). A client of rank ``r_i`` uses ``B[:, :r_i]``, ``A[:r_i]`` and the top-left
``r_i x r_i`` block of ``R``.

Aggregation: ``R <- sum_i p_i pad(R_i)`` (zero-padded to ``r_max x r_max``), which is exact because every
client shares ``B`` and ``A``: ``sum_i p_i B pad(R_i) A`` is the average of the clients' updates
(tested in float64). The authors' code averages ``R`` uniformly over clients; here the data weights
``p_i`` are used, as for every other method.

Communication: ``r_i^2`` up and down per layer, plus the head; a client's first download also carries
its fixed ``B`` and ``A`` (``r_i (d + k)``, once). The initialisation's gradient pass is not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ilora.algorithm import (
    Algorithm,
    ClientModel,
    CommContext,
    Message,
    MethodConfig,
    clone_tensors,
    message_part,
    register,
)
from ilora.lowrank import cut_pair, pad_A, pad_B, pad_square, weighted_sum


def r_squared(c: CommContext) -> tuple[int, int]:
    """``r_i^2`` up and down; the fixed ``B``, ``A`` (``r_i (d + k)``) once, with the first download."""
    return c.rank**2, c.rank**2 + (c.rank * (c.d + c.k) if c.round == 0 else 0)


@dataclass
class FedSBConfig(MethodConfig):
    init_samples: int = 64  # training examples of the initialisation's gradient (spread over the clients)
    init_step: float = 1e-3  # G = -init_step * sign(grad): the approximate first update R_0 reproduces

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_samples < 1:
            raise ValueError(f"init_samples must be at least 1, got {self.init_samples}")
        if not self.init_step > 0:
            raise ValueError(f"init_step must be positive, got {self.init_step}")


@register("fed_sb", display_name="Fed-SB", comm=r_squared, comm_text="r_i^2 up, r_i^2 down (+ r_i(d+k) once)",
          groups=("extended",), aggregation=("weighted_sum", "its aggregate is the weighted sum of the uploaded R"))
class FedSB(Algorithm):
    """LoRA-SB's fixed ``B``, ``A`` from the first update's SVD; only ``R`` (``r x r``) is trained and averaged."""

    Config = FedSBConfig

    def __init__(self, fed, config=None):
        super().__init__(fed, config)
        r = fed.max_rank
        eye = lambda rows, cols: torch.eye(rows, cols, device=fed.device, dtype=fed.dtype)  # noqa: E731
        # Until ``initialize`` runs (a simulator calls it before round 1): orthonormal placeholders, R = 0.
        self.A = {n: eye(r, spec.in_features) for n, spec in fed.layers.items()}
        self.B = {n: eye(spec.out_features, r) for n, spec in fed.layers.items()}
        self.R = {n: torch.zeros(r, r, device=fed.device, dtype=fed.dtype) for n in fed.layers}
        self.has_factors: list[int] = []  # clients that already hold B and A

    def initialize(self, weight_gradient: Callable[[int], dict[str, Tensor]]) -> None:
        """LoRA-SB: ``B = U_r``, ``A = V_r^T``, ``R_0 = diag(S_r)`` of ``-init_step * sign(dL/dW)``."""
        r, fed = self.fed.max_rank, self.fed
        for n, grad in weight_gradient(self.config.init_samples).items():
            G = -self.config.init_step * torch.sign(grad.double())
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            k = min(r, S.shape[0])
            self.B[n] = pad_B(U[:, :k], r).to(fed.device, fed.dtype)
            self.A[n] = pad_A(Vh[:k], r).to(fed.device, fed.dtype)
            self.R[n] = pad_square(torch.diag(S[:k]), r).to(fed.device, fed.dtype)

    def download(self, cid: int) -> tuple[Message, ClientModel]:
        r = self.fed.ranks[cid]
        A, B = cut_pair(self.A, self.B, r)
        R = {n: m[:r, :r].clone() for n, m in self.R.items()}
        model = ClientModel(A=A, B=B, head=clone_tensors(self.head), scale=1.0, train_A=False, train_B=False, R=R)
        factors = ("R",) if cid in self.has_factors else ("A", "B", "R")
        if cid not in self.has_factors:
            self.has_factors.append(cid)
        return model.flat(factors=factors), model

    def receive(self, cid: int, message: Message, round_index: int) -> ClientModel:
        """The client keeps the fixed ``B``, ``A`` from its first download; ``R`` and the head come every round."""
        state = self.client_state(cid)
        if "A" not in state:
            state["A"], state["B"] = message_part(message, "lora_A"), message_part(message, "lora_B")
        return ClientModel(A=clone_tensors(state["A"]), B=clone_tensors(state["B"]), head=message_part(message, "head"),
                           scale=1.0, train_A=False, train_B=False, R=message_part(message, "lora_R"))

    def upload(self, cid: int, trained: ClientModel) -> Message:
        return trained.flat(factors=("R",))

    def aggregate(self, uploads: dict[int, Message], weights: dict[int, float]) -> None:
        cids = list(uploads)
        Rs = [message_part(uploads[c], "lora_R") for c in cids]
        w = [weights[c] for c in cids]
        r_max = self.fed.max_rank
        self.R = {n: weighted_sum((pad_square(R[n], r_max) for R in Rs), w) for n in self.fed.layers}
        self.average_head(uploads, weights)

    @classmethod
    def server_state_problem(cls, config: FedSBConfig) -> str | None:
        return None

    def server_state(self) -> dict[str, Tensor]:
        """The averaged ``R`` (``B``, ``A`` are fixed after the initialisation) and the head."""
        return {**{f"lora_R/{n}": m for n, m in self.R.items()}, **{f"head/{n}": h for n, h in self.head.items()}}

    def load_server_state(self, state: Mapping[str, Tensor]) -> None:
        for key, t in state.items():
            kind, _, name = key.partition("/")
            (self.R if kind == "lora_R" else self.head)[name] = t

    def eval_model(self) -> ClientModel:
        return ClientModel(A=self.A, B=self.B, head=self.head, scale=1.0, train_A=False, train_B=False, R=self.R)
