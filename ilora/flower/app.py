"""The Flower App: a ServerApp and a ClientApp that run any registered method.

``flwr run flower/`` finds ``server_app`` and ``client_app`` here (``flower/pyproject.toml``) and
takes the suite's config from the run config: ``config`` (a YAML file, as ``ilora run config=...``)
and ``overrides`` (``key=value`` pairs separated by spaces). ``ilora run engine=flower`` builds the
same apps around an already resolved config (``make_server_app`` / ``make_client_app``).
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from ilora.flower import CALLER_KEYS, SERVER_OVERRIDES_ENV, set_offline_environment

set_offline_environment()

from flwr.app import Context, Message  # noqa: E402  (after the offline switches)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from ilora.config import RunConfig, resolve_config  # noqa: E402
from ilora.errors import ConfigError  # noqa: E402
from ilora.flower.client import handle_query, handle_train  # noqa: E402
from ilora.flower.server import FlowerServer  # noqa: E402
from ilora.runner import build_parts, resolve_threads, run_experiment, run_id_for  # noqa: E402

_RESOLVED: dict[tuple, RunConfig] = {}


def caller_overrides(run_config: dict[str, Any]) -> list[str]:
    """The caller's ``overrides``, each key checked against ``CALLER_KEYS`` (a ``ConfigError`` names the first
    that is not); a caller's ``config`` file is refused: files on the app's machine are its operator's."""
    if str(run_config.get("config") or ""):
        raise ConfigError(f"config: a run config may not name a file on the app's machine; put the keys in "
                          f"overrides, or have the operator set {SERVER_OVERRIDES_ENV}='config=PATH'")
    overrides = shlex.split(str(run_config.get("overrides", "")))
    for item in overrides:
        key = item.split("=", 1)[0].strip().split(".", 1)[0]
        if key not in CALLER_KEYS:
            raise ConfigError(f"overrides: {key!r} cannot be set by a flwr run caller (valid: "
                              f"{', '.join(sorted(CALLER_KEYS))}); paths, devices and accounts are set by the "
                              f"operator in {SERVER_OVERRIDES_ENV}")
    return overrides


def config_from_context(context: Context) -> RunConfig:
    """The suite's config from Flower's run config (the caller's ``overrides``, allow-listed) and the operator's
    ``ILORA_FLOWER_SERVER_OVERRIDES``, resolved once per process."""
    run_config = dict(context.run_config)
    server = os.environ.get(SERVER_OVERRIDES_ENV, "")
    key = (tuple(sorted((k, str(v)) for k, v in run_config.items())), server)
    if key not in _RESOLVED:
        cfg = resolve_config([*caller_overrides(run_config), *shlex.split(server)])
        cfg.out_dir = str(Path(cfg.out_dir).resolve())
        _RESOLVED[key] = cfg
    return _RESOLVED[key]


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp for ``cfg`` (``None``: read the config from the run config)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(cfg or config_from_context(context), msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(cfg or config_from_context(context), msg, context)

    return app


def make_server_app(cfg: RunConfig | None = None, engine: str = "flower-app", tracker: Any = None,
                    results: list | None = None) -> ServerApp:
    """A ServerApp that runs ``cfg`` to its results record (appended to ``results`` when given)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or config_from_context(context)

        def build(c: RunConfig):
            import torch

            torch.set_num_threads(resolve_threads(c.threads))
            parts = build_parts(c)
            server = FlowerServer(parts, grid, engine)
            return server, parts.facts(server.algorithm)

        record = run_experiment(run_cfg, tracker, build=build, engine=engine)
        if record["status"] == "ok":  # the clients' default state dirs (on this machine when the nodes are)
            shutil.rmtree(Path(run_cfg.out_dir) / run_id_for(run_cfg) / "flower-clients", ignore_errors=True)
        if results is not None:  # embedded (ilora run engine=flower): the CLI reports the record
            results.append(record)
        else:  # flwr run: nothing else says where the record went
            print(f"results record: {Path(run_cfg.out_dir) / run_id_for(run_cfg) / 'result.json'} "
                  f"(status {record['status']}, final accuracy {record['final_accuracy']})")

    return app


server_app = make_server_app()
client_app = make_client_app()
