"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' LoRA modules and merge them into the base.

Every round each sampled client trains a fresh LoRA (standard init, rank ``r_i``, scale ``s_i``) on top
of the current merged base ``W0 + M``. The server stacks the uploads in one fixed order (ascending
client id),

    A_stack = [p_1 s_1 A_1; p_2 s_2 A_2; ...]    B_stack = [B_1, B_2, ...],

so that ``B_stack A_stack = sum_i p_i s_i B_i A_i`` exactly (``p_i`` applied once, to ``A``; the
per-client scales folded in, merge with scale 1), and merges ``M <- M + B_stack A_stack`` in float32
(float64 if the run's dtype is).
The global model is the merged base alone (no adapter).

Communication: the upload is the client's ``(A_i, B_i)`` plus the head. The download is the stacked
modules the client has not merged yet, ``(sum r_j)(d + k)`` per layer (with full participation: the
previous round's stack, which grows with the number of clients), plus the head. In the first round
nothing is stacked yet, so only the head goes down: the fresh LoRA init is drawn from the run seed on
the client, as every method's round-0 init could be.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ilora.algorithm import (
    Algorithm,
    ClientModel,
    CommContext,
    Message,
    MethodConfig,
    register,
    standard_lora_init,
    unflatten,
)
from ilora.lowrank import stack_modules

# The salt of the per-round fresh init (``standard_lora_init(fed, r_max, salt=_INIT_SALT + round)``).
_INIT_SALT = 0x0F10


def stacked_download(c: CommContext) -> tuple[int, int]:
    """Up ``r_i (d + k)``; down the previous round's stack, ``(sum_j r_j)(d + k)`` (nothing in round 1)."""
    return c.rank * (c.d + c.k), sum(c.previous_ranks) * (c.d + c.k)


@dataclass
class FLoRAConfig(MethodConfig):
    """FLoRA's only option is an audit of the ILoRA authors' way of running it (off by default).

    ``authors_merge``: their scripts merge only the latest round's stack into ``W0`` (earlier rounds
    are dropped), with the stacked adapter's PEFT scale ``alpha / sum r_i`` instead of each client's
    ``s_i``, and evaluate with the stack loaded again on top of that merged base (applied twice).
    """

    authors_merge: bool = False


@register("flora", display_name="FLoRA", comm=stacked_download,
          comm_text="r_i(d+k) up, (sum_j r_j)(d+k) down (previous round's stack)", groups=("paper",),
          aggregation=("individual", "it stacks every client's factors side by side, so each one is revealed"))
class FLoRA(Algorithm):
    """Fresh LoRA per client per round; the server stacks and merges into float32 base weights."""

    Config = FLoRAConfig

    @classmethod
    def server_state_problem(cls, config: FLoRAConfig) -> str | None:
        return ("its global model is the stack of every client's fresh adapter merged into the base weights, and "
                "the adapters are drawn anew each round: no global factors persist")

    def __init__(self, fed, config=None):
        super().__init__(fed, config)
        self.round = 0
        self.merged: dict[str, Tensor] | None = None  # M = sum of merged stacks, d x k, float32
        self.stacks: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []  # (A_stack, B_stack) per round
        self.seen: dict[int, int] = {}  # client id -> number of stacks it has already merged

    def download(self, cid: int) -> tuple[Message, ClientModel]:
        r = self.fed.ranks[cid]
        A, B = standard_lora_init(self.fed, self.fed.max_rank, salt=_INIT_SALT + self.round)
        model = ClientModel(
            A={n: a[:r].clone() for n, a in A.items()},
            B={n: b[:, :r].clone() for n, b in B.items()},
            head={n: h.clone() for n, h in self.head.items()},
            scale=self.fed.scale(r),
            base_delta=self.merged,
        )
        return self._download_message(cid), model

    def receive(self, cid: int, message: Message, round_index: int) -> ClientModel:
        """The client merges the stacks it missed into its own copy of the base, one round at a time in
        order (as the server did), so that its base equals the server's bit for bit; a round's stack has
        rank ``sum r_j`` over that round's sampled clients, which the run's sampling stream gives."""
        state = self.client_state(cid)
        A_msg, B_msg, head = unflatten(message)
        merged, start = state.get("merged"), 0
        dtype = torch.promote_types(self.fed.dtype, torch.float32)
        for t in range(state.get("stacks", 0), round_index):
            stack_rank = sum(self.fed.ranks[c] for c in self.fed.sampling[t])
            rows = slice(start, start + stack_rank)
            start += stack_rank
            base = {} if merged is None or self.config.authors_merge else merged
            merged = {}
            for n in self.fed.layers:
                B_t, A_t = B_msg[n][:, rows].contiguous(), A_msg[n][rows].contiguous()
                merged[n] = base.get(n, 0) + B_t.to(dtype) @ A_t.to(dtype)
        state["merged"], state["stacks"] = merged, round_index
        r = self.fed.ranks[cid]
        A, B = standard_lora_init(self.fed, self.fed.max_rank, salt=_INIT_SALT + round_index)
        return ClientModel(A={n: a[:r].clone() for n, a in A.items()}, B={n: b[:, :r].clone() for n, b in B.items()},
                           head=head, scale=self.fed.scale(r), base_delta=merged)

    def _download_message(self, cid: int) -> Message:
        """The stacks ``cid`` has not merged yet, concatenated (still a stack), plus the head."""
        missed = self.stacks[self.seen.get(cid, 0):]
        self.seen[cid] = len(self.stacks)
        msg: Message = {}
        if missed:
            for name in self.fed.layers:
                msg[f"lora_A/{name}"] = torch.cat([a[name] for a, _ in missed], dim=0)
                msg[f"lora_B/{name}"] = torch.cat([b[name] for _, b in missed], dim=1)
        msg.update({f"head/{n}": h for n, h in self.head.items()})
        return msg

    def aggregate(self, uploads: dict[int, Message], weights: dict[int, float]) -> None:
        cids = sorted(uploads)
        parts = [unflatten(uploads[c]) for c in cids]
        w = [weights[c] for c in cids]
        s = [self.fed.scale(self.fed.ranks[c]) for c in cids]
        if self.config.authors_merge:  # one PEFT scale for the whole stack: alpha / sum r_i
            s = [self.fed.scale(sum(self.fed.ranks[c] for c in cids))] * len(cids)
        A_stack, B_stack = {}, {}
        for name in self.fed.layers:
            As, Bs = [p[0][name] for p in parts], [p[1][name] for p in parts]
            A_stack[name], B_stack[name] = stack_modules(As, Bs, w, s)
        dtype = torch.promote_types(self.fed.dtype, torch.float32)  # never merge in half precision
        merged = {} if self.merged is None or self.config.authors_merge else self.merged
        self.merged = {
            n: merged.get(n, 0) + B_stack[n].to(dtype) @ A_stack[n].to(dtype) for n in self.fed.layers
        }
        self.stacks.append((A_stack, B_stack))
        self.average_head(uploads, weights)
        self.round += 1

    def eval_model(self) -> ClientModel:
        """The merged base alone: rank-1 zero factors with scale 0 add exactly nothing.

        With ``authors_merge`` the latest stack is loaded again on top of the base it was merged into.
        """
        if self.config.authors_merge and self.stacks:
            A_stack, B_stack = self.stacks[-1]
            return ClientModel(A=A_stack, B=B_stack, head=self.head, scale=1.0, base_delta=self.merged)
        A = {n: torch.zeros(1, spec.in_features, device=self.fed.device, dtype=self.fed.dtype)
             for n, spec in self.fed.layers.items()}
        B = {n: torch.zeros(spec.out_features, 1, device=self.fed.device, dtype=self.fed.dtype)
             for n, spec in self.fed.layers.items()}
        return ClientModel(A=A, B=B, head=self.head, scale=0.0, base_delta=self.merged)
