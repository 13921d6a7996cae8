"""The Algorithm interface, the method registry, and the small tensor helpers every method shares.

An algorithm sees the federation only through tensors: per adapted layer a pair of LoRA factors
(``A``: ``r x k``, ``B``: ``d x r``), the classification head's tensors, and the messages that go up
and down the wire (flat ``dict[str, Tensor]``, whose sizes are what communication counts). It never
touches the backbone, the data or the optimiser; the simulator does that. This keeps every method a
small file and lets the same object run inside another federated runtime.

Flat tensor names used in messages and gradient corrections:
``lora_A/<layer>``, ``lora_B/<layer>``, ``lora_R/<layer>``, ``head/<parameter>``.

Methods register with ``@register`` and are found through the ``ilora.methods`` entry point group
(``pyproject.toml``): this module never imports a method, so a method in another installed package
registers exactly as the built-in ones do.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from ilora.lora import lora_scale
from ilora.lowrank import pad_A, pad_B, weighted_sum

Message = dict[str, Tensor]
Gradients = dict[str, Tensor]

METHOD_ENTRY_POINTS = "ilora.methods"


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommContext:
    """What one sampled client's bytes for one adapted layer (``d x k``) may depend on."""

    rank: int  # r_i
    d: int
    k: int
    max_rank: int
    round: int  # 0-based
    previous_ranks: tuple[int, ...] = ()  # the ranks of the clients sampled in the previous round


CommFormula = Callable[[CommContext], tuple[int, int]]  # (uplink, downlink) elements of one layer


def both_factors_both_ways(c: CommContext) -> tuple[int, int]:
    """The most common formula: the client's ``A`` and ``B``, ``r_i (d + k)``, up and down."""
    return c.rank * (c.d + c.k), c.rank * (c.d + c.k)


@dataclass(frozen=True)
class MethodInfo:
    """What a method declares where it registers; the report, the docs and the tests read it here.

    ``comm`` counts one layer's elements per sampled client and round without control variates (they
    add the trained tensors' shapes both ways); ``shares_head``: the head travels both ways too.
    ``personalised``: the method is evaluated on each client's own model, not one global model.
    """

    name: str
    display_name: str
    comm: CommFormula
    comm_text: str
    groups: tuple[str, ...] = ()
    shares_head: bool = True
    personalised: bool = False
    aggregation: tuple[str, str] = ("weighted_sum", "")  # (kind, why): see ``AGGREGATION_KINDS``


# How a method's server combines the uploads, which decides what additive secure aggregation (the server
# sees only sums) and client-level differential privacy can do with it (docs/privacy.md).
AGGREGATION_KINDS = {
    "weighted_sum": "as is: the server needs only weighted sums of the uploads",
    "data_weighted_sum": "as is, with one more summed scalar: weights computed from each upload",
    "dense_products": "sends more: the server needs the sum of the dense products s_i B_i A_i (d x k per layer)",
    "individual": "cannot: the server needs each client's factors by themselves",
}
SECURE_AGGREGATION = {"weighted_sum": "as is", "data_weighted_sum": "as is (+ weights)",
                      "dense_products": "sends dense d x k", "individual": "cannot"}

_REGISTRY: dict[str, type[Algorithm]] = {}
_DISCOVERED = False


def register(
    name: str,
    *,
    display_name: str,
    comm: CommFormula,
    comm_text: str,
    groups: Iterable[str] = (),
    shares_head: bool = True,
    personalised: bool = False,
    aggregation: tuple[str, str] = ("weighted_sum", "its aggregate is a weighted sum of the uploads"),
) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: make an algorithm available as ``method=<name>``, with its display name, its
    communication formula (``comm``, and ``comm_text`` for people), the method groups it belongs to, and how
    its server combines the uploads (``aggregation``: a kind of ``AGGREGATION_KINDS`` and why)."""
    if aggregation[0] not in AGGREGATION_KINDS:
        raise ValueError(f"aggregation kind {aggregation[0]!r} of {name!r} (valid: {', '.join(AGGREGATION_KINDS)})")

    def wrap(cls: type[Algorithm]) -> type[Algorithm]:
        if name in _REGISTRY:
            raise ValueError(f"algorithm {name!r} is registered twice")
        cls.name = name
        cls.info = MethodInfo(name, display_name, comm, comm_text, tuple(groups), shares_head, personalised,
                              aggregation)
        _REGISTRY[name] = cls
        return cls

    return wrap


def discover_methods() -> None:
    """Import every module named in the ``ilora.methods`` entry point group (once)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for ep in entry_points(group=METHOD_ENTRY_POINTS):
        import_module(ep.value)
    if not _REGISTRY:
        raise RuntimeError(
            "no federated methods are registered: install the suite (pip install -e .) so that its "
            f"{METHOD_ENTRY_POINTS!r} entry points exist"
        )


