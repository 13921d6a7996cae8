"""ILoRA (Zhou, Liu, Shang, arXiv 2511.16069): QR initialisation, concatenated-QR aggregation and
rank-aware control variates. Registered as ``ilora`` (QR init + concatenated QR) and ``ilora_s``
(the same plus control variates, the paper's "ILoRA-S").

Every component is a switch of one code path (``ILoRAConfig``), so the paper's component ablation is
four configs: FedIT (``init=standard aggregate=fedavg control_variates=false``), FedIT + QR init
(``init=qr aggregate=fedavg``), ILoRA (the defaults) and ILoRA + control variates (``ilora_s``).

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ilora.algorithm import (
    Algorithm,
    ClientModel,
    Federation,
    Gradients,
    Message,
    pad_A,
    pad_B,
    register,
    standard_lora_init,
    unflatten,
    zero_padded_average,
)

INITS = ("standard", "qr")
AGGREGATES = ("fedavg", "concat_qr")
QR_MODES = ("householder", "pivoted", "svd")
OFFSETS = ("exact", "code")
CV_PREFIX = "cv/"


def _check_choice(name: str, value: object, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r} (valid: {', '.join(valid)})")


@dataclass
class ILoRAConfig:
    """ILoRA's switches; the defaults are the published method without control variates."""

    init: str = "qr"  # standard (PEFT: A Kaiming-uniform, B = 0) | qr (orthonormal init from W0)
    aggregate: str = "concat_qr"  # fedavg (zero-padded A, B separately) | concat_qr
    control_variates: bool = False  # rank-aware SCAFFOLD (option I) on the factors and the head
    qr_mode: str = "householder"  # householder (as published) | pivoted | svd (best rank-r truncation)
    offset: str = "exact"  # exact: base W0 - s B0 A0 | code: the authors' code's W0 - B0 A0
    init_norm: float | None = 1e-4  # QR init scaled so ||B A||_F = init_norm sqrt(d k); None: unscaled

    def __post_init__(self) -> None:
        _check_choice("init", self.init, INITS)
        _check_choice("aggregate", self.aggregate, AGGREGATES)
        _check_choice("qr_mode", self.qr_mode, QR_MODES)
        _check_choice("offset", self.offset, OFFSETS)
        if not isinstance(self.control_variates, bool):
            raise ValueError(f"control_variates must be true or false, got {self.control_variates!r}")
        norm = self.init_norm
        numeric = isinstance(norm, (int, float)) and not isinstance(norm, bool)
        if norm is not None and not (numeric and norm > 0):
            raise ValueError(f"init_norm must be a positive number or null, got {self.init_norm!r}")


@dataclass
class ILoRASConfig(ILoRAConfig):
    """``ilora_s``: ILoRA with rank-aware control variates switched on."""

    control_variates: bool = True


# ---------------------------------------------------------------------------------------------
# Concatenated-QR aggregation on thin factors
# ---------------------------------------------------------------------------------------------


