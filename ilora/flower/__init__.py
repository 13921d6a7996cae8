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


def set_offline_environment() -> dict[str, str]:
    """Set the switches above in this process (and so in every process it starts); returns them."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    return dict(OFFLINE_ENVIRONMENT)


set_offline_environment()  # before anything imports flwr: its telemetry switch is read at import