def available_algorithms() -> list[str]:
    discover_methods()
    return sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].info.groups[:1] != ("paper",), n))


def get_algorithm(name: str) -> type[Algorithm]:
    discover_methods()
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name]


def method_info(name: str) -> MethodInfo:
    return get_algorithm(name).info


def method_groups() -> dict[str, list[str]]:
    """Group name -> its methods; ``all`` holds every registered method."""
    groups: dict[str, list[str]] = {"all": available_algorithms()}
    for name in groups["all"]:
        for g in _REGISTRY[name].info.groups:
            groups.setdefault(g, []).append(name)
    return groups


def display_name(name: str) -> str:
    """A method's display name (``name`` itself if no method has that name)."""
    discover_methods()
    return _REGISTRY[name].info.display_name if name in _REGISTRY else name


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
    sampling: list[list[int]] = field(default_factory=list)  # the pre-drawn sampled clients of every round

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
    R: dict[str, Tensor] | None = None  # an r x r middle factor per layer (update s B R A), e.g. Fed-SB
    train_R: bool = True

    @property
    def rank(self) -> int:
        return next(iter(self.A.values())).shape[0]

    @property
    def trained_factors(self) -> tuple[str, ...]:
        """The factors a client trains (``A``, ``B``, ``R``), in that order."""
        flags = (("A", self.train_A), ("B", self.train_B), ("R", self.R is not None and self.train_R))
        return tuple(name for name, trained in flags if trained)

    def flat(self, factors: Iterable[str] = ("A", "B"), head: bool = True) -> Message:
        """The named factors (and the head) as one flat message (what a client usually sends)."""
        msg: Message = {}
        for which in factors:
            for name, t in (getattr(self, which) or {}).items():
                msg[f"lora_{which}/{name}"] = t
        if head:
            msg.update({f"head/{n}": t for n, t in self.head.items()})
        return msg


def unflatten(msg: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Split a flat message into ``(A, B, head)`` dicts (missing parts come back empty; other kinds
    of tensor, e.g. control variates or ``lora_R``, are left out: see ``message_part``)."""
    return message_part(msg, "lora_A"), message_part(msg, "lora_B"), message_part(msg, "head")


def message_part(msg: Mapping[str, Tensor], kind: str) -> dict[str, Tensor]:
    """The tensors of one kind (``lora_A``, ``lora_B``, ``lora_R``, ``head``...) by layer / parameter name."""
    out = {}
    for key, t in msg.items():
        prefix, _, name = key.partition("/")
        if prefix == kind:
            out[name] = t
    return out


def message_bytes(msg: Mapping[str, Tensor]) -> int:
    """Bytes on the wire: elements x element size, summed over the message's tensors."""
    return sum(t.numel() * t.element_size() for t in msg.values())



# ---------------------------------------------------------------------------------------------
# Shared tensor helpers
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Method options: a dataclass per method, checked against its field types
# ---------------------------------------------------------------------------------------------


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Raise ``ValueError`` naming ``name`` when ``value`` does not fit the type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                _check_type(name, value, option)
                return
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{name} has an invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"unknown {name} {value!r} (valid: {', '.join(map(str, args))})")
        return
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    elif hint is str and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")


