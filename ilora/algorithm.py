"""The Algorithm interface, its registry, and the small tensor helpers every method shares.

An algorithm sees the federation only through tensors: per adapted layer a pair of LoRA factors
(``A``: ``r x k``, ``B``: ``d x r``), the classification head's tensors, and the messages that go up
and down the wire (flat ``dict[str, Tensor]``, whose sizes are what communication counts). It never
touches the backbone, the data or the optimiser; the simulator does that. This keeps every method a
small file and lets the same object run inside another federated runtime.

Flat tensor names used in messages and gradient corrections:
``lora_A/<layer>``, ``lora_B/<layer>``, ``head/<parameter>``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ilora.lora import lora_scale

Message = dict[str, Tensor]
Gradients = dict[str, Tensor]

_REGISTRY: dict[str, type[Algorithm]] = {}


def register(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: make an algorithm available as ``method=<name>``."""

    def wrap(cls: type[Algorithm]) -> type[Algorithm]:
        if name in _REGISTRY:
            raise ValueError(f"algorithm {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    import baselines  # noqa: F401  (registers the baselines)
    import ilora.method  # noqa: F401  (registers ilora, ilora_s)


def available_algorithms() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_algorithm(name: str) -> type[Algorithm]:
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name]


# ---------------------------------------------------------------------------------------------
# What an algorithm knows about the federation, and what a client trains
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """One adapted weight matrix: ``out_features`` = d, ``in_features`` = k."""

    out_features: int
    in_features: int


@dataclass
class Federation:
    """The static facts of one federated run that algorithms may use."""

    layers: dict[str, LayerSpec]
    ranks: list[int]
    num_examples: list[int]
    head_init: dict[str, Tensor]
    pretrained_weights: Callable[[], dict[str, Tensor]]  # W0 per adapted layer, read-only
    lora_alpha: float = 16.0
    rslora: bool = False
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def num_clients(self) -> int:
        return len(self.ranks)

    @property
    def max_rank(self) -> int:
        return max(self.ranks)

    def scale(self, rank: int) -> float:
        return lora_scale(self.lora_alpha, rank, self.rslora)

    def scale_ratio(self, cid: int) -> float:
        """``s_i / s_max``: client ``cid``'s LoRA scale in units of the server's (rank ``r_max``) scale."""
        return self.scale(self.ranks[cid]) / self.scale(self.max_rank)

    def generator(self, *salt: int) -> torch.Generator:
        """A CPU generator seeded from the run seed and ``salt`` (reproducible initialisations)."""
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([self.seed, *salt]).generate_state(1)[0]))
        return g


@dataclass
class ClientModel:
    """Everything a client trains from, as the simulator loads it onto the shared backbone."""

    A: dict[str, Tensor]
    B: dict[str, Tensor]
    head: dict[str, Tensor]
    scale: float
    offsets: dict[str, tuple[Tensor, Tensor, float]] = field(default_factory=dict)  # subtracted
    base_delta: dict[str, Tensor] | None = None  # added to W0 (merged updates, e.g. FLoRA)
    train_A: bool = True
    train_B: bool = True

    @property
    def rank(self) -> int:
        return next(iter(self.A.values())).shape[0]

    def flat(self, factors: Iterable[str] = ("A", "B"), head: bool = True) -> Message:
        """The trainable tensors as one flat message (what a client usually sends)."""
        msg: Message = {}
        for which in factors:
            for name, t in getattr(self, which).items():
                msg[f"lora_{which}/{name}"] = t
        if head:
            msg.update({f"head/{n}": t for n, t in self.head.items()})
        return msg


def unflatten(msg: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Split a flat message into ``(A, B, head)`` dicts (missing parts come back empty)."""
    parts: dict[str, dict[str, Tensor]] = {"lora_A": {}, "lora_B": {}, "head": {}}
    for key, t in msg.items():
        kind, _, name = key.partition("/")
        parts[kind][name] = t
    return parts["lora_A"], parts["lora_B"], parts["head"]


def message_bytes(msg: Mapping[str, Tensor]) -> int:
    """Bytes on the wire: elements x element size, summed over the message's tensors."""
    return sum(t.numel() * t.element_size() for t in msg.values())


# ---------------------------------------------------------------------------------------------
# Shared tensor helpers
# ---------------------------------------------------------------------------------------------


def pad_A(A: Tensor, rank: int) -> Tensor:
    """Zero rows appended so that ``A`` has ``rank`` rows."""
    return torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])], dim=0)


