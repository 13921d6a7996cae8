"""RoLoRA (Chen et al., 2024): rounds alternate between training and averaging only ``B`` and only ``A``.

Round 1 trains ``B`` with ``A`` frozen (``B`` starts at zero, so ``A`` would get no gradient first),
round 2 trains ``A`` with ``B`` frozen, and so on. Because every client shares the frozen factor, the
average of the trained one is exact: ``sum_i p_i B_i A = (sum_i p_i B_i) A`` and
``sum_i p_i B A_i = B (sum_i p_i A_i)``. With heterogeneous ranks the uploads are zero-padded to
``r_max`` (the padded part meets zero rows or columns of the frozen factor) and the scales are folded
(``fold_scales``, on by default): the global ``B`` is kept in units of ``s_max = alpha / r_max``, so that
the average is the average of the clients' actual updates ``s_i B_i A_i``. Tested in float64.

Communication: down both factors ``r_i (d + k)`` (the frozen one changed in the previous round); up
only the trained one, ``r_i d`` in ``B`` rounds and ``r_i k`` in ``A`` rounds; plus the head.
"""

from __future__ import annotations

from dataclasses import dataclass

from ilora.algorithm import ClientModel, CommContext, Message, MethodConfig, register, zero_padded_average
from ilora.global_adapter import GlobalAdapterMethod


def alternating_upload(c: CommContext) -> tuple[int, int]:
    """Up ``r_i d`` (rounds 1, 3, ...: ``B``) or ``r_i k`` (rounds 2, 4, ...: ``A``); down ``r_i (d + k)``."""
    return c.rank * (c.d if c.round % 2 == 0 else c.k), c.rank * (c.d + c.k)


@dataclass
class RoLoRAConfig(MethodConfig):
    fold_scales: bool = True  # keep B in units of alpha / r_max: exact averages with heterogeneous ranks


@register("rolora", display_name="RoLoRA", comm=alternating_upload,
          comm_text="r_i d or r_i k up (alternating), r_i(d+k) down", groups=("extended",))
class RoLoRA(GlobalAdapterMethod):
    """Alternating optimisation: ``B`` rounds and ``A`` rounds; only the trained factor is averaged."""

    Config = RoLoRAConfig

    def __init__(self, fed, config=None):
        self.round = 0  # read by trained_factors, which the base class uses while initialising
        super().__init__(fed, config)

    @property
    def trained_factors(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("B",) if self.round % 2 == 0 else ("A",)

    def download(self, cid: int) -> tuple[Message, ClientModel]:
        model, send_head = self.client_model(cid)
        return model.flat(factors=("A", "B"), head=send_head), model

    def receive(self, cid: int, message: Message, round_index: int) -> ClientModel:
        self.round = round_index  # which factor this round trains (the server's count of aggregations)
        return super().receive(cid, message, round_index)

    def combine(self, uploads: dict[int, Message], weights: dict[int, float]) -> tuple[dict, dict]:
        A_bar, B_bar = zero_padded_average(uploads, weights, self.fed.max_rank)
        trained_B = self.round % 2 == 0
        self.round += 1
        return (self.A, B_bar) if trained_B else (A_bar, self.B)