@dataclass
class MethodConfig:
    """Base of every method's options: each field is checked against its type on creation
    (``Literal[...]`` fields name their valid choices); subclasses add range checks."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


class Algorithm:
    """Base class: override what differs. See the module docstring for the tensor conventions.

    Life cycle driven by the simulator, per round and per sampled client ``cid``:
    ``download(cid)`` -> (message counted downlink, model loaded and trained) ->
    ``on_local_start`` / ``gradient_correction`` / ``local_loss`` (optional) ->
    ``upload(cid, trained)`` (message counted uplink); then ``aggregate(uploads, weights)`` once,
    and ``eval_model()`` for the global evaluation. On Flower the client's part runs on a replica
    that rebuilds the model from the message with ``receive`` (see there).
    """

    name: ClassVar[str] = "base"
    info: ClassVar[MethodInfo]
    Config: ClassVar[type] = MethodConfig

    def __init__(self, fed: Federation, config: Any = None):
        self.fed = fed
        self.config = config if config is not None else self.Config()
        self.head = clone_tensors(fed.head_init)
        self.clients: dict[int, dict[str, Any]] = {}
        self.control_variates: Any = None  # a ControlVariates component, if the method switched it on

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
        whole local loss at the loaded model (see ``Simulation.full_gradient``). By default: the control
        variates' ``c_i`` estimate, when the method uses them.
        """
        if self.control_variates is not None:
            self.control_variates.local_start(cid, full_gradient)

    def initialize(self, weight_gradient: Callable[[int], dict[str, Tensor]]) -> None:
        """Called once before round 1 (not on resume). ``weight_gradient(n)``: the gradient of the mean
        loss over ``n`` training examples (spread evenly over the clients) with respect to every adapted
        dense weight at ``W0``, for methods whose initialisation needs it (Fed-SB)."""

    def local_loss(self, cid: int, params: Mapping[str, Tensor]) -> Tensor | None:
        """A term added to client ``cid``'s training loss at every step (flat-named parameters); ``None``: none."""
        return None

    def gradient_correction(self, cid: int) -> Gradients | None:
        """Tensors added to the gradients (flat names) before every optimiser step; ``None``: none.

        By default: the control variates' ``c - c_i``, when the method uses them.
        """
        return None if self.control_variates is None else self.control_variates.correction(cid)

    def upload(self, cid: int, trained: ClientModel) -> Message:
        return trained.flat()

    # -- the client side in its own process (Flower) -------------------------------------------
    # In-process, ``download`` hands the simulator the client's model directly. A client in another
    # process has only the message, its own state and the run's static facts (config, seeds, W0):
    # it runs a replica of the algorithm whose ``receive`` rebuilds the same model, and whose
    # ``upload`` and training hooks update the client's own state. The server's object never sees
    # that state; what it needs of it travels in the uploads.
    def receive(self, cid: int, message: Message, round_index: int) -> ClientModel:
        """Client side: the model client ``cid`` trains from in round ``round_index`` (0-based), rebuilt from
        the downloaded ``message`` and what the client itself keeps; equal to the model ``download`` returned."""
        raise NotImplementedError(f"method {self.name!r} does not implement receive(): it runs only in-process")

    def client_side_state(self, cid: int) -> dict[str, Any]:
        """Everything client ``cid`` keeps between rounds: its state and, if used, its control variate."""
        state: dict[str, Any] = {"client": self.clients.get(cid)}
        if self.control_variates is not None:
            state["control_variate"] = self.control_variates.client_c.get(cid)
        return state

    def load_client_side_state(self, cid: int, state: Mapping[str, Any]) -> None:
        """Restore what ``client_side_state`` returned (a replica serving one client at a time)."""
        self.clients.pop(cid, None)
        if state.get("client") is not None:
            self.clients[cid] = state["client"]
        if self.control_variates is not None:
            self.control_variates.client_c.pop(cid, None)
            if state.get("control_variate") is not None:
                self.control_variates.client_c[cid] = state["control_variate"]

    # -- server side ---------------------------------------------------------------------------
    def aggregate(self, uploads: dict[int, Message], weights: dict[int, float]) -> None:
        raise NotImplementedError

    def eval_model(self) -> ClientModel:
        """The global model the server evaluates (personalised methods: see ``client_eval_models``)."""
        raise NotImplementedError

    def client_eval_models(self) -> dict[int, ClientModel] | None:
        """Personalised methods: every client's own model, evaluated instead of ``eval_model``."""
        return None

    # -- the global state, for the shared server-side mechanisms (ilora.server_update) ----------
    @classmethod
    def aggregation(cls, config: Any) -> tuple[str, str]:
        """How this method, with these options, combines the uploads: (kind, why); see ``AGGREGATION_KINDS``."""
        return cls.info.aggregation

    @classmethod
    def server_state_problem(cls, config: Any) -> str | None:
        """Why this method, with these options, has no set of global tensors a server optimiser could step
        (None: ``server_state`` gives them)."""
        return "its global state is not a set of tensors the server averages"

    def server_state(self) -> dict[str, Tensor]:
        """The global tensors by flat name (``lora_A/<layer>``, ``lora_B/<layer>``, ``lora_R/<layer>``,
        ``head/<parameter>``)."""
        raise NotImplementedError(self.server_state_problem(self.config))

    def load_server_state(self, state: Mapping[str, Tensor]) -> None:
        """Replace the global tensors named in ``state``."""
        raise NotImplementedError(self.server_state_problem(self.config))

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
