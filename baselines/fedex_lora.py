"""FedEx-LoRA (Singhal et al., 2025): FedIT's averages plus the exact residual merged into the base.

Per layer the server averages the (zero-padded) factors as FedIT, ``A_bar = sum p_i A_i``,
``B_bar = sum p_i B_i``, and adds what that average misses to the frozen weights:

    M <- M + sum_i p_i s_i B_i A_i - s_max B_bar A_bar

so that the global model ``W0 + M + s_max B_bar A_bar`` is exactly ``W0 + M_old + sum_i p_i s_i B_i A_i``,
the average of the clients' models (tested in float64). The residual is computed from the thin factors
as one ``d x (sum r_i + r_max)`` by ``(sum r_i + r_max) x k`` product and kept in float32 (float64 if
the run's dtype is). Clients start the next round from the averaged pair (cut to their rank) on the
updated base ``W0 + M``.

Communication: ``r_i (d + k)`` up; down ``r_i (d + k)`` plus, once the base has changed since the
client last downloaded it, the dense ``d x k`` base update (the sum of the residuals it missed).
With heterogeneous ranks a client of rank ``r_i < r_max`` starts from the truncated pair, as with every
zero-padding method; the global model stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ilora.algorithm import (
    ClientModel,
    CommContext,
    Message,
    message_part,
    register,
    unflatten,
    zero_padded_average,
)
from ilora.global_adapter import AdapterConfig, GlobalAdapterMethod
from ilora.lowrank import concat_factors


def residual_download(c: CommContext) -> tuple[int, int]:
    """Up ``r_i (d + k)``; down ``r_i (d + k)`` plus the dense ``d k`` residual from round 2 on."""
    return c.rank * (c.d + c.k), c.rank * (c.d + c.k) + (c.d * c.k if c.round > 0 else 0)


def exact_residual(
    As: list[Tensor], Bs: list[Tensor], weights: list[float], scales: list[float], A_bar: Tensor, B_bar: Tensor,
    s_bar: float, dtype: torch.dtype,
) -> Tensor:
    """``sum_i w_i s_i B_i A_i - s_bar B_bar A_bar`` (``d x k``) from the thin factors, in ``dtype``."""
    B_c, A_c = concat_factors([*Bs, B_bar], [*As, A_bar], [w * s for w, s in zip(weights, scales)] + [-s_bar])
    return B_c.to(dtype) @ A_c.to(dtype)


@dataclass
class FedExLoRAConfig(AdapterConfig):
    """FedEx-LoRA has no options of its own (control variates can be switched on as for FedIT)."""


@register("fedex_lora", display_name="FedEx-LoRA", comm=residual_download,
          comm_text="r_i(d+k) up, r_i(d+k) + dk down (dense residual)", groups=("extended",),
          aggregation=("dense_products", "its residual needs sum p_i s_i B_i A_i, the dense sum of products"))
class FedExLoRA(GlobalAdapterMethod):
    """FedIT's averages; the residual ``sum p_i s_i B_i A_i - s B_bar A_bar`` is merged into the frozen base."""

    Config = FedExLoRAConfig

    def __init__(self, fed, config=None):
        super().__init__(fed, config)
        self.base_version = 0  # how many residuals have been merged into the base
        self.seen: dict[int, int] = {}  # client id -> the base version it has downloaded

    @classmethod
    def server_state_problem(cls, config: FedExLoRAConfig) -> str | None:
        return ("its global model is the averaged adapter plus a dense residual merged into the base, and a step on "
                "the factors alone would break the exact aggregation the residual restores")

    def download(self, cid: int) -> tuple[Message, ClientModel]:
        message, model = super().download(cid)
        if self.base_delta is not None and self.seen.get(cid, 0) < self.base_version:
            message.update({f"base/{n}": m for n, m in self.base_delta.items()})  # the base it has not merged
        self.seen[cid] = self.base_version
        return message, model

    def receive(self, cid: int, message: Message, round_index: int) -> ClientModel:
        """The client's base is the last one it received (the message carries it only when it changed)."""
        state = self.client_state(cid)
        base = message_part(message, "base")
        if base:
            state["base"] = base
        model = super().receive(cid, message, round_index)
        model.base_delta = state.get("base")
        return model

    def combine(self, uploads: dict[int, Message], weights: dict[int, float]) -> tuple[dict, dict]:
        A_bar, B_bar = zero_padded_average(uploads, weights, self.fed.max_rank)
        cids = list(uploads)
        parts = [unflatten(uploads[c]) for c in cids]
        w = [weights[c] for c in cids]
        s = [self.fed.scale(self.fed.ranks[c]) for c in cids]
        dtype = torch.promote_types(self.fed.dtype, torch.float32)  # never merge in half precision
        merged = self.base_delta or {}
        self.base_delta = {}
        for n in self.fed.layers:
            As, Bs = [p[0][n] for p in parts], [p[1][n] for p in parts]
            residual = exact_residual(As, Bs, w, s, A_bar[n], B_bar[n], self.fed.scale(self.fed.max_rank), dtype)
            self.base_delta[n] = merged.get(n, 0) + residual
        self.base_version += 1
        return A_bar, B_bar
