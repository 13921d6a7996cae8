"""Backbones: a frozen pretrained network with LoRA injected once and a trainable head.

A builder returns a ``Backbone``; the simulator loads each client's factors and head into it in turn.
Builders are registered by name with ``@register_model`` (``ilora.models.base``); the built-in ones
(``text``, ``vision``) are imported on first use.
"""

from __future__ import annotations

from ilora.errors import ConfigError
from ilora.models.base import (  # noqa: F401  (re-exported)
    MODEL_CHECKS,
    MODEL_LIMITS,
    MODELS,
    Backbone,
    Batch,
    Builder,
    FrozenBackboneModule,
    ModelLimits,
    ModelOptions,
    fixed_targets,
    head_parameters,
    lora_args,
    register_model,
    seeded_linear,
)


def _load_builtin() -> None:
    from ilora.models import text, vision  # noqa: F401


def available_models() -> dict[str, tuple[str, bool]]:
    """Name -> (kind, runs offline)."""
    _load_builtin()
    return {n: (k, off) for n, (_, k, off) in sorted(MODELS.items())}


def model_kind(name: str) -> str:
    _load_builtin()
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r} (valid: {', '.join(sorted(MODELS))})")
    return MODELS[name][1]


def model_limits(name: str) -> ModelLimits:
    """The sizes ``name`` accepts (``register_model(..., limits=...)``)."""
    model_kind(name)
    return MODEL_LIMITS[name]


def check_model_files(name: str, pretrained: bool = True) -> None:
    """The files ``name`` loads (cached weights, tokenizer) are there and fit: one-line ``UserError`` if not.

    ``pretrained=False`` (a dry run with random weights) needs no cached snapshot: only the checks of models
    packaged for offline use run (their package also holds the architecture).
    """
    model_kind(name)
    if not pretrained and not MODELS[name][2]:
        return
    check = MODEL_CHECKS.get(name)
    if check is not None:
        check()


def build_model(name: str, options: ModelOptions) -> Backbone:
    model_kind(name)
    return MODELS[name][0](options)


def dataset_model_check(dataset: str, model: str) -> None:
    """A text model needs a text dataset and a vision model an image dataset."""
    from ilora.data import available_datasets, dataset_kind

    kind = model_kind(model)
    if dataset_kind(dataset) != kind:
        same = [n for n, (k, _) in available_datasets().items() if k == kind]
        raise ConfigError(
            f"model {model!r} is {'an' if kind[0] in 'aeiou' else 'a'} {kind} model; dataset {dataset!r} is not "
            f"(valid: {', '.join(same)})"
        )
