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

Audit options (off by default; the ILoRA authors' way of running it, see docs/reproduction-audit.md):
``authors_merged_base``, ``authors_local_head`` (``ilora.algorithm.AuthorsOptions``) and
``authors_trained_A``: their heterogeneous FFA-LoRA never freezes ``A``; clients train and send it,
and the server keeps the first client's (lowest id) zero-padded ``A``, dropping the others'.
"""

from __future__ import annotations

from dataclasses import dataclass

from ilora.algorithm import (
    AuthorsBaseline,
    AuthorsOptions,
    ClientModel,
    Message,
    check_bool,
    pad_A,
    register,
    standard_lora_init,
    unflatten,
    zero_padded_average,
)


@dataclass
class FFALoRAConfig(AuthorsOptions):
    fold_scales: bool = False  # average s_i B_i (in units of alpha / r_max) instead of raw B_i
    authors_trained_A: bool = False  # audit: A trained and sent; the server keeps the first client's padded A

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("fold_scales", self.fold_scales)
        check_bool("authors_trained_A", self.authors_trained_A)


@register("ffa_lora")
class FFALoRA(AuthorsBaseline):
    """Frozen shared ``A``; FedAvg of ``B`` (zero-padded for heterogeneous ranks) and the head."""

    Config = FFALoRAConfig

    def __init__(self, fed, config=None):
        super().__init__(fed, config)
        self.A, self.B = standard_lora_init(fed, fed.max_rank)  # A: drawn once, frozen for the run

    def _unit(self, cid: int) -> float:
        """``s_i / s_max`` when scales are folded, else 1."""
        return self.fed.scale_ratio(cid) if self.config.fold_scales else 1.0

    @property
    def _sent(self) -> tuple[str, ...]:
        return ("A", "B") if self.config.authors_trained_A else ("B",)

    def download(self, cid: int) -> tuple[Message, ClientModel]:
        r = self.fed.ranks[cid]
        head, send_head = self.client_head(cid)
        model = ClientModel(
            A={n: a[:r].clone() for n, a in self.A.items()},
            B={n: b[:, :r] / self._unit(cid) for n, b in self.B.items()},
            head=head,
            scale=self.fed.scale(r),
            base_delta=self.merged_base,
            train_A=self.config.authors_trained_A,
        )
        return model.flat(factors=self._sent, head=send_head), model

    def upload(self, cid: int, trained: ClientModel) -> Message:
        return trained.flat(factors=self._sent)

    def aggregate(self, uploads: dict[int, Message], weights: dict[int, float]) -> None:
        scaled = {
            c: {k: (t * self._unit(c) if k.startswith("lora_B/") else t) for k, t in msg.items()}
            for c, msg in uploads.items()
        }
        _, self.B = zero_padded_average(scaled, weights, self.fed.max_rank)
        if self.config.authors_trained_A:  # the first client's trained A, zero-padded; the others' dropped
            first = unflatten(uploads[min(uploads)])[0]
            self.A = {n: pad_A(a, self.fed.max_rank) for n, a in first.items()}
        self.average_head(uploads, weights)
        self.merge_global_adapter()

    def eval_model(self) -> ClientModel:
        scale = self.fed.scale(self.fed.max_rank)
        return ClientModel(A=self.A, B=self.B, head=self.head, scale=scale, train_A=False,
                           base_delta=self.merged_base)
