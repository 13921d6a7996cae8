"""Low-rank algebra on thin LoRA factors, shared by every method: nothing here forms a dense ``d x k``
product unless its name says so (``dense_product``).

Conventions: a LoRA pair is ``B`` (``d x r``) and ``A`` (``r x k``) with product ``B @ A``. Padding a
pair to a larger rank appends zero columns to ``B`` and zero rows to ``A`` (the product is unchanged);
cutting keeps the first ``r`` of them. Flat message names (``lora_A/<layer>``, ``lora_B/<layer>``,
``head/<parameter>``) are padded and cut the same way, other names pass through.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

QRMode = Literal["householder", "pivoted", "svd"]
QR_MODES = ("householder", "pivoted", "svd")


# ------------------------------------------------------------------------------------ pad and cut
def pad_A(A: Tensor, rank: int) -> Tensor:
    """Zero rows appended so that ``A`` has ``rank`` rows."""
    return torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])], dim=0)


def pad_B(B: Tensor, rank: int) -> Tensor:
    """Zero columns appended so that ``B`` has ``rank`` columns."""
    return torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], dim=1)


def pad_square(R: Tensor, rank: int) -> Tensor:
    """``R`` (``r x r``) in the top-left corner of a ``rank x rank`` zero matrix."""
    out = R.new_zeros(rank, rank)
    out[: R.shape[0], : R.shape[1]] = R
    return out


def pad_flat(name: str, t: Tensor, rank: int) -> Tensor:
    """Zero-pad a flat-named tensor to ``rank`` (rows of ``lora_A``, columns of ``lora_B``)."""
    if name.startswith("lora_A/"):
        return pad_A(t, rank)
    if name.startswith("lora_B/"):
        return pad_B(t, rank)
    return t


def cut_flat(name: str, t: Tensor, rank: int) -> Tensor:
    """The first ``rank`` rows of ``lora_A`` / columns of ``lora_B`` entries; others unchanged."""
    if name.startswith("lora_A/"):
        return t[:rank]
    if name.startswith("lora_B/"):
        return t[:, :rank]
    return t


def cut_pair(
    A: Mapping[str, Tensor], B: Mapping[str, Tensor], rank: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Copies of the first ``rank`` rows of every ``A`` and columns of every ``B``."""
    return {n: a[:rank].clone() for n, a in A.items()}, {n: b[:, :rank].clone() for n, b in B.items()}


def weighted_sum(tensors: Iterable[Tensor], weights: Iterable[float]) -> Tensor:
    """``sum_i w_i t_i`` (in the order given)."""
    total = None
    for t, w in zip(tensors, weights):
        total = t * w if total is None else total + t * w
    assert total is not None, "weighted_sum of nothing"
    return total


# ------------------------------------------------------------------------------------ concatenation
def concat_factors(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """``B_c = [B_1, B_2, ...]`` (``d x R``) and ``A_c = [w_1 A_1; w_2 A_2; ...]`` (``R x k``).

    ``B_c A_c = sum_i w_i B_i A_i`` exactly, with ``R = sum_i r_i``.
    """
    B_c = torch.cat(list(Bs), dim=1)
    A_c = torch.cat([w * A for A, w in zip(As, weights)], dim=0)
    return B_c, A_c


def stack_modules(
    A: Sequence[Tensor], B: Sequence[Tensor], weights: Sequence[float], scales: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """``(A_stack, B_stack)`` with ``B_stack A_stack = sum_i w_i s_i B_i A_i`` (rows of A, columns of B)."""
    B_stack, A_stack = concat_factors(B, A, [w * s for w, s in zip(weights, scales)])
    return A_stack, B_stack


# ------------------------------------------------------------------------------------ truncation
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
    if mode not in QR_MODES:
        raise ValueError(f"unknown qr_mode {mode!r} (valid: {', '.join(QR_MODES)})")
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
    """Rank-``rank`` factors of ``sum_i w_i B_i A_i`` (in float64) by concatenation and thin QR / SVD."""
    B_c, A_c = concat_factors([b.double() for b in Bs], [a.double() for a in As], weights)
    return low_rank_factors(B_c, A_c, rank, mode)


def thin_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``U, S, Vh`` with ``B @ A = U diag(S) Vh`` (``U``: ``d x R``, ``Vh``: ``R x k``), from the thin factors.

    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (thin QR), then the SVD of the small ``R_B R_A^T``; the singular
    values come sorted, largest first. ``R`` is ``B``'s column count; trailing values may be zero.
    """
    Q_B, R_B = torch.linalg.qr(B)
    Q_A, R_A = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)
    return Q_B @ U, S, Vh @ Q_A.T


def frobenius_norm_of_product(B: Tensor, A: Tensor) -> Tensor:
    """``||B A||_F`` from the thin factors: ``sqrt(<B^T B, A A^T>)``."""
    return ((B.T @ B) * (A @ A.T)).sum().clamp_min(0.0).sqrt()


def dense_product(A: Mapping[str, Tensor], B: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """``scale * B @ A`` per layer, in float32 at least (a dense ``d x k`` update merged into a base)."""
    dtype = torch.promote_types(next(iter(A.values())).dtype, torch.float32)
    return {n: scale * (B[n].to(dtype) @ A[n].to(dtype)) for n in A}
