"""LoRA-FAIR (Bian et al., ICCV 2025): FedIT's averages plus a residual correction on ``B`` only.

Per layer the server forms ``A_bar = sum p_i A_i``, ``B_bar = sum p_i B_i`` (zero-padded to ``r_max``
as FedIT) and the ideal ``dW = sum p_i B_i A_i``, then corrects ``B``:

- ``closed_form`` (default, the ILoRA authors' code): the ridge fit
  ``dB = (dW - B_bar A_bar) A_bar^T (A_bar A_bar^T + lambda I)^-1``, computed without forming the
  dense ``d x k`` ``dW``: ``dW A_bar^T = sum p_i B_i (A_i A_bar^T)`` is ``d x r``.
- ``cosine`` (the paper): ``dB = argmin 1 - cos(dW, (B_bar + dB) A_bar) + lambda ||dB||^2`` by Adam
  on the small tensors (inner products through ``r x r`` Gram matrices, never ``dW`` itself); the best
  iterate is kept, so the objective never ends above its value at ``dB = 0``.

Clients start the next round from ``(A_bar, B_bar + dB)`` (client ``i``: first ``r_i`` rows / columns);
nothing is merged into ``W0``. The server evaluates the ``r_max`` pair with scale ``alpha / r_max``.

Scales with heterogeneous ranks: by default the factors are averaged raw, exactly as FedIT's
zero-padding baseline (so LoRA-FAIR differs from FedIT only by ``dB``). ``fold_scales: true`` instead
keeps the global pair in units of ``s_max = alpha / r_max``: client ``i`` uploads ``B_i`` read as
``(s_i / s_max) B_i`` and receives ``(s_max / s_i) B[:, :r_i]``, so that ``dW`` is the average of the
clients' actual updates ``s_i B_i A_i`` (divided by ``s_max``).

Audit options (off by default; the ILoRA authors' way of running it, see docs/reproduction-audit.md):
``authors_merged_base``, ``authors_local_head`` (``ilora.global_adapter.AuthorsOptions``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ilora.algorithm import Message, both_factors_both_ways, register, unflatten, zero_padded_average
from ilora.global_adapter import AuthorsOptions, GlobalAdapterMethod

CORRECTIONS = ("closed_form", "cosine")


@dataclass
class LoRAFAIRConfig(AuthorsOptions):
    correction: Literal["closed_form", "cosine"] = "closed_form"
    lam: float = 0.01  # the paper's lambda (regulariser of dB)
    cosine_steps: int = 300  # Adam steps of the cosine objective
    cosine_lr: float = 0.01  # Adam step size, relative to the RMS of B_bar
    fold_scales: bool = False  # average s_i B_i (in units of alpha / r_max) instead of raw factors

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam < 0:
            raise ValueError(f"lam must be non-negative, got {self.lam}")
        if self.cosine_steps < 0:
            raise ValueError(f"cosine_steps must be non-negative, got {self.cosine_steps}")
        if self.cosine_lr <= 0:
            raise ValueError(f"cosine_lr must be positive, got {self.cosine_lr}")


def target_times_At(As: list[Tensor], Bs: list[Tensor], weights: list[float], A_bar: Tensor) -> Tensor:
    """``dW A_bar^T = sum_i w_i B_i (A_i A_bar^T)`` (``d x r``) without forming the ``d x k`` ``dW``.

    ``A_i`` / ``B_i`` may have rank ``r_i <= r``: they stand for their zero-padded versions.
    """
    return sum(w * (b @ (a @ A_bar.T)) for a, b, w in zip(As, Bs, weights))


def closed_form_correction(
    As: list[Tensor], Bs: list[Tensor], weights: list[float], A_bar: Tensor, B_bar: Tensor, lam: float
) -> Tensor:
    """Ridge fit ``dB = (dW - B_bar A_bar) A_bar^T (A_bar A_bar^T + lam I)^-1`` (float64 inside)."""
    A64, B64 = A_bar.double(), B_bar.double()
    G = A64 @ A64.T  # r x r
    M = target_times_At([a.double() for a in As], [b.double() for b in Bs], weights, A64)
    rhs = M - B64 @ G  # (dW - B_bar A_bar) A_bar^T, d x r
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    dB = torch.linalg.solve(G + lam * eye, rhs.T).T  # G + lam I is symmetric
    return dB.to(B_bar.dtype)


def cosine_correction(
    As: list[Tensor],
    Bs: list[Tensor],
    weights: list[float],
    A_bar: Tensor,
    B_bar: Tensor,
    lam: float,
    steps: int,
    lr: float,
) -> Tensor:
    """``argmin_dB 1 - cos(dW, (B_bar + dB) A_bar) + lam ||dB||^2`` by Adam (best iterate kept)."""
    A64, B64 = A_bar.double(), B_bar.double()
    As64 = [a.double() for a in As]
    Bs64 = [b.double() for b in Bs]
    r = A64.shape[0]
    # <dW, X A_bar> = <sum_i w_i B_i (A_i A_bar^T), X>; ||X A_bar||^2 = <X^T X, G>; ||dW||^2 via Grams.
    C = target_times_At(As64, Bs64, weights, A64)  # d x r
    G = A64 @ A64.T
    dW_sq = sum(
        wi * wj * ((bi.T @ bj) * (ai @ aj.T)).sum()
        for ai, bi, wi in zip(As64, Bs64, weights)
        for aj, bj, wj in zip(As64, Bs64, weights)
    )
    dW_norm = torch.sqrt(torch.clamp(dW_sq, min=0.0))
    zero = torch.zeros(B64.shape[0], r, dtype=torch.float64, device=B64.device)
    if float(dW_norm) == 0.0:
        return zero.to(B_bar.dtype)

    def objective(dB: Tensor) -> Tensor:
        X = B64 + dB
        inner = (C * X).sum()
        x_norm = torch.sqrt(torch.clamp(((X.T @ X) * G).sum(), min=1e-300))
        return 1.0 - inner / (dW_norm * x_norm) + lam * (dB * dB).sum()

    dB = zero.clone().requires_grad_(True)
    step = lr * max(float(B64.pow(2).mean().sqrt()), 1e-12)
    optimizer = torch.optim.Adam([dB], lr=step)
    best, best_value = zero, float(objective(zero))
    for _ in range(steps):
        optimizer.zero_grad()
        value = objective(dB)
        if float(value.detach()) < best_value:
            best, best_value = dB.detach().clone(), float(value.detach())
        value.backward()
        optimizer.step()
    with torch.no_grad():
        if float(objective(dB.detach())) < best_value:
            best = dB.detach().clone()
    return best.to(B_bar.dtype)


@register("lora_fair", display_name="LoRA-FAIR", comm=both_factors_both_ways, comm_text="r_i(d+k) up, r_i(d+k) down",
          groups=("paper",),
          aggregation=("dense_products", "its correction fits sum p_i B_i A_i, the dense sum of products"))
class LoRAFAIR(GlobalAdapterMethod):
    """FedIT's averages, then ``B <- B_bar + dB``; clients start from the corrected pair."""

    Config = LoRAFAIRConfig

    def combine(self, uploads: dict[int, Message], weights: dict[int, float]) -> tuple[dict, dict]:
        A_bar, B_bar = zero_padded_average(uploads, weights, self.fed.max_rank)
        cids = list(uploads)
        parts = [unflatten(uploads[c]) for c in cids]
        w = [weights[c] for c in cids]
        cfg = self.config
        for name in self.fed.layers:
            As, Bs = [p[0][name] for p in parts], [p[1][name] for p in parts]
            if cfg.correction == "closed_form":
                dB = closed_form_correction(As, Bs, w, A_bar[name], B_bar[name], cfg.lam)
            else:
                dB = cosine_correction(
                    As, Bs, w, A_bar[name], B_bar[name], cfg.lam, cfg.cosine_steps, cfg.cosine_lr
                )
            B_bar[name] = B_bar[name] + dB
        return A_bar, B_bar
