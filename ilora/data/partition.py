"""Client partitions through flwr-datasets' partitioners, keyed by a hash the results record carries."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from ilora.errors import ConfigError

SCHEMES = ("dirichlet", "iid", "pathological")


@dataclass(frozen=True)
class PartitionSpec:
    scheme: str = "dirichlet"
    num_clients: int = 3
    dirichlet_alpha: float = 0.5
    min_partition_size: int = 10
    classes_per_client: int = 2
    seed: int = 0

    def key(self, dataset: str, split: str, labels: np.ndarray) -> str:
        """Hash of (dataset, split, scheme, parameters, seed, the labels themselves)."""
        blob = json.dumps({"dataset": dataset, "split": split, **asdict(self)}, sort_keys=True).encode()
        h = hashlib.sha256(blob)
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def partition(labels: np.ndarray, spec: PartitionSpec) -> list[np.ndarray]:
    """Indices of each client's examples (sorted), by the scheme in ``spec``."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if spec.num_clients > len(labels):
        raise ConfigError(f"partition: {spec.num_clients} clients but only {len(labels)} training examples: a client "
                          "would get no training example (lower num_clients or raise max_train_samples)")
    if spec.scheme == "dirichlet" and spec.min_partition_size * spec.num_clients > len(labels):
        raise ConfigError(f"min_partition_size {spec.min_partition_size} x {spec.num_clients} clients needs "
                          f"{spec.min_partition_size * spec.num_clients} training examples, the data has {len(labels)} "
                          "(lower min_partition_size or raise max_train_samples)")
    if spec.scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=spec.num_clients,
            partition_by="label",
            alpha=spec.dirichlet_alpha,
            min_partition_size=spec.min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=spec.seed,
        )
    elif spec.scheme == "iid":
        partitioner = IidPartitioner(num_partitions=spec.num_clients)
    elif spec.scheme == "pathological":
        partitioner = PathologicalPartitioner(
            num_partitions=spec.num_clients,
            partition_by="label",
            num_classes_per_partition=spec.classes_per_client,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=spec.seed,
        )
    else:
        raise ConfigError(f"unknown partition {spec.scheme!r} (valid: {', '.join(SCHEMES)})")
    index = Dataset.from_dict({"label": labels.astype(np.int64), "index": np.arange(len(labels))})
    if spec.scheme == "iid":  # IidPartitioner does not shuffle: do it here, seeded
        index = index.shuffle(seed=spec.seed).flatten_indices()
    partitioner.dataset = index
    try:
        with warnings.catch_warnings():  # redrawing until every client holds min_partition_size is the intent
            warnings.filterwarnings("ignore", message="The specified min_partition_size", category=UserWarning)
            parts = [np.sort(np.asarray(partitioner.load_partition(i)["index"])) for i in range(spec.num_clients)]
    except ValueError as exc:  # e.g. min_partition_size cannot be met
        if "attempts" in str(exc):
            raise ConfigError(f"partition: no Dirichlet draw (alpha {spec.dirichlet_alpha}) gave each of the "
                              f"{spec.num_clients} clients min_partition_size={spec.min_partition_size} of the "
                              f"{len(labels)} examples (lower min_partition_size, or raise dirichlet_alpha or "
                              "max_train_samples)") from None
        raise ConfigError(f"partition: {exc}") from None
    empty = [i for i, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise ConfigError(f"partition: client(s) {', '.join(map(str, empty))} of {spec.num_clients} get no training "
                          f"example ({spec.scheme} over {len(labels)} examples; lower num_clients, raise "
                          "max_train_samples, or use a partition that gives every client data)")
    return parts


def cached_partition(
    labels: np.ndarray, spec: PartitionSpec, dataset: str, split: str = "train"
) -> list[np.ndarray]:
    """``partition(labels, spec)``, stored under ``<cache>/partitions/<spec.key(...)>.npz`` and reused."""
    from ilora.data.cache import load_partition_cache, save_partition_cache

    key = spec.key(dataset, split, labels)
    parts = load_partition_cache(key, spec.num_clients, len(labels))
    if parts is None:
        parts = partition(labels, spec)
        save_partition_cache(key, parts)
    return parts
