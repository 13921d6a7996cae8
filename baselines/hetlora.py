"""HetLoRA (Cho et al., EMNLP 2024): norm-weighted zero-padded aggregation and local rank self-pruning.

Aggregation, per layer: the uploads are zero-padded to ``r_max`` and averaged with weights proportional
to the Frobenius norm of each client's product, ``w_i = ||B_i A_i||_F / sum_j ||B_j A_j||_F`` (the
paper's sparsity-weighted aggregation; norms from the thin factors; the data weights are used instead
when every product is zero, as in round 1 from ``B = 0``). Client ``i`` receives the first ``r_i`` rows
of ``A`` and columns of ``B`` (no SVD).

Self-pruning: while training, client ``i`` of current rank ``r`` adds
``lambda * sum_layers ||A[k:]||_F ||B[:, k:]||_F`` with ``k = floor(gamma r)`` to its loss. If that tail
score is lower after local training than at the start, the client prunes its rank to
``max(min_rank, k)``: it drops the trailing components, uploads the smaller factors and trains at that
rank from then on. The LoRA scale stays ``alpha / r_i`` of its initial rank, so dropping a component
removes exactly that component's contribution. Defaults ``gamma = 0.99`` and ``lambda = 0.01`` are those
of a public reimplementation (the paper's own values for these models are not published); ``prune:
false`` turns pruning off.

Communication: ``r (d + k)`` up and down at the client's current rank (after pruning, the smaller
rank), plus the head.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ilora.algorithm import ClientModel, Message, MethodConfig, both_factors_both_ways, register, unflatten
from ilora.global_adapter import GlobalAdapterMethod
from ilora.lowrank import cut_pair, frobenius_norm_of_product, pad_A, pad_B, weighted_sum


@dataclass
class HetLoRAConfig(MethodConfig):
    prune: bool = True  # local rank self-pruning
    gamma: float = 0.99  # the kept share of the rank: k = floor(gamma r)
    lam: float = 0.01  # weight of the tail regulariser ||A[k:]|| ||B[:, k:]||
    min_rank: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.gamma < 1:
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma}")
        if self.lam < 0:
            raise ValueError(f"lam must be non-negative, got {self.lam}")
        if self.min_rank < 1:
            raise ValueError(f"min_rank must be at least 1, got {self.min_rank}")


@register("hetlora", display_name="HetLoRA", comm=both_factors_both_ways,
          comm_text="r(d+k) up, r(d+k) down (r: current rank, shrinks by self-pruning)", groups=("extended",),
          aggregation=("data_weighted_sum", "its weights ||B_i A_i|| are computed from each upload, so one client's "
                       "weight, and its influence, is unbounded"))
class HetLoRA(GlobalAdapterMethod):
    """Zero-padded averages weighted by ``||B_i A_i||_F``; clients prune trailing ranks of their adapters."""

    Config = HetLoRAConfig

    def rank_of(self, cid: int) -> int:
        """Client ``cid``'s current rank (its initial rank until it prunes)."""
        return self.client_state(cid).setdefault("rank", self.fed.ranks[cid])

    def tail(self, rank: int) -> int:
        return max(self.config.min_rank, math.floor(self.config.gamma * rank))

    def tail_score(self, A: Mapping[str, Tensor], B: Mapping[str, Tensor], rank: int) -> Tensor:
        k = math.floor(self.config.gamma * rank)
        return sum(torch.linalg.vector_norm(A[n][k:]) * torch.linalg.vector_norm(B[n][:, k:]) for n in A)

    def client_factors(self, cid: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return cut_pair(self.A, self.B, self.rank_of(cid))

    def download(self, cid: int) -> tuple[Message, ClientModel]:
        message, model = super().download(cid)
        if self.config.prune:
            self.client_state(cid)["score"] = float(self.tail_score(model.A, model.B, self.rank_of(cid)))
        return message, model

    def receive(self, cid: int, message: Message, round_index: int) -> ClientModel:
        model = super().receive(cid, message, round_index)
        if self.config.prune:
            self.client_state(cid)["score"] = float(self.tail_score(model.A, model.B, self.rank_of(cid)))
        return model

    def local_loss(self, cid: int, params: Mapping[str, Tensor]) -> Tensor | None:
        if not self.config.prune or self.config.lam == 0:
            return None
        A = {k.partition("/")[2]: v for k, v in params.items() if k.startswith("lora_A/")}
        B = {k.partition("/")[2]: v for k, v in params.items() if k.startswith("lora_B/")}
        return self.config.lam * self.tail_score(A, B, self.rank_of(cid))

    def upload(self, cid: int, trained: ClientModel) -> Message:
        rank = self.rank_of(cid)
        state = self.client_state(cid)
        shrank = float(self.tail_score(trained.A, trained.B, rank)) < state.get("score", math.inf)
        if self.config.prune and self.tail(rank) < rank and shrank:
            rank = state["rank"] = self.tail(rank)
            A, B = cut_pair(trained.A, trained.B, rank)
            trained = ClientModel(A=A, B=B, head=trained.head, scale=trained.scale)
        return super().upload(cid, trained)

    def combine(self, uploads: dict[int, Message], weights: dict[int, float]) -> tuple[dict, dict]:
        """Per layer: zero-padded averages weighted by ``||B_i A_i||_F`` (data weights if all are zero)."""
        cids = list(uploads)
        parts = [unflatten(uploads[c]) for c in cids]
        for c, p in zip(cids, parts):  # the server learns a client's pruned rank from its upload
            self.client_state(c)["rank"] = next(iter(p[0].values())).shape[0]
        r_max = self.fed.max_rank
        A, B = {}, {}
        for n in self.fed.layers:
            norms = [float(frobenius_norm_of_product(p[1][n].double(), p[0][n].double())) for p in parts]
            total = sum(norms)
            w = [x / total for x in norms] if total > 0 else [weights[c] for c in cids]
            A[n] = weighted_sum((pad_A(p[0][n], r_max) for p in parts), w)
            B[n] = weighted_sum((pad_B(p[1][n], r_max) for p in parts), w)
        return A, B
