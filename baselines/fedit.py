"""FedIT (Zhang et al. 2023): FedAvg of the two LoRA factors, separately.

Heterogeneous ranks follow the usual zero-padding baseline: ``A_i`` gets zero rows and ``B_i`` zero
columns up to ``r_max``; the padded factors are averaged, and client ``i`` receives the first ``r_i``
rows of ``A_g`` and columns of ``B_g``. The server evaluates the full ``r_max`` adapter with scale
``alpha / r_max``. Known inexactness (tested): ``sum p B A - (sum p B)(sum p A)`` equals
``sum p (B - B_bar)(A - A_bar)``.

Audit options (off by default; the ILoRA authors' way of running it, see docs/reproduction-audit.md):
``authors_merged_base``, ``authors_local_head`` (``ilora.algorithm.AuthorsOptions``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ilora.algorithm import (
    AuthorsBaseline,
    AuthorsOptions,
    ClientModel,
    Message,
    register,
    standard_lora_init,
    zero_padded_average,
)


@dataclass
class FedITConfig(AuthorsOptions):
    """FedIT has no options of its own; only the authors' audit options."""


@register("fedit")
class FedIT(AuthorsBaseline):
    """Clients train A and B from the global pair; the server averages A and B separately."""

    Config = FedITConfig

    def __init__(self, fed, config=None):
        super().__init__(fed, config)
        self.A, self.B = standard_lora_init(fed, fed.max_rank)

    def download(self, cid: int) -> tuple[Message, ClientModel]:
        r = self.fed.ranks[cid]
        head, send_head = self.client_head(cid)
        model = ClientModel(
            A={n: a[:r].clone() for n, a in self.A.items()},
            B={n: b[:, :r].clone() for n, b in self.B.items()},
            head=head,
            scale=self.fed.scale(r),
            base_delta=self.merged_base,
        )
        return model.flat(head=send_head), model

    def aggregate(self, uploads: dict[int, Message], weights: dict[int, float]) -> None:
        self.A, self.B = zero_padded_average(uploads, weights, self.fed.max_rank)
        self.average_head(uploads, weights)
        self.merge_global_adapter()

    def eval_model(self) -> ClientModel:
        return ClientModel(A=self.A, B=self.B, head=self.head, scale=self.fed.scale(self.fed.max_rank),
                           base_delta=self.merged_base)
