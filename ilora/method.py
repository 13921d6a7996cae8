"""ILoRA (Zhou, Liu, Shang, arXiv 2511.16069): QR initialisation, concatenated-QR aggregation and
rank-aware control variates. Registered as ``ilora`` (QR init + concatenated QR) and ``ilora_s``
(the same plus control variates, the paper's "ILoRA-S").

Every component is a switch of one code path (``ILoRAConfig``), so the paper's component ablation is
four configs (``method_args``): FedIT (``init: standard, aggregate: fedavg``), FedIT + QR init
(``init: qr, aggregate: fedavg``), ILoRA (the defaults) and ILoRA + control variates (``ilora_s``).
ILoRA is a ``GlobalAdapterMethod``: it overrides the initial factors, the client's offsets, the
combination of the uploads and the split of the aggregate; rank slicing, messages and the control
variates (``ilora.control_variates``) are the shared ones.

Per adapted layer (``W0``: ``d x k``; client ``i``: rank ``r_i``, scale ``s_i``):

- QR init: ``Q, R = qr(W0)``; ``B_i = c Q[:, :r_i]``, ``A_i = c R[:r_i, :]`` with the authors' rescale
  ``c = sqrt(init_norm * sqrt(d k) / ||Q_r R_r||_F)``. The client's frozen base is offset by
  ``s_i B_i A_i`` (``offset=exact``) or ``B_i A_i`` (``offset=code``) through ``ClientModel.offsets``,
  so no dense per-client base exists.
- Concatenated QR: ``B_c = [B_1, ...]``, ``A_c = [p_1 A_1; ...]``, ``B_c A_c = sum p_i B_i A_i``;
  factorised from the thin factors only (``low_rank_factors``); client ``i`` gets rank ``r_i``, the
  server evaluates rank ``r_max``.
- Control variates (SCAFFOLD option I on the LoRA factors and the head), zero-padded to ``r_max`` on
  the server and cut to ``r_i`` for each client. They travel in the messages under ``cv/<name>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ilora.algorithm import Federation, Message, both_factors_both_ways, register, standard_lora_init, unflatten
from ilora.global_adapter import AdapterConfig, GlobalAdapterMethod
from ilora.lowrank import concat_qr, pad_A, pad_B


@dataclass
class ILoRAConfig(AdapterConfig):
    """ILoRA's switches; the defaults are the published method without control variates."""

    init: Literal["standard", "qr"] = "qr"  # standard (PEFT: A Kaiming-uniform, B = 0) | qr (orthonormal from W0)
    aggregate: Literal["fedavg", "concat_qr"] = "concat_qr"  # fedavg (zero-padded A, B separately) | concat_qr
    control_variates: bool = False  # rank-aware SCAFFOLD (option I) on the factors and the head
    qr_mode: Literal["householder", "pivoted", "svd"] = "householder"  # as published | pivoted | svd (best rank-r)
    offset: Literal["code", "exact"] = "code"  # code: the authors' code's W0 - B0 A0 | exact: W0 - s B0 A0
    init_norm: float | None = 1e-4  # QR init scaled so ||B A||_F = init_norm sqrt(d k); None: unscaled
    cv_estimator: Literal["code", "scaffold"] = "code"  # code: the authors' c_i (eval mode, batch-mean grads / n)
    factor_split: Literal["qr", "balanced", "keepnorm"] = "qr"  # qr (B = Q, A = R) | balanced | keepnorm

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_norm is not None and not self.init_norm > 0:
            raise ValueError(f"init_norm must be a positive number or null, got {self.init_norm!r}")


@dataclass
class ILoRASConfig(ILoRAConfig):
    """``ilora_s``: ILoRA with rank-aware control variates switched on."""

    control_variates: bool = True


# ---------------------------------------------------------------------------------------------
# Splitting the concatenated-QR aggregate for a client
# ---------------------------------------------------------------------------------------------


