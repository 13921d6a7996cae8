"""Every registered method on Flower (https://flower.ai): its simulation engine and real deployments.

The ServerApp runs the same algorithm object and round loop as the in-process simulator, with the
clients behind Flower's Grid; each ClientApp trains with the simulator's own local-training code on a
replica of the algorithm that rebuilds its model from the message alone (``Algorithm.receive``) and
keeps the client's state in Flower's context (and on its node's disk, to survive a restart).
See docs/flower.md. Needs the ``flower`` extra.
"""

from __future__ import annotations

import os

# Flower and Ray must never try the network: no telemetry, no update check, no usage statistics.
OFFLINE_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
}


# What a `flwr run` caller may set (``-c 'overrides="key=value ..."'``): the experiment, never a path, a
# device or an account on the machines that run the apps. Those come from each machine's own operator:
# ``ILORA_FLOWER_SERVER_OVERRIDES`` in the environment of the process that runs the app (any key, applied
# after the caller's), and the SuperNode's ``--node-config`` (``state-dir``). docs/flower.md.
CALLER_KEYS = frozenset({
    "preset", "method", "dataset", "model", "num_clients", "participation", "ranks", "rounds", "partition",
    "dirichlet_alpha", "min_partition_size", "classes_per_client", "local_epochs", "local_steps", "batch_size",
    "eval_batch_size", "optimizer", "lr", "momentum", "weight_decay", "grad_clip", "divergence_loss_factor",
    "divergence_at_chance", "lora_alpha", "lora_dropout", "backbone_dropout", "rslora", "lora_targets", "pretrained",
    "method_args", "max_length", "image_size", "max_train_samples", "max_test_samples", "split_seed", "seed",
    "flower_timeout", "flower_min_clients", "fedprox_mu", "server_optimizer", "server_lr", "server_momentum",
    "server_beta1", "server_beta2", "server_tau",
})  # not the dp_* keys: the privacy promised to the clients is the operator's setting, not the caller's
SERVER_OVERRIDES_ENV = "ILORA_FLOWER_SERVER_OVERRIDES"


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``(caller's, operator's)``: the ``key=value`` items a ``flwr run`` caller may send, and the rest, which
    the operator of a machine sets in ``ILORA_FLOWER_SERVER_OVERRIDES`` (e.g. ``out_dir``, ``threads``)."""
    caller = [o for o in overrides if o.split("=", 1)[0].strip().split(".", 1)[0] in CALLER_KEYS]
    return caller, [o for o in overrides if o not in caller]


def set_offline_environment() -> dict[str, str]:
    """Set the switches above in this process (and so in every process it starts); returns them."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    return dict(OFFLINE_ENVIRONMENT)


set_offline_environment()  # before anything imports flwr: its telemetry switch is read at import
