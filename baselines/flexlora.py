"""FlexLoRA (Bai et al., NeurIPS 2024): SVD of the average update; client ``i`` gets its top-``r_i`` part.

Per layer the server forms the average of the clients' actual updates (``p_i``: data weights of the
round's clients, ``s_i = alpha / r_i``)

    W_g = sum_i p_i s_i B_i A_i = U S V^T

from the thin factors only (concatenation, thin QR of both sides, SVD of the small core;
``ilora.lowrank.thin_svd``), never forming the dense ``d x k`` product. Client ``i`` starts the next
round from the best rank-``r_i`` approximation of ``W_g``, split as the authors' code splits it: all
the singular values in ``B`` and the client's scale undone there,

    B_i = U[:, :r_i] S[:r_i] / s_i,    A_i = V^T[:r_i, :]      (so that s_i B_i A_i = (U S V^T)_{r_i}).

The global model is ``W_g`` itself (every direction, rank up to ``sum r_i``), which the server
evaluates exactly as the rank-``R`` adapter ``(U S, V^T)`` with scale 1; nothing is merged into
``W0``. Round 1 starts from the standard seeded init (FedIT's draw). Tested in float64.

Communication: ``r_i (d + k)`` up and down, plus the head.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ilora.algorithm import ClientModel, Message, both_factors_both_ways, register, unflatten
from ilora.global_adapter import AdapterConfig, GlobalAdapterMethod
from ilora.lowrank import concat_factors, pad_A, pad_B, thin_svd


@dataclass
class FlexLoRAConfig(AdapterConfig):
    """FlexLoRA has no options of its own (control variates can be switched on as for FedIT)."""


@register("flexlora", display_name="FlexLoRA", comm=both_factors_both_ways, comm_text="r_i(d+k) up, r_i(d+k) down",
          groups=("extended",),
          aggregation=("dense_products", "its SVD is of sum p_i s_i B_i A_i, the dense sum of products"))
class FlexLoRA(GlobalAdapterMethod):
    """SVD of ``sum p_i s_i B_i A_i``; each client gets the top-``r_i`` truncation (singular values in ``B``)."""

    Config = FlexLoRAConfig

    def __init__(self, fed, config=None):
        super().__init__(fed, config)
        self.aggregated = False  # after the first aggregation: B = U S, A = V^T, scale 1 (rank up to sum r_i)

    @classmethod
    def server_state_problem(cls, config: FlexLoRAConfig) -> str | None:
        return ("its global state is the SVD of the dense product sum, unique only up to signs and rotations, so "
                "factor differences are not updates")

    def client_factors(self, cid: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if not self.aggregated:
            return super().client_factors(cid)
        r, s = self.fed.ranks[cid], self.fed.scale(self.fed.ranks[cid])
        A, B = {}, {}
        for n in self.A:
            A[n], B[n] = self.A[n][:r], self.B[n][:, :r] / s
            if A[n].shape[0] < r:  # W_g has fewer than r_i directions: zero-padded
                A[n], B[n] = pad_A(A[n], r), pad_B(B[n], r)
            A[n], B[n] = A[n].to(self.fed.dtype).clone(), B[n].to(self.fed.dtype).clone()
        return A, B

    def combine(self, uploads: dict[int, Message], weights: dict[int, float]) -> tuple[dict, dict]:
        """``(V^T, U S)`` of ``sum p_i s_i B_i A_i`` per layer, in float64."""
        cids = list(uploads)
        parts = [unflatten(uploads[c]) for c in cids]
        ws = [weights[c] * self.fed.scale(self.fed.ranks[c]) for c in cids]
        A, B = {}, {}
        for n in self.fed.layers:
            B_c, A_c = concat_factors([p[1][n].double() for p in parts], [p[0][n].double() for p in parts], ws)
            U, S, Vh = thin_svd(B_c, A_c)
            A[n], B[n] = Vh, U * S
        self.aggregated = True
        return A, B

    def eval_model(self) -> ClientModel:
        if not self.aggregated:
            return super().eval_model()
        dtype = self.fed.dtype
        A = {n: a.to(dtype) for n, a in self.A.items()}
        B = {n: b.to(dtype) for n, b in self.B.items()}
        return ClientModel(A=A, B=B, head=self.head, scale=1.0)
