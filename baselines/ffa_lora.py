"""FFA-LoRA (Sun et al., ICLR 2024): a random ``A`` frozen for the whole run; only ``B`` is federated.

``A`` is drawn once at ``r_max`` from the run seed (PEFT's Kaiming-uniform init, the same draw as
FedIT's round-0 ``A``), bit-identical on every client and never trained; a client of rank ``r_i``
uses its first ``r_i`` rows. Clients train ``B`` (zero-init) and the head, and send only those. The
server averages ``B_g = sum p_i pad(B_i)`` (zero columns up to ``r_max``), which is exact:
``(sum p_i B_i) A = sum p_i B_i A``. The server evaluates ``(A, B_g)`` with scale ``alpha / r_max``.

Scales with heterogeneous ranks: by default ``B`` is averaged raw (as FedIT's zero-padding).
``fold_scales: true`` keeps ``B_g`` in units of ``s_max = alpha / r_max`` (client ``i`` uploads
``B_i`` read as ``(s_i / s_max) B_i`` and receives ``(s_max / s_i) B_g[:, :r_i]``), which makes the
server's model exactly ``sum p_i s_i B_i A[:r_i]``, the average of the clients' actual updates.

Communication per layer: ``r_i d`` up and down (plus the head); ``A`` never travels.
"""

from __future__ import annotations

from dataclasses import dataclass

from ilora.algorithm import (
    Algorithm,
    ClientModel,
    Message,
    register,
    standard_lora_init,
    zero_padded_average,
)


@dataclass
class FFALoRAConfig:
    fold_scales: bool = False  # average s_i B_i (in units of alpha / r_max) instead of raw B_i

    def __post_init__(self) -> None:
        if not isinstance(self.fold_scales, bool):
            raise ValueError(f"fold_scales must be true or false, got {self.fold_scales!r}")


@register("ffa_lora")
class FFALoRA(Algorithm):
    """Frozen shared ``A``; FedAvg of ``B`` (zero-padded for heterogeneous ranks) and the head."""

    Config = FFALoRAConfig

    def __init__(self, fed, config=None):
        super().__init__(fed, config)
        self.A, self.B = standard_lora_init(fed, fed.max_rank)  # A: drawn once, frozen for the run

    def _unit(self, cid: int) -> float:
        """``s_i / s_max`` when scales are folded, else 1."""
        return self.fed.scale_ratio(cid) if self.config.fold_scales else 1.0

    def download(self, cid: int) -> tuple[Message, ClientModel]:
        r = self.fed.ranks[cid]
        model = ClientModel(
            A={n: a[:r].clone() for n, a in self.A.items()},
            B={n: b[:, :r] / self._unit(cid) for n, b in self.B.items()},
            head={n: h.clone() for n, h in self.head.items()},
            scale=self.fed.scale(r),
            train_A=False,
        )
        return model.flat(factors=("B",)), model

    def upload(self, cid: int, trained: ClientModel) -> Message:
        return trained.flat(factors=("B",))

    def aggregate(self, uploads: dict[int, Message], weights: dict[int, float]) -> None:
        scaled = {
            c: {k: (t * self._unit(c) if k.startswith("lora_B/") else t) for k, t in msg.items()}
            for c, msg in uploads.items()
        }
        _, self.B = zero_padded_average(scaled, weights, self.fed.max_rank)
        self.average_head(uploads, weights)

    def eval_model(self) -> ClientModel:
        scale = self.fed.scale(self.fed.max_rank)
        return ClientModel(A=self.A, B=self.B, head=self.head, scale=scale, train_A=False)
