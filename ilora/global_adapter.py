"""The base of methods that keep one global adapter at ``r_max`` (FedIT, LoRA-FAIR, FFA-LoRA, ILoRA, ...).

The server holds ``A`` (``r_max x k``) and ``B`` (``d x r_max``) per layer. Client ``i`` of rank
``r_i`` starts from the first ``r_i`` rows of ``A`` and columns of ``B`` (``client_factors``), trains
what the method trains, and sends it back; the server combines the uploads into a new ``r_max`` pair
(``combine``: by default the zero-padded average) and evaluates it with scale ``alpha / r_max``.
A method overrides only what differs from that.

Shared options, each read only if the method's config declares it:

- ``fold_scales``: keep the global ``B`` in units of ``s_max = alpha / r_max``; client ``i`` uploads
  ``B_i`` read as ``(s_i / s_max) B_i`` and receives ``(s_max / s_i) B[:, :r_i]``, so that averages are
  averages of the clients' actual updates ``s_i B_i A_i``;
- ``control_variates`` (with ``cv_estimator``): SCAFFOLD's rank-aware control variates on the trained
  tensors (``ilora.control_variates``), e.g. ``method=fedit method_args.control_variates=true``;
- ``authors_merged_base`` / ``authors_local_head``: the ILoRA authors' way of running the baselines
  (``AuthorsOptions``; audit options, off by default, docs/reproduction-audit.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ilora.algorithm import (
    Algorithm,
    ClientModel,
    Federation,
    Message,
    MethodConfig,
    clone_tensors,
    standard_lora_init,
    unflatten,
    zero_padded_average,
)
from ilora.control_variates import attach, without_control_variates
from ilora.lowrank import cut_pair, dense_product


@dataclass
class AdapterConfig(MethodConfig):
    """Options every global-adapter method offers: SCAFFOLD control variates on its trained tensors."""

    control_variates: bool = False
    cv_estimator: Literal["scaffold", "code"] = "scaffold"


@dataclass
class AuthorsOptions(AdapterConfig):
    """How the ILoRA authors' scripts ran FedIT, LoRA-FAIR and FFA-LoRA (see docs/reproduction-audit.md).

    - ``authors_merged_base``: their CV scripts merge the aggregated adapter into a checkpoint
      (``W0 + s B_g A_g``, ``s = alpha / r_max``) that every client and the evaluation then load
      *under* the same adapter again, so training starts from and evaluation sees the global adapter twice.
    - ``authors_local_head``: their heterogeneous-rank NLP script never sends the aggregated head back:
      each client starts every round from its own fixed random head; the server evaluates the average.
    """

    authors_merged_base: bool = False
    authors_local_head: bool = False


def local_random_head(fed: Federation, template: Mapping[str, Tensor], cid: int) -> dict[str, Tensor]:
    """A fresh head for client ``cid``, drawn as ``nn.Linear`` initialises (uniform, bound 1/sqrt(fan_in))."""
    g = fed.generator(0x4EAD, cid)
    head = {}
    for name, t in template.items():
        weight = t if t.dim() >= 2 else template.get(name.replace("bias", "weight"), t)
        fan_in = weight.shape[1] if weight.dim() >= 2 else weight.shape[0]
        bound = 1.0 / math.sqrt(fan_in)
        head[name] = ((torch.rand(t.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(t)
    return head


class GlobalAdapterMethod(Algorithm):
    """One global ``(A, B)`` at ``r_max``; rank slicing, scale folding, control variates, the evaluated model."""

    Config = AdapterConfig

    def __init__(self, fed: Federation, config: AdapterConfig | None = None):
        super().__init__(fed, config)
        self.A, self.B = self.initial_adapter()
        self.base_delta: dict[str, Tensor] | None = None  # a dense d x k update under the adapter, if any
        if getattr(self.config, "control_variates", False):
            attach(self, self.trained_factors, self.config.cv_estimator)

    # -- what a method may override ------------------------------------------------------------
    trained_factors: tuple[str, ...] = ("A", "B")  # what clients train and send

    def initial_adapter(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The round-0 global pair at ``r_max`` (PEFT's init, seeded: the same draw for every method)."""
        return standard_lora_init(self.fed, self.fed.max_rank)

    def client_factors(self, cid: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Client ``cid``'s starting ``(A, B)``: the global pair cut to its rank (``B`` unfolded)."""
        A, B = cut_pair(self.A, self.B, self.fed.ranks[cid])
        unit = self.unit(cid)
        return A, (B if unit == 1.0 else {n: b / unit for n, b in B.items()})

    def client_offsets(self, rank: int) -> dict[str, tuple[Tensor, Tensor, float]]:
        """Frozen ``(A0, B0, s0)`` subtracted from a rank-``rank`` model (none by default)."""
        return {}

    def combine(self, uploads: dict[int, Message], weights: dict[int, float]) -> tuple[dict, dict]:
        """The new global ``(A, B)`` from the uploads (in global units): the zero-padded average."""
        return zero_padded_average(uploads, weights, self.fed.max_rank)

    def eval_factors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The ``r_max`` pair the server evaluates."""
        return self.A, self.B

    # -- shared machinery ----------------------------------------------------------------------
    def unit(self, cid: int) -> float:
        """``s_i / s_max`` when scales are folded, else 1."""
        return self.fed.scale_ratio(cid) if getattr(self.config, "fold_scales", False) else 1.0

    def client_head(self, cid: int) -> tuple[dict[str, Tensor], bool]:
        """The head client ``cid`` starts from, and whether it travels down the wire."""
        if not getattr(self.config, "authors_local_head", False):
            return clone_tensors(self.head), True
        return local_random_head(self.fed, self.fed.head_init, cid), False

    def client_model(self, cid: int) -> tuple[ClientModel, bool]:
        r = self.fed.ranks[cid]
        A, B = self.client_factors(cid)
        head, send_head = self.client_head(cid)
        model = ClientModel(
            A=A, B=B, head=head, scale=self.fed.scale(r), offsets=self.client_offsets(r),
            base_delta=self.base_delta, train_A="A" in self.trained_factors, train_B="B" in self.trained_factors,
        )
        return model, send_head

    def download(self, cid: int) -> tuple[Message, ClientModel]:
        model, send_head = self.client_model(cid)
        message = model.flat(factors=self.trained_factors, head=send_head)
        if self.control_variates is not None:
            message.update(self.control_variates.download(cid))
        return message, model

    def receive(self, cid: int, message: Message, round_index: int) -> ClientModel:
        """The client's model from the message: the factors and head it carries; a factor that does not
        travel (e.g. FFA-LoRA's frozen ``A``) is the client's own copy, which never changes."""
        if getattr(self.config, "authors_merged_base", False):
            raise ValueError("authors_merged_base runs only in-process: its clients load the server's dense merged "
                             "checkpoint, which no message carries")
        model, _ = self.client_model(cid)
        A, B, head = unflatten(message)
        model.A, model.B = A or model.A, B or model.B
        model.head = head or model.head
        if self.control_variates is not None:
            self.control_variates.receive(cid, message)
        return model

    def upload(self, cid: int, trained: ClientModel) -> Message:
        message = trained.flat(factors=self.trained_factors)
        if self.control_variates is not None:
            message.update(self.control_variates.upload(cid))
        return message

    def in_global_units(self, uploads: dict[int, Message]) -> dict[int, Message]:
        """Uploads with each ``B_i`` multiplied by ``s_i / s_max`` (unchanged unless scales are folded)."""
        out = {}
        for c, msg in uploads.items():
            unit = self.unit(c)
            out[c] = msg if unit == 1.0 else {k: (t * unit if k.startswith("lora_B/") else t) for k, t in msg.items()}
        return out

    def aggregate(self, uploads: dict[int, Message], weights: dict[int, float]) -> None:
        if self.control_variates is not None:
            self.control_variates.aggregate(uploads)
        models = self.in_global_units(without_control_variates(uploads))
        self.A, self.B = self.combine(models, weights)
        self.average_head(models, weights)
        if getattr(self.config, "authors_merged_base", False):
            self.base_delta = dense_product(self.A, self.B, self.fed.scale(self.fed.max_rank))

    # -- the global state (server optimisers, client-level DP: ilora.server_update) -------------
    @classmethod
    def server_state_problem(cls, config: AdapterConfig) -> str | None:
        return None

    def server_state(self) -> dict[str, Tensor]:
        """The global ``A``, ``B`` (at ``r_max``, in global units) and head."""
        state = {f"lora_A/{n}": a for n, a in self.A.items()}
        state.update({f"lora_B/{n}": b for n, b in self.B.items()})
        state.update({f"head/{n}": h for n, h in self.head.items()})
        return state

    def load_server_state(self, state: Mapping[str, Tensor]) -> None:
        for key, t in state.items():
            kind, _, name = key.partition("/")
            {"lora_A": self.A, "lora_B": self.B, "head": self.head}[kind][name] = t
        if getattr(self.config, "authors_merged_base", False):  # the merged checkpoint follows the new adapter
            self.base_delta = dense_product(self.A, self.B, self.fed.scale(self.fed.max_rank))

    def eval_model(self) -> ClientModel:
        A, B = self.eval_factors()
        r_max = self.fed.max_rank
        return ClientModel(A=A, B=B, head=self.head, scale=self.fed.scale(r_max), offsets=self.client_offsets(r_max),
                           base_delta=self.base_delta, train_A="A" in self.trained_factors)