def concat_factors(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """``B_c = [B_1, B_2, ...]`` (``d x R``) and ``A_c = [p_1 A_1; p_2 A_2; ...]`` (``R x k``).

    ``B_c A_c = sum_i p_i B_i A_i`` exactly, with ``R = sum_i r_i``.
    """
    B_c = torch.cat(list(Bs), dim=1)
    A_c = torch.cat([w * A for A, w in zip(As, weights)], dim=0)
    return B_c, A_c


def _pivoted_qr(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Column-pivoted QR ``M[:, perm] = Q R`` (LAPACK geqp3 through SciPy; ``M`` is small)."""
    import scipy.linalg

    Q, R, perm = scipy.linalg.qr(M.detach().cpu().numpy(), mode="economic", pivoting=True)
    as_tensor = lambda a: torch.from_numpy(a).to(M.device, M.dtype)  # noqa: E731
    return as_tensor(Q), as_tensor(R), torch.from_numpy(perm).to(M.device)


def low_rank_factors(B: Tensor, A: Tensor, rank: int, mode: str = "householder") -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors ``(B_r, A_r)`` of the factorisation of ``B @ A``, never forming ``B @ A``.

    ``Q1, R1 = qr(B)`` (``d x R``), then a factorisation of the small ``M = R1 A`` (``R x k``):
    - ``householder``: ``Q2, R2 = qr(M)``; ``B_r = (Q1 Q2)[:, :r]``, ``A_r = R2[:r]``, the same
      ``Q[:, :r] R[:r, :]`` products as an unpivoted QR of ``B A`` (the span of its first columns);
    - ``pivoted``: column-pivoted QR of ``M`` (pivots chosen by residual column norms, which ``Q1``
      preserves), the columns of ``A_r`` put back in their original order;
    - ``svd``: ``M = U S V^T``; ``B_r = (Q1 U)[:, :r]``, ``A_r = (S V^T)[:r]``, the best rank-``r``
      approximation of ``B A``.
    ``B_r`` has orthonormal columns. Cost ``O((d + k) R^2)``; when ``B A`` has fewer than ``rank``
    directions, the factors are zero-padded to ``rank``.
    """
    _check_choice("qr_mode", mode, QR_MODES)
    Q1, R1 = torch.linalg.qr(B)
    M = R1 @ A
    if mode == "householder":
        Q2, right = torch.linalg.qr(M)
    elif mode == "pivoted":
        Q2, R2, perm = _pivoted_qr(M)
        right = torch.empty_like(R2)
        right[:, perm] = R2
    else:
        Q2, S, Vh = torch.linalg.svd(M, full_matrices=False)
        right = S[:, None] * Vh
    r = min(rank, Q2.shape[1])
    B_r, A_r = Q1 @ Q2[:, :r], right[:r]
    if r < rank:
        B_r, A_r = pad_B(B_r, rank), pad_A(A_r, rank)
    return B_r, A_r


def concat_qr(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float], rank: int, mode: str = "householder"
) -> tuple[Tensor, Tensor]:
    """ILoRA's aggregation of one layer: rank-``rank`` factors of ``sum_i p_i B_i A_i`` (in float64)."""
    B_c, A_c = concat_factors([b.double() for b in Bs], [a.double() for a in As], weights)
    return low_rank_factors(B_c, A_c, rank, mode)


def _pad_flat(name: str, t: Tensor, rank: int) -> Tensor:
    """Zero-pad a flat-named tensor to ``rank`` (rows of ``lora_A``, columns of ``lora_B``)."""
    if name.startswith("lora_A/"):
        return pad_A(t, rank)
    if name.startswith("lora_B/"):
        return pad_B(t, rank)
    return t


def _cut_flat(name: str, t: Tensor, rank: int) -> Tensor:
    """The first ``rank`` rows of ``lora_A`` / columns of ``lora_B`` entries; others unchanged."""
    if name.startswith("lora_A/"):
        return t[:rank]
    if name.startswith("lora_B/"):
        return t[:, :rank]
    return t


# ---------------------------------------------------------------------------------------------
# The algorithm
# ---------------------------------------------------------------------------------------------


@register("ilora")
class ILoRA(Algorithm):
    """QR init + concatenated-QR aggregation (+ control variates when switched on)."""

    Config = ILoRAConfig
    config: ILoRAConfig

    def __init__(self, fed: Federation, config: ILoRAConfig | None = None):
        super().__init__(fed, config)
        cfg = self.config
        r_max = fed.max_rank
        self._qr0: dict[str, tuple[Tensor, Tensor]] = {}  # W0 = Q R, truncated to r_max (float64)
        if cfg.init == "qr":
            for name, W0 in fed.pretrained_weights().items():
                Q, R = torch.linalg.qr(W0.detach().to(fed.device, torch.float64))
                self._qr0[name] = (pad_B(Q[:, :r_max], r_max), pad_A(R[:r_max], r_max))
        else:
            self._std = standard_lora_init(fed, r_max)  # the same draw as FedIT's
        self._inits: dict[int, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}
        self._offsets: dict[int, dict[str, tuple[Tensor, Tensor, float]]] = {}
        A0, B0 = self.initial_factors(r_max)
        self.A, self.B = dict(A0), dict(B0)  # global factors at r_max (replaced, never modified in place)
        self.aggregated = False  # before the first aggregation, clients start from their own init
        self.c: Message = {}  # server control variate at r_max
        self._c_new: dict[int, Message] = {}  # c_i_new of the clients training this round
        if cfg.control_variates:
            self.c = self._zeros(r_max)

    # -- initialisation ------------------------------------------------------------------------
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

    def offsets(self, rank: int) -> dict[str, tuple[Tensor, Tensor, float]]:
        """The frozen ``(A0, B0, s0)`` a rank-``rank`` client subtracts (empty for the standard init)."""
        if self.config.init != "qr":
            return {}
        if rank not in self._offsets:
            A0, B0 = self.initial_factors(rank)
            s0 = self.fed.scale(rank) if self.config.offset == "exact" else 1.0
            self._offsets[rank] = {n: (A0[n], B0[n], s0) for n in A0}
        return self._offsets[rank]

    def _zeros(self, rank: int) -> Message:
        """Zero tensors shaped like a rank-``rank`` client's trainable tensors (flat names)."""
        fed = self.fed
        z: Message = {}
        for name, spec in fed.layers.items():
            z[f"lora_A/{name}"] = torch.zeros(rank, spec.in_features, device=fed.device, dtype=fed.dtype)
            z[f"lora_B/{name}"] = torch.zeros(spec.out_features, rank, device=fed.device, dtype=fed.dtype)
        for name, h in self.head.items():
            z[f"head/{name}"] = torch.zeros_like(h)
        return z

    # -- client side ---------------------------------------------------------------------------
    def init_client(self, cid: int) -> dict:
        return {"c": self._zeros(self.fed.ranks[cid])} if self.config.control_variates else {}

    def download(self, cid: int) -> tuple[Message, ClientModel]:
        r = self.fed.ranks[cid]
        if self.aggregated:
            A = {n: a[:r].clone() for n, a in self.A.items()}
            B = {n: b[:, :r].clone() for n, b in self.B.items()}
        else:
            A0, B0 = self.initial_factors(r)
            A, B = {n: a.clone() for n, a in A0.items()}, {n: b.clone() for n, b in B0.items()}
        model = ClientModel(
            A=A, B=B, head={n: h.clone() for n, h in self.head.items()}, scale=self.fed.scale(r),
            offsets=self.offsets(r),
        )
        message = model.flat()
        if self.config.control_variates:
            message.update({CV_PREFIX + k: _cut_flat(k, v, r) for k, v in self.c.items()})
        return message, model

    def on_local_start(self, cid: int, full_gradient: Callable[[], Gradients]) -> None:
        """Option I: ``c_i_new`` = the full local gradient at the received model."""
        if self.config.control_variates:
            old = self.client_state(cid)["c"]
            grads = full_gradient()
            self._c_new[cid] = {k: grads[k].detach().to(old[k]) for k in old}

    def gradient_correction(self, cid: int) -> Gradients | None:
        """``c - c_i`` (``c`` cut to the client's rank), added to every local gradient."""
        if not self.config.control_variates:
            return None
        r = self.fed.ranks[cid]
        c_i = self.client_state(cid)["c"]
        return {k: _cut_flat(k, self.c[k], r) - c_i[k] for k in c_i}

    def upload(self, cid: int, trained: ClientModel) -> Message:
        message = trained.flat()
        if self.config.control_variates:
            state = self.client_state(cid)
            new = self._c_new.pop(cid)
            message.update({CV_PREFIX + k: new[k] - state["c"][k] for k in new})  # dc_i
            state["c"] = new
        return message

    # -- server side ---------------------------------------------------------------------------
    def aggregate(self, uploads: dict[int, Message], weights: dict[int, float]) -> None:
        cfg, r_max = self.config, self.fed.max_rank
        cids = list(uploads)
        models = {c: {k: v for k, v in uploads[c].items() if not k.startswith(CV_PREFIX)} for c in cids}
        parts = [unflatten(models[c]) for c in cids]
        w = [weights[c] for c in cids]
        if cfg.aggregate == "fedavg":
            self.A, self.B = zero_padded_average(models, weights, r_max)
        else:
            self.A, self.B = {}, {}
            for n in parts[0][0]:
                B, A = concat_qr([p[1][n] for p in parts], [p[0][n] for p in parts], w, r_max, cfg.qr_mode)
                self.A[n], self.B[n] = A.to(self.fed.dtype), B.to(self.fed.dtype)
        self.average_head(models, weights)
        if cfg.control_variates:
            n_clients = self.fed.num_clients
            for k in self.c:
                dc = sum(_pad_flat(k, uploads[c][CV_PREFIX + k], r_max) for c in cids)
                self.c[k] = self.c[k] + dc / n_clients
        self.aggregated = True

    def eval_model(self) -> ClientModel:
        """The global adapter at ``r_max`` on the base of a rank-``r_max`` client."""
        r_max = self.fed.max_rank
        return ClientModel(A=self.A, B=self.B, head=self.head, scale=self.fed.scale(r_max),
                           offsets=self.offsets(r_max))


@register("ilora_s")
class ILoRAS(ILoRA):
    """ILoRA-S: ILoRA with rank-aware control variates (``control_variates=true`` by default)."""

    Config = ILoRASConfig
