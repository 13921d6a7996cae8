"""The dataset types and registry (loaders register here; ``ilora.data`` discovers the built-in ones).

A dataset loader returns a ``RawDataset``: train and test ``Split``s of raw inputs (texts, or uint8
images ``N x H x W [x C]``) and integer labels. Turning raw inputs into tensors is the backbone's job
(its tokenizer or image transform), so any model can be paired with any dataset of its kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np


@dataclass
class Split:
    inputs: Any  # list[str] for text, np.ndarray (uint8 images) for vision
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Split:
        inputs = [self.inputs[i] for i in idx] if isinstance(self.inputs, list) else self.inputs[idx]
        return Split(inputs, self.labels[idx])


@dataclass
class RawDataset:
    name: str
    kind: Literal["text", "image"]
    train: Split
    test: Split
    class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class DataOptions:
    """What a loader may use besides its name."""

    split_seed: int = 0  # fixes held-out test splits and subsamples, independently of the run seed
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    data_dir: str | None = None


Loader = Callable[[DataOptions], RawDataset]
DATASETS: dict[str, tuple[Loader, str, bool]] = {}


def register_dataset(name: str, kind: str, offline: bool) -> Callable[[Loader], Loader]:
    """Register a loader; ``offline`` says whether it runs without network (registry packages)."""

    def wrap(fn: Loader) -> Loader:
        DATASETS[name] = (fn, kind, offline)
        return fn

    return wrap


def subsample(split: Split, n: int | None, rng: np.random.Generator) -> Split:
    if n is None or n >= len(split):
        return split
    idx, _ = stratified_split(split.labels, n, rng)
    return split.subset(np.sort(idx))


def stratified_split(
    labels: np.ndarray, n_first: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified ``n_first`` / rest split (class shares kept, remainders by rank)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_first / len(labels)
    take = np.floor(exact).astype(int)
    remainder = n_first - take.sum()
    take[np.argsort(-(exact - take), kind="stable")[:remainder]] += 1
    first, rest = [], []
    for c, k in zip(classes, take):
        idx = rng.permutation(np.flatnonzero(labels == c))
        first.append(idx[:k])
        rest.append(idx[k:])
    return np.concatenate(first), np.concatenate(rest)
