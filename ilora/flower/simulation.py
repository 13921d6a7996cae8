"""``ilora run engine=flower``: one run on Flower's simulation engine (a Ray pool of virtual clients)."""

from __future__ import annotations

import logging
from typing import Any

from ilora.config import RunConfig
from ilora.errors import RunInterrupted, UserError
from ilora.flower import set_offline_environment
from ilora.runner import available_cores


def run_on_flower(cfg: RunConfig, tracker: Any = None) -> dict[str, Any]:
    """Run ``cfg`` with one virtual SuperNode per client; ``flower_client_cpus`` / ``flower_client_gpus``
    set what each client reserves, so at most ``cores / flower_client_cpus`` clients train at once."""
    set_offline_environment()
    from flwr.simulation import run_simulation

    from ilora.flower.app import make_client_app, make_server_app

    results: list[dict[str, Any]] = []
    backend_config = {
        "client_resources": {"num_cpus": cfg.flower_client_cpus, "num_gpus": cfg.flower_client_gpus},
        "init_args": {"num_cpus": available_cores(), "include_dashboard": False, "logging_level": logging.ERROR,
                      "log_to_driver": True},
    }
    try:
        run_simulation(
            server_app=make_server_app(cfg, engine="flower-simulation", tracker=tracker, results=results),
            client_app=make_client_app(cfg),
            num_supernodes=cfg.num_clients,
            backend_config=backend_config,
        )
    except (UserError, RunInterrupted):
        raise
    except RuntimeError as exc:  # Flower wraps what the ServerApp raised
        cause = exc.__cause__ or exc
        if isinstance(cause, (UserError, RunInterrupted)):
            raise cause from None
        raise
    if not results:
        raise RunInterrupted("Flower's simulation ended without a results record (see its log above)")
    return results[0]