def pad_B(B: Tensor, rank: int) -> Tensor:
    """Zero columns appended so that ``B`` has ``rank`` columns."""
    return torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], dim=1)


def weighted_sum(tensors: Iterable[Tensor], weights: Iterable[float]) -> Tensor:
    total = None
    for t, w in zip(tensors, weights):
        total = t * w if total is None else total + t * w
    assert total is not None, "weighted_sum of nothing"
    return total


def average(dicts: list[Mapping[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """Key-wise weighted sum of same-shaped tensor dicts."""
    return {k: weighted_sum((d[k] for d in dicts), weights) for k in dicts[0]}


def zero_padded_average(
    uploads: dict[int, Message], weights: dict[int, float], rank: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(sum p_i pad(A_i), sum p_i pad(B_i))`` per layer, padded to ``rank``."""
    cids = list(uploads)
    parts = [unflatten(uploads[c]) for c in cids]
    w = [weights[c] for c in cids]
    A = {n: weighted_sum((pad_A(p[0][n], rank) for p in parts), w) for n in parts[0][0]}
    B = {n: weighted_sum((pad_B(p[1][n], rank) for p in parts), w) for n in parts[0][1]}
    return A, B


def standard_lora_init(fed: Federation, rank: int, salt: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """PEFT's default LoRA init at ``rank``: ``A`` Kaiming-uniform (a = sqrt 5), ``B`` zero.

    Seeded from the run seed, so every client and every method drawing with the same ``salt`` gets
    bit-identical factors; a client of rank ``r_i`` uses the first ``r_i`` rows of ``A``.
    """
    A, B = {}, {}
    for i, (name, spec) in enumerate(fed.layers.items()):
        g = fed.generator(salt, i)
        bound = 1.0 / math.sqrt(spec.in_features)  # kaiming_uniform_(a=sqrt(5)) on an r x k weight
        A[name] = (torch.rand(rank, spec.in_features, generator=g, dtype=torch.float64) * 2 - 1).mul(bound)
        A[name] = A[name].to(fed.device, fed.dtype)
        B[name] = torch.zeros(spec.out_features, rank, device=fed.device, dtype=fed.dtype)
    return A, B


def clone_tensors(d: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in d.items()}


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def dense_update(A: Mapping[str, Tensor], B: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """``scale * B @ A`` per layer, in float32 at least (a dense ``d x k`` update merged into a base)."""
    dtype = torch.promote_types(next(iter(A.values())).dtype, torch.float32)
    return {n: scale * (B[n].to(dtype) @ A[n].to(dtype)) for n in A}


# ---------------------------------------------------------------------------------------------
# The ILoRA authors' way of running the zero-padding baselines (audit options, off by default)
# ---------------------------------------------------------------------------------------------


@dataclass
class AuthorsOptions:
    """How the ILoRA authors' scripts ran FedIT, LoRA-FAIR and FFA-LoRA (see docs/reproduction-audit.md).

    - ``authors_merged_base``: their CV scripts merge the aggregated adapter into a checkpoint
      (``W0 + s B_g A_g``, ``s = alpha / r_max``) that every client and the evaluation then load
      *under* the same adapter again, so training starts from and evaluation sees the global adapter twice.
    - ``authors_local_head``: their heterogeneous-rank NLP script never sends the aggregated head back:
      each client starts every round from its own fixed random head; the server evaluates the average.
    """

    authors_merged_base: bool = False
    authors_local_head: bool = False

    def __post_init__(self) -> None:
        check_bool("authors_merged_base", self.authors_merged_base)
        check_bool("authors_local_head", self.authors_local_head)


def local_random_head(fed: Federation, template: Mapping[str, Tensor], cid: int) -> dict[str, Tensor]:
    """A fresh head for client ``cid``, drawn as ``nn.Linear`` initialises (uniform, bound 1/sqrt(fan_in))."""
    g = fed.generator(0x4EAD, cid)
    head = {}
    for name, t in template.items():
        weight = t if t.dim() >= 2 else template.get(name.replace("bias", "weight"), t)
        fan_in = weight.shape[1] if weight.dim() >= 2 else weight.shape[0]
        bound = 1.0 / math.sqrt(fan_in)
        head[name] = ((torch.rand(t.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(t)
    return head


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


@dataclass
class NoConfig:
    """An algorithm without hyperparameters of its own."""


class Algorithm:
    """Base class: override what differs. See the module docstring for the tensor conventions.

    Life cycle driven by the simulator, per round and per sampled client ``cid``:
    ``download(cid)`` -> (message counted downlink, model loaded and trained) ->
    ``on_local_start`` / ``gradient_correction`` / ``on_local_end`` (optional) ->
    ``upload(cid, trained)`` (message counted uplink); then ``aggregate(uploads, weights)`` once,
    and ``eval_model()`` for the global evaluation.
    """

    name: ClassVar[str] = "base"
    Config: ClassVar[type] = NoConfig

    def __init__(self, fed: Federation, config: Any = None):
        self.fed = fed
        self.config = config if config is not None else self.Config()
        self.head = clone_tensors(fed.head_init)
        self.clients: dict[int, dict[str, Any]] = {}

    def client_state(self, cid: int) -> dict[str, Any]:
        """The persistent state of client ``cid``, created by ``init_client`` on first use."""
        if cid not in self.clients:
            self.clients[cid] = self.init_client(cid)
        return self.clients[cid]

    # -- client side ---------------------------------------------------------------------------
    def init_client(self, cid: int) -> dict[str, Any]:
        """Per-client persistent state (small tensors only)."""
        return {}

    def download(self, cid: int) -> tuple[Message, ClientModel]:
        raise NotImplementedError

    def on_local_start(self, cid: int, full_gradient: Callable[..., Gradients]) -> None:
        """Called after the model is loaded and before the first local step.

        ``full_gradient(batch_means=False, eval_mode=False)`` computes the gradient of the client's
        whole local loss at the loaded model (see ``Simulation.full_gradient``).
        """

    def gradient_correction(self, cid: int) -> Gradients | None:
        """Tensors added to the gradients (flat names) before every optimiser step; ``None``: none."""
        return None

    def upload(self, cid: int, trained: ClientModel) -> Message:
        return trained.flat()

    # -- server side ---------------------------------------------------------------------------
    def aggregate(self, uploads: dict[int, Message], weights: dict[int, float]) -> None:
        raise NotImplementedError

    def eval_model(self) -> ClientModel:
        raise NotImplementedError

    # -- shared pieces -------------------------------------------------------------------------
    def average_head(self, uploads: dict[int, Message], weights: dict[int, float]) -> None:
        """The classification head: weighted average of the uploaded heads (every method)."""
        cids = list(uploads)
        heads = [unflatten(uploads[c])[2] for c in cids]
        self.head = average(heads, [weights[c] for c in cids])


def build_config(cls: type[Algorithm], values: Mapping[str, Any]) -> Any:
    """Instantiate ``cls.Config`` from a mapping, naming unknown keys and valid ones on error."""
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(values) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise ValueError(f"method {cls.name!r} has no option {unknown[0]!r} (valid: {valid})")
    return cls.Config(**values)


class AuthorsBaseline(Algorithm):
    """A baseline with one global pair ``self.A, self.B`` at ``r_max`` and the ``AuthorsOptions``."""

    def __init__(self, fed: Federation, config: Any = None):
        super().__init__(fed, config)
        self.merged_base: dict[str, Tensor] | None = None  # authors_merged_base: s B_g A_g after aggregation

    def client_head(self, cid: int) -> tuple[dict[str, Tensor], bool]:
        """The head client ``cid`` starts from, and whether it travels down the wire."""
        if not self.config.authors_local_head:
            return clone_tensors(self.head), True
        return local_random_head(self.fed, self.fed.head_init, cid), False

    def merge_global_adapter(self) -> None:
        """After aggregation (``authors_merged_base``): the base clients and the evaluation load the adapter onto."""
        if self.config.authors_merged_base:
            self.merged_base = dense_update(self.A, self.B, self.fed.scale(self.fed.max_rank))
