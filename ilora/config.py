"""Run configuration: composable YAML under ``configs/`` plus ``key=value`` overrides, validated.

Resolution order (later wins): the ``RunConfig`` defaults, ``configs/dataset/<dataset>.yaml``,
``configs/model/<model>.yaml``, ``configs/method/<method>.yaml``, ``configs/preset/<preset>.yaml``,
an optional ``config=<file.yaml>``, then the command-line overrides. Unknown keys are errors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ilora.errors import ConfigError
from ilora.paths import check_name

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class RunConfig:
    preset: str = "cpu"
    method: str = "fedit"
    dataset: str = "bbc_news"
    model: str = "minilm"
    # federation
    num_clients: int = 3
    participation: float = 1.0
    ranks: list[int] = field(default_factory=lambda: [2, 4, 6])
    rounds: int = 5
    partition: str = "dirichlet"  # dirichlet | iid | pathological
    dirichlet_alpha: float = 0.5
    min_partition_size: int = 10
    classes_per_client: int = 2
    # local training
    local_epochs: int = 1
    local_steps: int | None = None
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_clip: float | None = None
    fedprox_mu: float = 0.0  # FedProx: mu/2 ||w - w_start||^2 over the tensors a client trains (0: off)
    # the server's optimiser on the pseudo-gradient (aggregate - global state), docs/optimisers.md
    server_optimizer: str = "fedavg"  # fedavg | fedavgm | fedadagrad | fedadam | fedyogi
    server_lr: float | None = None  # None: 1 for fedavg / fedavgm, 0.01 for the adaptive ones
    server_momentum: float = 0.9  # fedavgm
    server_beta1: float = 0.9  # fedadagrad, fedadam, fedyogi
    server_beta2: float = 0.99  # fedadam, fedyogi
    server_tau: float = 1e-3  # the adaptive optimisers' epsilon (their v starts at tau^2)
    # differential privacy, docs/privacy.md: none | client (DP-FedAvg) | sample (DP-SGD in local training)
    dp: str = "none"
    dp_clip: float = 1.0  # the clipping norm C: of a client's update (client) or of one example's gradient (sample)
    dp_noise_multiplier: float | None = None  # sigma; None: solved from dp_epsilon and dp_delta
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    # divergence: a run is recorded as diverged, not ok, when a loss exceeds this many times ln(classes) (the
    # loss of a uniform guess) or the first round's test loss, or (divergence_at_chance) it ends at chance
    divergence_loss_factor: float = 4.0
    divergence_at_chance: bool = True
    # LoRA
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    backbone_dropout: bool = True  # the pretrained network's own dropout active in local training (authors' code)
    rslora: bool = False
    lora_targets: str | None = None  # a backbone's choice of adapted layers (efficientnet_lite0); None: its default
    # false: a dry run at full size: the real architecture with random weights, no cached files needed (not a result)
    pretrained: bool = True
    # the method's own options, checked against its config dataclass (configs/method/<method>.yaml)
    method_args: dict[str, Any] = field(default_factory=dict)
    # data
    max_length: int = 64
    image_size: int | None = None
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    split_seed: int = 0
    data_dir: str | None = None
    # run
    seed: int = 42
    out_dir: str | None = None  # where records go; None: runs/<preset> (the layout sweeps use)
    run_id: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: str = "auto"  # CPU threads of this run: auto (available cores / sweep jobs, at least 1) | N
    progress: bool = True
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "ilora-bench"
    wandb_group: str | None = None  # a sweep sets <benchmark>/<preset>/<cell> (docs/wandb.md)
    wandb_tags: list[str] = field(default_factory=list)  # extra W&B tags (a sweep adds its benchmarks)
    export: str = "none"  # none | peft | merged: also write the final model as a PEFT adapter or merged weights
    # engine: the in-process simulator, or Flower's simulation engine (docs/flower.md)
    engine: str = "inprocess"  # inprocess | flower
    flower_client_cpus: float = 1.0  # CPUs Flower reserves per client (how many clients train at once)
    flower_client_gpus: float = 0.0  # GPUs per client (a fraction shares one GPU)
    flower_timeout: float = 600.0  # seconds the server waits for a round's replies
    flower_min_clients: int | None = None  # a round proceeds with this many replies; None: all sampled clients


PUBLIC_KEYS = list(RunConfig.__dataclass_fields__)
OPTIMIZERS = ("sgd", "adamw")
WANDB_MODES = ("disabled", "offline", "online")
ENGINES = ("inprocess", "flower")
EXPORTS = ("none", "peft", "merged")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
DP_LEVELS = ("none", "client", "sample")


def available_presets() -> list[str]:
    return sorted(p.stem for p in (CONFIG_ROOT / "preset").glob("*.yaml"))


def _read_yaml(path: Path, what: str) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"{what}: file not found: {path}") from None
    except Exception as exc:  # YAML syntax errors
        raise ConfigError(f"{what}: cannot parse {path}: {exc}".splitlines()[0]) from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{what}: {path} must hold a mapping of keys to values")
    return cfg


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (valid keys: {', '.join(PUBLIC_KEYS)})")
        key, value = item.split("=", 1)
        if "${" in value:  # OmegaConf would resolve it: another key's value, or the environment (oc.env)
            raise ConfigError(f"override {key.strip()!r}: ${{...}} interpolations are not accepted in overrides "
                              "(give the value itself)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot parse overrides: {exc}".splitlines()[0]) from None


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    if isinstance(layer.get("ranks"), int) and not isinstance(layer.get("ranks"), bool):  # ranks=4: every client
        layer = OmegaConf.merge(layer, {"ranks": [layer["ranks"]]})
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as exc:
        key = getattr(exc, "key", None) or str(exc).split("'")[1]
        raise ConfigError(f"unknown config key {key!r} in {source} (valid keys: {', '.join(PUBLIC_KEYS)})") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"invalid value for {key!r} in {source}: {exc.msg if hasattr(exc, 'msg') else exc}"
                          .splitlines()[0]) from None
    except (TypeError, ValueError) as exc:  # e.g. a mapping given where the key holds a list
        key = next((k for k in layer if not _merges(base, layer, k)), "?")
        raise ConfigError(f"invalid value for {key!r} in {source}: {exc}".splitlines()[0]) from None


def _merges(base: DictConfig, layer: DictConfig, key: Any) -> bool:
    try:
        OmegaConf.merge(base, {key: layer[key]})
        return True
    except Exception:
        return False


def resolve_config(overrides: list[str] | None = None, config_root: Path | None = None) -> RunConfig:
    """Build and validate a ``RunConfig`` from the YAML layers and ``key=value`` overrides."""
    root = config_root or CONFIG_ROOT
    cli = _parse_overrides(list(overrides or []))
    config_file = cli.pop("config", None)
    if config_file is not None and not isinstance(config_file, str):
        raise ConfigError(f"config must be the path of a YAML file, got {config_file!r}")
    file_layer = _read_yaml(Path(config_file), "config") if config_file else OmegaConf.create({})

    cfg = OmegaConf.structured(RunConfig)
    preset = cli.get("preset", file_layer.get("preset", cfg.preset))
    presets = sorted(p.stem for p in (root / "preset").glob("*.yaml"))
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r} (valid: {', '.join(presets)})")
    preset_layer = _read_yaml(root / "preset" / f"{preset}.yaml", "preset")

    def chosen(key: str) -> str:
        for layer in (cli, file_layer, preset_layer):
            if key in layer:
                return str(layer[key])
        return str(cfg[key])

    for group in ("dataset", "model", "method"):
        check_name(group, chosen(group))  # it names a file under configs/<group>/
        path = root / group / f"{chosen(group)}.yaml"
        if path.exists():
            cfg = _merge(cfg, _read_yaml(path, group), str(path.relative_to(root.parent)))
    cfg = _merge(cfg, preset_layer, f"configs/preset/{preset}.yaml")
    cfg = _merge(cfg, file_layer, str(config_file))
    cfg = _merge(cfg, cli, "the command line")
    try:
        run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:  # e.g. "???" (a missing mandatory value)
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"invalid value for {key!r}: {getattr(exc, 'msg', exc)}".splitlines()[0]) from None
    run.ranks = expand_ranks(list(run.ranks), run.num_clients)
    if run.out_dir is None:
        run.out_dir = str(Path("runs") / run.preset)
    validate(run)
    return run


def expand_ranks(ranks: list[int], num_clients: int) -> list[int]:
    """The shorthand for ranks: one rank (``ranks=4``) for every client, or a list whose length divides
    ``num_clients`` with each rank for a block of clients (``ranks=[2,8,16] num_clients=15``: five of each)."""
    if ranks and len(ranks) < num_clients and num_clients % len(ranks) == 0:
        return [r for r in ranks for _ in range(num_clients // len(ranks))]
    return ranks


def validate(cfg: RunConfig) -> None:
    """Checks that need no data or model; names the field and the valid choices."""
    from ilora.algorithm import available_algorithms
    from ilora.data import available_datasets
    from ilora.models import available_models

    def choose(key: str, value: Any, valid: list[str] | tuple[str, ...]) -> None:
        if value not in valid:
            raise ConfigError(f"unknown {key} {value!r} (valid: {', '.join(valid)})")

    choose("method", cfg.method, available_algorithms())
    choose("dataset", cfg.dataset, list(available_datasets()))
    choose("model", cfg.model, list(available_models()))
    choose("optimizer", cfg.optimizer, OPTIMIZERS)
    choose("partition", cfg.partition, ("dirichlet", "iid", "pathological"))
    choose("wandb", cfg.wandb, WANDB_MODES)
    choose("engine", cfg.engine, ENGINES)
    choose("export", cfg.export, EXPORTS)
    choose("server_optimizer", cfg.server_optimizer, SERVER_OPTIMIZERS)
    choose("dp", cfg.dp, DP_LEVELS)
    if cfg.run_id is not None:
        check_name("run_id", cfg.run_id)  # <out_dir>/<run_id>/: it must not reach outside out_dir
    if cfg.num_clients < 1:
        raise ConfigError(f"num_clients must be at least 1, got {cfg.num_clients}")
    if len(cfg.ranks) != cfg.num_clients:
        raise ConfigError(
            f"ranks has {len(cfg.ranks)} entries but num_clients is {cfg.num_clients}: give one rank per client, one "
            "rank for all (ranks=4), or a list whose length divides num_clients (each rank for a block of clients)"
        )
    if any(r <= 0 for r in cfg.ranks):
        raise ConfigError(f"ranks must all be positive integers, got {list(cfg.ranks)}")
    if cfg.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha must be positive, got {cfg.lora_alpha}")
    if not 0 < cfg.participation <= 1:
        raise ConfigError(f"participation must be in (0, 1], got {cfg.participation}")
    for key in ("rounds", "local_epochs", "batch_size", "eval_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.lr <= 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr}")
    if cfg.divergence_loss_factor <= 1:
        raise ConfigError(f"divergence_loss_factor must be above 1, got {cfg.divergence_loss_factor}")
    if cfg.partition == "dirichlet" and cfg.dirichlet_alpha <= 0:
        raise ConfigError(f"dirichlet_alpha must be positive, got {cfg.dirichlet_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"unknown device {cfg.device!r} (valid: auto, cpu, cuda, cuda:N)")
    if cfg.threads != "auto" and not (cfg.threads.isdigit() and int(cfg.threads) > 0):
        raise ConfigError(f"threads must be auto or a positive integer, got {cfg.threads!r}")
    for key in ("local_steps", "image_size", "max_train_samples", "max_test_samples"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be a positive integer or null, got {value}")
    for key, value in to_dict(cfg).items():  # every float setting: nan and inf are never meant
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1) (SGD's momentum; at 1 or above the steps never decay), "
                          f"got {cfg.momentum}")
    if cfg.weight_decay < 0 or (cfg.grad_clip is not None and cfg.grad_clip <= 0):
        raise ConfigError("weight_decay must be non-negative and grad_clip positive or null, "
                          f"got {cfg.weight_decay}, {cfg.grad_clip}")
    check_federated_options(cfg)
    if cfg.max_length < 1:
        raise ConfigError(f"max_length must be at least 1 token, got {cfg.max_length}")
    if cfg.min_partition_size < 1 or cfg.classes_per_client < 1:
        raise ConfigError("min_partition_size and classes_per_client must be at least 1 (every client needs an "
                          f"example), got {cfg.min_partition_size}, {cfg.classes_per_client}")
    if cfg.flower_client_cpus <= 0 or cfg.flower_client_gpus < 0 or cfg.flower_timeout <= 0:
        raise ConfigError("flower_client_cpus and flower_timeout must be positive and flower_client_gpus non-negative, "
                          f"got {cfg.flower_client_cpus}, {cfg.flower_timeout}, {cfg.flower_client_gpus}")
    if cfg.flower_min_clients is not None and cfg.flower_min_clients < 1:
        raise ConfigError(f"flower_min_clients must be a positive integer or null, got {cfg.flower_min_clients}")
    if cfg.engine == "flower":
        check_flower()
        check_splits(cfg)
    check_model_limits(cfg)
    check_writable_dir("out_dir", cfg.out_dir)
    check_device(cfg.device)
    if cfg.wandb == "online":
        check_wandb_login()
    method_options(cfg)  # the method's own options must be valid too


def check_federated_options(cfg: RunConfig) -> None:
    """FedProx, the server optimiser and differential privacy: ranges, and whether the method supports them."""
    from ilora.algorithm import Algorithm, get_algorithm

    if cfg.fedprox_mu < 0:
        raise ConfigError(f"fedprox_mu must be non-negative (0: FedProx off), got {cfg.fedprox_mu}")
    if cfg.server_lr is not None and cfg.server_lr <= 0:
        raise ConfigError(f"server_lr must be positive or null, got {cfg.server_lr}")
    for key in ("server_momentum", "server_beta1", "server_beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    if cfg.server_tau <= 0:
        raise ConfigError(f"server_tau must be positive, got {cfg.server_tau}")
    if cfg.dp_clip <= 0:
        raise ConfigError(f"dp_clip must be positive, got {cfg.dp_clip}")
    if cfg.dp_noise_multiplier is not None and cfg.dp_noise_multiplier < 0:
        raise ConfigError(f"dp_noise_multiplier must be non-negative or null, got {cfg.dp_noise_multiplier}")
    if cfg.dp_epsilon is not None and cfg.dp_epsilon <= 0:
        raise ConfigError(f"dp_epsilon must be positive or null, got {cfg.dp_epsilon}")
    if not 0 < cfg.dp_delta < 1:
        raise ConfigError(f"dp_delta must be in (0, 1), got {cfg.dp_delta}")
    if cfg.dp != "none" and (cfg.dp_noise_multiplier is None) == (cfg.dp_epsilon is None):
        raise ConfigError(f"dp={cfg.dp} needs exactly one of dp_noise_multiplier (sigma) and dp_epsilon (the "
                          "budget sigma is solved from, with dp_delta)")
    if cfg.dp == "none" and (cfg.dp_noise_multiplier is not None or cfg.dp_epsilon is not None):
        raise ConfigError("dp_noise_multiplier and dp_epsilon need dp=client or dp=sample (valid dp: "
                          f"{', '.join(DP_LEVELS)})")
    cls = get_algorithm(cfg.method)
    options = method_options(cfg)
    if cfg.server_optimizer != "fedavg":
        problem = cls.server_state_problem(options)
        if problem:
            raise ConfigError(f"server_optimizer {cfg.server_optimizer} is not defined for method {cfg.method}: "
                              f"{problem} (valid: fedavg; docs/optimisers.md)")
    if cfg.dp == "client":
        kind, why = cls.aggregation(options)
        problem = cls.server_state_problem(options)
        if kind != "weighted_sum" or problem:
            raise ConfigError(f"dp=client is not defined for method {cfg.method}: the noise bounds one client's "
                              f"influence only on a fixed weighted sum of the uploads, and {why} "
                              "(valid: dp=none, dp=sample; docs/privacy.md)")
    if cfg.dp != "none" and getattr(options, "control_variates", False):
        raise ConfigError(f"dp={cfg.dp} with control variates: each client would send its full local gradient "
                          "without noise (valid: method_args.control_variates=false)")
    if cfg.dp == "sample" and cls.initialize is not Algorithm.initialize:
        raise ConfigError(f"dp=sample is not defined for method {cfg.method}: its initialisation reads the "
                          "clients' data outside DP-SGD (valid: dp=none, dp=client where defined)")


def check_model_limits(cfg: RunConfig) -> None:
    """Sizes against what the backbone accepts (its registered limits; no weights are loaded)."""
    from ilora.models import model_kind, model_limits

    limits = model_limits(cfg.model)
    kind = model_kind(cfg.model)
    if kind == "text" and limits.max_length is not None and cfg.max_length > limits.max_length:
        raise ConfigError(f"max_length {cfg.max_length} exceeds {cfg.model}'s {limits.max_length} position "
                          f"embeddings (valid: 1 to {limits.max_length})")
    if kind == "image" and cfg.image_size is not None:
        size = cfg.image_size
        if limits.image_sizes is not None and size not in limits.image_sizes:
            raise ConfigError(f"image_size {size} is not accepted by {cfg.model} "
                              f"(valid: {', '.join(map(str, limits.image_sizes))})")
        if size < limits.min_image_size or size % limits.image_multiple:
            raise ConfigError(f"image_size {size} is not accepted by {cfg.model} (valid: a multiple of "
                              f"{limits.image_multiple}, at least {limits.min_image_size}: {limits.why_image})")
    largest = limits.max_rank
    if largest is not None and max(cfg.ranks) > largest:
        raise ConfigError(f"ranks: rank {max(cfg.ranks)} exceeds {largest}, the smallest min(d, k) of {cfg.model}'s "
                          f"adapted layers (a LoRA factor's rank cannot exceed its layer's dimensions; valid: 1 to "
                          f"{largest})")


def check_writable_dir(key: str, path: str) -> None:
    """``path`` is, or can be created as, a directory this process may write to (nothing is created here)."""
    target = Path(path).expanduser()
    probe = target
    try:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise ConfigError(f"{key} {path!r} is not a usable path: {exc.strerror}") from None
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{key} {path!r} is not a directory ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {path!r} is not writable")


def check_flower() -> None:
    from importlib.util import find_spec

    if find_spec("flwr") is None or find_spec("ray") is None:
        raise ConfigError("engine 'flower' needs the flower extra (flwr with its simulation engine): "
                          "pip install -e '.[flower]' (make install does)")


def check_splits(cfg: RunConfig) -> None:
    """A method runs on Flower only if its clients can rebuild their models from the messages."""
    from ilora.algorithm import Algorithm, get_algorithm

    cls = get_algorithm(cfg.method)
    if cls.receive is Algorithm.receive:
        raise ConfigError(f"method {cfg.method!r} runs only in-process (it has no receive()); valid engine: inprocess")
    if cfg.method_args.get("authors_merged_base"):
        raise ConfigError("method_args.authors_merged_base runs only in-process (its clients load the server's merged "
                          "checkpoint, which no message carries); valid engine: inprocess")


def check_device(device: str) -> None:
    """A CUDA device must exist before anything (a tracker's files, data, a model) is touched."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available here (valid: auto, cpu)")


def check_wandb_login() -> None:
    """``wandb=online`` needs an API key (``WANDB_API_KEY`` or ``wandb login``'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return
    import netrc

    try:
        entry = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        entry = None
    if not entry:
        raise ConfigError("wandb=online needs a W&B API key: run `wandb login` or set WANDB_API_KEY "
                          "(valid without one: wandb=offline, wandb=disabled)")


def method_options(cfg: RunConfig) -> Any:
    """The method's config dataclass from ``method_args`` (unknown options and wrong types named)."""
    from ilora.algorithm import build_config, get_algorithm

    try:
        return build_config(get_algorithm(cfg.method), dict(cfg.method_args))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"method_args: {exc}") from None


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


