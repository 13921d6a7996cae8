"""Privacy accounting for ``dp=client`` and ``dp=sample`` (Opacus's Renyi-DP accountant; docs/privacy.md).

- client level: the unit is a client; ``rounds`` compositions of the subsampled Gaussian mechanism at
  sampling rate ``q`` = sampled clients / clients;
- sample level: the unit is one training example of one client; for client ``i``, ``steps_i`` compositions
  (its local steps in every round it is sampled) at ``q_i = batch_size / n_i``; the run's epsilon is the
  largest over clients, and a noise multiplier solved from ``dp_epsilon`` is the smallest that keeps every
  client within it.

The accountant assumes Poisson sampling; the simulator samples clients without replacement and batches by
shuffling, as most DP-SGD code does: the epsilons are the usual approximation, stated as such in the record.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

from ilora.errors import ConfigError

ACCOUNTANT = "rdp"
ACCOUNTANT_NOTE = ("Opacus RDP accountant; Poisson sampling assumed (clients sampled without replacement, "
                   "batches by shuffling)")


def _epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    if noise_multiplier == 0:
        return math.inf
    if steps == 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, min(1.0, sample_rate), steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha" for tiny budgets: still a bound
        return float(accountant.get_epsilon(delta))


def _noise_for(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    if steps == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=min(1.0, sample_rate),
                                         steps=steps, accountant=ACCOUNTANT, epsilon_tolerance=0.005)
            return float(sigma)
        except ValueError:  # Opacus: "The privacy budget is too low."
            raise ConfigError(f"dp_epsilon {epsilon} is too small for {steps} noisy steps at sampling rate "
                              f"{sample_rate:.3g} (no noise multiplier reaches it; give a larger dp_epsilon or "
                              "fewer rounds or steps)") from None


def client_level_rate(cfg: Any) -> float:
    return max(1, round(cfg.participation * cfg.num_clients)) / cfg.num_clients


def sample_level_budget(
    cfg: Any, client_sizes: Sequence[int], sampling: Sequence[Sequence[int]]
) -> list[tuple[float, int]]:
    """Per client: (its sampling rate ``batch_size / n_i``, its DP-SGD steps over the whole run)."""
    budget = []
    for cid, n in enumerate(client_sizes):
        per_round = cfg.local_steps if cfg.local_steps is not None else cfg.local_epochs * math.ceil(n / cfg.batch_size)
        rounds = sum(cid in clients for clients in sampling[: cfg.rounds])
        budget.append((cfg.batch_size / n if n else 1.0, per_round * rounds if n else 0))
    return budget


def noise_multiplier(cfg: Any, client_sizes: Sequence[int], sampling: Sequence[Sequence[int]]) -> float | None:
    """``dp_noise_multiplier``, or the one solved from ``dp_epsilon`` and ``dp_delta``; None without DP."""
    if cfg.dp == "none":
        return None
    if cfg.dp_noise_multiplier is not None:
        return float(cfg.dp_noise_multiplier)
    if cfg.dp == "client":
        return _noise_for(cfg.dp_epsilon, cfg.dp_delta, client_level_rate(cfg), cfg.rounds)
    return max(_noise_for(cfg.dp_epsilon, cfg.dp_delta, q, steps)
               for q, steps in sample_level_budget(cfg, client_sizes, sampling))


def epsilon_spent(cfg: Any, sigma: float, client_sizes: Sequence[int], sampling: Sequence[Sequence[int]],
                  rounds: int | None = None) -> float:
    """The epsilon (at ``dp_delta``) of ``rounds`` rounds (default: all of them) at noise multiplier ``sigma``."""
    rounds = cfg.rounds if rounds is None else rounds
    if cfg.dp == "client":
        return _epsilon(sigma, client_level_rate(cfg), rounds, cfg.dp_delta)
    shortened = dataclasses.replace(cfg, rounds=rounds) if rounds != cfg.rounds else cfg
    return max(_epsilon(sigma, q, steps, cfg.dp_delta) for q, steps in sample_level_budget(shortened, client_sizes,
                                                                                            sampling))


def privacy_facts(cfg: Any, sigma: float | None, client_sizes: Sequence[int], sampling: Sequence[Sequence[int]],
                  rounds: int | None = None) -> dict[str, Any] | None:
    """What a record says about the run's privacy (None without DP); ``epsilon`` null means unbounded (sigma 0)."""
    if cfg.dp == "none" or sigma is None:
        return None
    eps = epsilon_spent(cfg, sigma, client_sizes, sampling, rounds)
    unit = "one client" if cfg.dp == "client" else "one training example of one client"
    return {"level": cfg.dp, "unit": unit, "clip": cfg.dp_clip, "noise_multiplier": sigma,
            "epsilon": None if math.isinf(eps) else eps, "delta": cfg.dp_delta, "accountant": ACCOUNTANT_NOTE}
