"""Client partitions: coverage, determinism by seed, label skew, and the on-disk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ilora.data.partition as partition_module
from ilora.data.partition import PartitionSpec, cached_partition, partition
from ilora.errors import ConfigError


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ILORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def labels() -> np.ndarray:
    """1,000 examples of 10 balanced classes, shuffled."""
    return np.random.default_rng(0).permutation(np.repeat(np.arange(10), 100))


def _histograms(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.bincount(labels[p], minlength=10) for p in parts])


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_clients_cover_the_split_exactly_once(labels: np.ndarray, scheme: str):
    parts = partition(labels, PartitionSpec(scheme, num_clients=5, dirichlet_alpha=0.5, seed=1))
    assert len(parts) == 5 and sum(len(p) for p in parts) == len(labels)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert all(len(p) >= 10 for p in parts)  # min_partition_size
    if scheme == "iid":
        assert [len(p) for p in parts] == [200] * 5


@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used")
def test_pathological_gives_each_client_its_classes(labels: np.ndarray):
    parts = partition(labels, PartitionSpec("pathological", num_clients=5, classes_per_client=2, seed=0))
    assert sum(len(p) for p in parts) == len(np.unique(np.concatenate(parts))) <= len(labels)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used")
@pytest.mark.parametrize("scheme", ["dirichlet", "iid", "pathological"])
def test_same_seed_same_partition_other_seed_other_partition(labels: np.ndarray, scheme: str):
    spec = PartitionSpec(scheme, num_clients=4, dirichlet_alpha=0.5, seed=7)
    a, b = partition(labels, spec), partition(labels, spec)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = partition(labels, PartitionSpec(scheme, num_clients=4, dirichlet_alpha=0.5, seed=8))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


def test_small_alpha_gives_skewed_label_histograms(labels: np.ndarray):
    def top_share(spec: PartitionSpec) -> float:
        h = _histograms(labels, partition(labels, spec))
        return float(np.mean(h.max(1) / h.sum(1)))

    skewed = top_share(PartitionSpec("dirichlet", 5, dirichlet_alpha=0.05, min_partition_size=5, seed=0))
    mild = top_share(PartitionSpec("dirichlet", num_clients=5, dirichlet_alpha=100.0, seed=0))
    iid = top_share(PartitionSpec("iid", num_clients=5, seed=0))
    assert iid < 0.16 and mild < 0.2  # balanced: about 1/10 of each client is its largest class
    assert skewed > 0.4  # one class dominates each client's histogram
    h = _histograms(labels, partition(labels, PartitionSpec("dirichlet", 5, 0.05, 5, seed=0)))
    assert (h == 0).sum() >= 15  # many (client, class) cells are empty


def test_partition_key_tracks_everything_that_changes_it(labels: np.ndarray):
    spec = PartitionSpec("dirichlet", 3, 0.5, seed=1)
    key = spec.key("ds", "train", labels)
    assert key == PartitionSpec("dirichlet", 3, 0.5, seed=1).key("ds", "train", labels.copy())
    others = {
        PartitionSpec("dirichlet", 3, 0.5, seed=2).key("ds", "train", labels),
        PartitionSpec("dirichlet", 3, 0.3, seed=1).key("ds", "train", labels),
        PartitionSpec("dirichlet", 4, 0.5, seed=1).key("ds", "train", labels),
        PartitionSpec("iid", 3, 0.5, seed=1).key("ds", "train", labels),
        spec.key("other", "train", labels),
        spec.key("ds", "test", labels),
        spec.key("ds", "train", labels[::-1]),
    }
    assert key not in others and len(others) == 7


def test_cached_partition_writes_once_and_reuses(labels: np.ndarray, cache_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch):
    spec = PartitionSpec("dirichlet", 4, 0.3, seed=5)
    first = cached_partition(labels, spec, "toy")
    path = cache_dir / "partitions" / f"{spec.key('toy', 'train', labels)}.npz"
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    assert all(np.array_equal(x, y) for x, y in zip(first, partition(labels, spec)))

    calls: list[int] = []
    real = partition_module.partition

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(partition_module, "partition", counting)
    again = cached_partition(labels, spec, "toy")
    assert calls == [] and all(np.array_equal(x, y) for x, y in zip(first, again))
    path.write_bytes(b"not an npz")  # a damaged file is recomputed and rewritten
    again = cached_partition(labels, spec, "toy")
    assert calls == [1] and all(np.array_equal(x, y) for x, y in zip(first, again))
    cached_partition(labels, spec, "toy")
    assert calls == [1]
    cached_partition(labels, PartitionSpec("dirichlet", 4, 0.3, seed=6), "toy")  # another seed: computed
    assert calls == [1, 1] and len(list(path.parent.glob("*.npz"))) == 2


def test_cache_can_be_switched_off(labels: np.ndarray, cache_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ILORA_CACHE", "off")
    cached_partition(labels, PartitionSpec("iid", 2, seed=0), "toy")
    assert not cache_dir.exists()


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_unknown_scheme_and_unmeetable_minimum_are_config_errors(labels: np.ndarray):
    with pytest.raises(ConfigError, match="unknown partition 'nope'.*dirichlet, iid, pathological"):
        partition(labels, PartitionSpec("nope"))
    with pytest.raises(ConfigError, match="partition"):
        partition(labels[:30], PartitionSpec("dirichlet", 5, dirichlet_alpha=0.01, min_partition_size=10))