# Keys that do not change what a run computes: left out of its identity.
_NOT_IDENTITY = {
    "out_dir", "run_id", "progress", "wandb", "wandb_project", "wandb_group", "wandb_tags", "device", "preset",
    "threads", "export", "engine", "flower_client_cpus", "flower_client_gpus", "flower_timeout", "flower_min_clients",
    "divergence_loss_factor", "divergence_at_chance",
}


# Keys added after the committed records (results/records/) were made, each with the value every earlier run
# had in effect: left out of a run's identity while they hold it, so that a new option never orphans the
# committed records. Add a key here when you add it to RunConfig with a default that keeps today's behaviour.
ADDED_KEYS: dict[str, Any] = {
    "pretrained": True, "fedprox_mu": 0.0, "server_optimizer": "fedavg", "server_lr": None, "server_momentum": 0.9,
    "server_beta1": 0.9, "server_beta2": 0.99, "server_tau": 1e-3, "dp": "none", "dp_clip": 1.0,
    "dp_noise_multiplier": None, "dp_epsilon": None, "dp_delta": 1e-5,
}


def config_hash(cfg: RunConfig) -> str:
    """A stable id of what a run computes (the resolved config minus bookkeeping keys and added keys at the
    value earlier runs had)."""
    ident = {k: v for k, v in to_dict(cfg).items()
             if k not in _NOT_IDENTITY and not (k in ADDED_KEYS and v == ADDED_KEYS[k])}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