def split_factors(B: Tensor, A: Tensor, rank: int, how: str = "qr", kappa: float = 1.0) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of the truncated aggregate ``B[:, :rank] @ A[:rank]``, split ``how``.

    ``B`` has orthonormal columns (as ``low_rank_factors`` returns it). Every split has the same product:
    - ``qr``: ``B[:, :r]``, ``A[:r]`` as they are (published: all the magnitude in ``A``);
    - ``balanced``: ``U sqrt(S)`` and ``sqrt(S) V^T`` of the truncated product (an SVD of the small
      ``r x k`` matrix ``A[:r]``, since ``B[:, :r]`` is orthonormal);
    - ``keepnorm``: ``kappa B[:, :r]`` and ``A[:r] / kappa`` (``kappa``: the uploaded ``B``'s column norm).
    """
    B_r, A_r = B[:, :rank], A[:rank]
    if how == "keepnorm":
        return B_r * kappa, A_r / kappa
    if how == "balanced":
        U, S, Vh = torch.linalg.svd(A_r.double(), full_matrices=False)
        root = S.sqrt()
        return (B_r.double() @ (U * root)).to(B.dtype), (root[:, None] * Vh).to(A.dtype)
    return B_r, A_r


def mean_column_norm(Bs: Sequence[Tensor]) -> float:
    """The mean Euclidean norm of the columns of all ``Bs`` (1.0 if they are all zero)."""
    norms = torch.cat([torch.linalg.vector_norm(b.double(), dim=0) for b in Bs])
    value = float(norms.mean()) if norms.numel() else 0.0
    return value if value > 0 else 1.0


# ---------------------------------------------------------------------------------------------
# The algorithm
# ---------------------------------------------------------------------------------------------


CONCAT_QR = ("dense_products", "its concatenated QR factors sum p_i s_i B_i A_i, which needs each client's factors "
             "or the dense sum")


@register("ilora", display_name="ILoRA", comm=both_factors_both_ways, comm_text="r_i(d+k) up, r_i(d+k) down",
          groups=("paper",), aggregation=CONCAT_QR)
class ILoRA(GlobalAdapterMethod):
    """QR init + concatenated-QR aggregation (+ control variates when switched on)."""

    Config = ILoRAConfig
    config: ILoRAConfig

    def __init__(self, fed: Federation, config: ILoRAConfig | None = None):
        super().__init__(fed, config)
        self.aggregated = False  # before the first aggregation, clients start from their own init
        self.kappa: dict[str, float] = {}  # per layer: mean column norm of the uploaded B (keepnorm split)

    @classmethod
    def aggregation(cls, config: ILoRAConfig) -> tuple[str, str]:
        if config.aggregate == "fedavg":
            return "weighted_sum", "with aggregate=fedavg its aggregate is the zero-padded average of A and B"
        return cls.info.aggregation

    @classmethod
    def server_state_problem(cls, config: ILoRAConfig) -> str | None:
        if config.aggregate == "fedavg":
            return None
        return ("its concatenated-QR aggregate re-factors the product sum p_i s_i B_i A_i, whose QR factors are "
                "unique only up to rotation, so factor differences are not updates (aggregate=fedavg has them)")

    # -- initialisation ------------------------------------------------------------------------
    def initial_adapter(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The QR of every ``W0`` (truncated to ``r_max``, float64) or the standard draw; the ``r_max`` init."""
        fed, r_max = self.fed, self.fed.max_rank
        self._qr0: dict[str, tuple[Tensor, Tensor]] = {}  # W0 = Q R, truncated to r_max (float64)
        if self.config.init == "qr":
            for name, W0 in fed.pretrained_weights().items():
                Q, R = torch.linalg.qr(W0.detach().to(fed.device, torch.float64))
                self._qr0[name] = (pad_B(Q[:, :r_max], r_max), pad_A(R[:r_max], r_max))
        else:
            self._std = standard_lora_init(fed, r_max)  # the same draw as FedIT's
        self._inits: dict[int, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}
        self._offsets: dict[int, dict[str, tuple[Tensor, Tensor, float]]] = {}
        A0, B0 = self.initial_factors(r_max)
        return dict(A0), dict(B0)  # global factors at r_max (replaced, never modified in place)

    def initial_factors(self, rank: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """A rank-``rank`` client's starting ``(A, B)``: the QR init of ``W0`` or the standard init."""
        if rank not in self._inits:
            fed = self.fed
            A, B = {}, {}
            for name, spec in fed.layers.items():
                if self.config.init == "standard":
                    A[name], B[name] = self._std[0][name][:rank], self._std[1][name][:, :rank]
                    continue
                Q, R = self._qr0[name][0][:, :rank], self._qr0[name][1][:rank]
                c = 1.0
                if self.config.init_norm is not None:
                    norm = float(torch.linalg.matrix_norm(R))  # ||Q_r R_r||_F = ||R_r||_F
                    target = self.config.init_norm * (spec.out_features * spec.in_features) ** 0.5
                    c = (target / norm) ** 0.5 if norm > 0 else 1.0
                A[name] = (c * R).to(fed.dtype)
                B[name] = (c * Q).to(fed.dtype)
            self._inits[rank] = (A, B)
        return self._inits[rank]

    def client_offsets(self, rank: int) -> dict[str, tuple[Tensor, Tensor, float]]:
        """The frozen ``(A0, B0, s0)`` a rank-``rank`` client subtracts (empty for the standard init)."""
        if self.config.init != "qr":
            return {}
        if rank not in self._offsets:
            A0, B0 = self.initial_factors(rank)
            s0 = self.fed.scale(rank) if self.config.offset == "exact" else 1.0
            self._offsets[rank] = {n: (A0[n], B0[n], s0) for n in A0}
        return self._offsets[rank]

    offsets = client_offsets

    # -- client side ---------------------------------------------------------------------------
    def client_factors(self, cid: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        r = self.fed.ranks[cid]
        if self.aggregated:
            return self.global_factors(r)
        A0, B0 = self.initial_factors(r)
        return {n: a.clone() for n, a in A0.items()}, {n: b.clone() for n, b in B0.items()}

    def global_factors(self, rank: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The aggregated ``(A, B)`` at ``rank``; after concatenated QR split as ``factor_split`` says."""
        if self.config.aggregate != "concat_qr":
            return {n: a[:rank].clone() for n, a in self.A.items()}, {n: b[:, :rank].clone() for n, b in self.B.items()}
        A, B = {}, {}
        for n in self.A:
            B[n], A[n] = split_factors(self.B[n], self.A[n], rank, self.config.factor_split, self.kappa.get(n, 1.0))
            B[n], A[n] = B[n].clone(), A[n].clone()
        return A, B

    # -- server side ---------------------------------------------------------------------------
    def combine(self, uploads: dict[int, Message], weights: dict[int, float]) -> tuple[dict, dict]:
        """Concatenated QR of ``sum p_i B_i A_i`` to ``r_max`` per layer (or the zero-padded average)."""
        self.aggregated = True
        if self.config.aggregate == "fedavg":
            return super().combine(uploads, weights)
        cids = list(uploads)
        parts = [unflatten(uploads[c]) for c in cids]
        w = [weights[c] for c in cids]
        A, B = {}, {}
        for n in parts[0][0]:
            Bs = [p[1][n] for p in parts]
            B_n, A_n = concat_qr(Bs, [p[0][n] for p in parts], w, self.fed.max_rank, self.config.qr_mode)
            A[n], B[n] = A_n.to(self.fed.dtype), B_n.to(self.fed.dtype)
            self.kappa[n] = mean_column_norm(Bs)
        return A, B

    def eval_factors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The global adapter at ``r_max`` (on the base of a rank-``r_max`` client)."""
        return self.global_factors(self.fed.max_rank) if self.aggregated else (self.A, self.B)


@register("ilora_s", display_name="ILoRA-S", comm=both_factors_both_ways,
          comm_text="2 r_i(d+k) up, 2 r_i(d+k) down (factors and control variates)", groups=("paper",),
          aggregation=CONCAT_QR)
class ILoRAS(ILoRA):
    """ILoRA-S: ILoRA with rank-aware control variates (``control_variates=true`` by default)."""

    Config = ILoRASConfig
