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
``authors_merged_base``, ``authors_local_head`` (``ilora.global_adapter.AuthorsOptions``) and
``authors_trained_A``: their heterogeneous FFA-LoRA never freezes ``A``; clients train and send it,
and the server keeps the first client's (lowest id) zero-padded ``A``, dropping the others'.
"""

from __future__ import annotations

from dataclasses import dataclass

from ilora.algorithm import CommContext, Message, register, unflatten, zero_padded_average
from ilora.global_adapter import AuthorsOptions, GlobalAdapterMethod
from ilora.lowrank import pad_A


def b_both_ways(c: CommContext) -> tuple[int, int]:
    """``r_i d`` up and down: only ``B`` travels."""
    return c.rank * c.d, c.rank * c.d


@dataclass
class FFALoRAConfig(AuthorsOptions):
    fold_scales: bool = False  # average s_i B_i (in units of alpha / r_max) instead of raw B_i
    authors_trained_A: bool = False  # audit: A trained and sent; the server keeps the first client's padded A


@register("ffa_lora", display_name="FFA-LoRA", comm=b_both_ways, comm_text="r_i d up, r_i d down",
          groups=("paper",))
class FFALoRA(GlobalAdapterMethod):
    """Frozen shared ``A``; FedAvg of ``B`` (zero-padded for heterogeneous ranks) and the head."""

    Config = FFALoRAConfig

    @property
    def trained_factors(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("A", "B") if self.config.authors_trained_A else ("B",)

    def combine(self, uploads: dict[int, Message], weights: dict[int, float]) -> tuple[dict, dict]:
        """``B``: the zero-padded average; ``A`` stays as drawn (audit: the first client's padded ``A``)."""
        A = self.A
        if self.config.authors_trained_A:  # the first client's trained A, zero-padded; the others' dropped
            A = {n: pad_A(a, self.fed.max_rank) for n, a in unflatten(uploads[min(uploads)])[0].items()}
        return A, zero_padded_average(uploads, weights, self.fed.max_rank)[1]
