"""Datasets as plain arrays, a registry by decorator, and the partitioners.

A dataset loader returns a ``RawDataset``: train and test ``Split``s of raw inputs (texts, or uint8
images ``N x H x W [x C]``) and integer labels. Turning raw inputs into tensors is the backbone's job
(its tokenizer or image transform), so any model can be paired with any dataset of its kind. The
types and the registry live in ``ilora.data.base``; the built-in loaders (``hub``, ``offline``) are
imported on first use.
"""

from __future__ import annotations

import numpy as np

from ilora.data.base import (  # noqa: F401  (re-exported)
    DATASETS,
    DataOptions,
    Loader,
    RawDataset,
    Split,
    register_dataset,
    stratified_split,
    subsample,
)
from ilora.errors import ConfigError


def _load_builtin() -> None:
    from ilora.data import hub, offline  # noqa: F401


def available_datasets() -> dict[str, tuple[str, bool]]:
    """Name -> (kind, runs offline)."""
    _load_builtin()
    return {n: (k, off) for n, (_, k, off) in sorted(DATASETS.items())}


def dataset_kind(name: str) -> str:
    _load_builtin()
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r} (valid: {', '.join(sorted(DATASETS))})")
    return DATASETS[name][1]


def load_dataset(name: str, options: DataOptions | None = None) -> RawDataset:
    """Load a registered dataset, then subsample it (stratified, seeded) if asked."""
    dataset_kind(name)
    options = options or DataOptions()
    data = DATASETS[name][0](options)
    rng = np.random.default_rng(options.split_seed)
    data.train = subsample(data.train, options.max_train_samples, rng)
    data.test = subsample(data.test, options.max_test_samples, rng)
    return data


