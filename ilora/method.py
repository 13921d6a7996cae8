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
    check_bool,
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
OFFSETS = ("code", "exact")
CV_ESTIMATORS = ("code", "scaffold")
FACTOR_SPLITS = ("qr", "balanced", "keepnorm")
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
    offset: str = "code"  # code: the authors' code's W0 - B0 A0 | exact: base W0 - s B0 A0
    init_norm: float | None = 1e-4  # QR init scaled so ||B A||_F = init_norm sqrt(d k); None: unscaled
    cv_estimator: str = "code"  # code: the authors' c_i (eval mode, sum of batch-mean grads / n) | scaffold
    factor_split: str = "qr"  # qr (published: B = Q, A = R) | balanced (U sqrt S, sqrt S V^T) | keepnorm

    def __post_init__(self) -> None:
        _check_choice("init", self.init, INITS)
        _check_choice("aggregate", self.aggregate, AGGREGATES)
        _check_choice("qr_mode", self.qr_mode, QR_MODES)
        _check_choice("offset", self.offset, OFFSETS)
        _check_choice("cv_estimator", self.cv_estimator, CV_ESTIMATORS)
        _check_choice("factor_split", self.factor_split, FACTOR_SPLITS)
        check_bool("control_variates", self.control_variates)
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


def split_factors(B: Tensor, A: Tensor, rank: int, how: str = "qr", kappa: float = 1.0) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of the truncated aggregate ``B[:, :rank] @ A[:rank]``, split ``how``.

    ``B`` has orthonormal columns (as ``low_rank_factors`` returns it). Every split has the same product:
    - ``qr``: ``B[:, :r]``, ``A[:r]`` as they are (published: all the magnitude in ``A``);
    - ``balanced``: ``U sqrt(S)`` and ``sqrt(S) V^T`` of the truncated product (an SVD of the small
      ``r x k`` matrix ``A[:r]``, since ``B[:, :r]`` is orthonormal);
    - ``keepnorm``: ``kappa B[:, :r]`` and ``A[:r] / kappa`` (``kappa``: the uploaded ``B``'s column norm).
    """
    _check_choice("factor_split", how, FACTOR_SPLITS)
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
        self.kappa: dict[str, float] = {}  # per layer: mean column norm of the uploaded B (keepnorm split)
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
            A, B = self.global_factors(r)
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

    def global_factors(self, rank: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The aggregated ``(A, B)`` at ``rank``; after concatenated QR split as ``factor_split`` says."""
        if self.config.aggregate != "concat_qr":
            return {n: a[:rank].clone() for n, a in self.A.items()}, {n: b[:, :rank].clone() for n, b in self.B.items()}
        A, B = {}, {}
        for n in self.A:
            B[n], A[n] = split_factors(self.B[n], self.A[n], rank, self.config.factor_split, self.kappa.get(n, 1.0))
            B[n], A[n] = B[n].clone(), A[n].clone()
        return A, B

    def on_local_start(self, cid: int, full_gradient: Callable[..., Gradients]) -> None:
        """Option I: ``c_i_new`` = the full local gradient at the received model.

        ``cv_estimator=code`` computes it as the authors' code does (model in eval mode, gradients of
        each batch's mean loss summed and divided by the number of examples); ``scaffold`` is the true
        mean gradient in training mode.
        """
        if self.config.control_variates:
            old = self.client_state(cid)["c"]
            code = self.config.cv_estimator == "code"
            grads = full_gradient(batch_means=code, eval_mode=code)
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
                Bs = [p[1][n] for p in parts]
                B, A = concat_qr(Bs, [p[0][n] for p in parts], w, r_max, cfg.qr_mode)
                self.A[n], self.B[n] = A.to(self.fed.dtype), B.to(self.fed.dtype)
                self.kappa[n] = mean_column_norm(Bs)
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
        A, B = self.global_factors(r_max) if self.aggregated else (self.A, self.B)
        return ClientModel(A=A, B=B, head=self.head, scale=self.fed.scale(r_max), offsets=self.offsets(r_max))


@register("ilora_s")
class ILoRAS(ILoRA):
    """ILoRA-S: ILoRA with rank-aware control variates (``control_variates=true`` by default)."""

    Config = ILoRASConfig
