"""Dataset loaders: the paper's (on hub-format fixtures), the offline ones, their errors, the caches."""

from __future__ import annotations

import gzip
import re
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ilora.cli import main
from ilora.data import DataOptions, Split, available_datasets, load_dataset
from ilora.data.hub import HUB_SOURCES, load_hub
from ilora.errors import DataUnavailable

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty Hugging Face and ilora caches under ``tmp_path``, offline mode on."""
    import datasets
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf_hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("ILORA_CACHE", str(tmp_path / "ilora_cache"))
    return tmp_path


# ----------------------------------------------------------------------------- hub-format fixtures


def _image(rng: np.random.Generator, size: int, gray: bool = False) -> Any:
    from PIL import Image

    if gray:
        return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L")
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mode="RGB")


def hub_fixture(name: str, seed: int = 0) -> tuple[Any, dict[str, dict[str, list[Any]]]]:
    """A tiny ``DatasetDict`` with the hub dataset's real split names, columns and features."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

    rng = np.random.default_rng(seed)
    s = Value("string")

    def labels(n: int, k: int) -> list[int]:
        return [i % k for i in range(n)]

    def images(n: int, size: int, gray_every: int = 0) -> list[Any]:
        return [_image(rng, size, gray=bool(gray_every) and i % gray_every == 1) for i in range(n)]

    splits: dict[str, dict[str, list[Any]]]
    if name == "cifar10":
        features = Features({"img": Image(), "label": ClassLabel(names=CIFAR10)})
        splits = {sp: {"img": images(n, 32), "label": labels(n, 10)}
                  for sp, n in (("train", 20), ("test", 10))}
    elif name == "cifar100":
        features = Features({"img": Image(), "fine_label": ClassLabel(names=[f"fine{i}" for i in range(100)]),
                             "coarse_label": ClassLabel(names=[f"coarse{i}" for i in range(20)])})
        splits = {sp: {"img": images(n, 32), "fine_label": [(7 * i) % 100 for i in range(n)],
                       "coarse_label": labels(n, 20)} for sp, n in (("train", 12), ("test", 6))}
    elif name == "tiny_imagenet":  # a few grayscale images, as in the real data
        features = Features({"image": Image(), "label": ClassLabel(names=[f"n{i:08d}" for i in range(200)])})
        splits = {sp: {"image": images(n, 64, gray_every=4), "label": [(13 * i) % 200 for i in range(n)]}
                  for sp, n in (("train", 9), ("valid", 5))}
    elif name in ("qqp", "qnli", "sst2"):
        cols = {"qqp": ("question1", "question2"), "qnli": ("question", "sentence"),
                "sst2": ("sentence",)}[name]
        names = {"qqp": ["not_duplicate", "duplicate"], "qnli": ["entailment", "not_entailment"],
                 "sst2": ["negative", "positive"]}[name]
        features = Features({**{c: s for c in cols}, "label": ClassLabel(names=names), "idx": Value("int32")})
        splits = {}
        for sp, n in (("train", 10), ("validation", 6), ("test", 5)):  # GLUE test labels are hidden (-1)
            lab = [-1] * n if sp == "test" else labels(n, 2)
            splits[sp] = {**{c: [f"{sp} {c} {i} words" for i in range(n)] for c in cols}, "label": lab,
                          "idx": list(range(n))}
    elif name in ("imdb", "ag_news"):
        names = ["neg", "pos"] if name == "imdb" else ["World", "Sports", "Business", "Sci/Tech"]
        features = Features({"text": s, "label": ClassLabel(names=names)})
        sizes = (("train", 8), ("test", 8)) + ((("unsupervised", 3),) if name == "imdb" else ())
        splits = {sp: {"text": [f"{sp} review {i} <br />" for i in range(n)],
                       "label": [-1] * n if sp == "unsupervised" else labels(n, len(names))}
                  for sp, n in sizes}
    elif name == "dbpedia14":
        names = [f"class{i}" for i in range(14)]
        features = Features({"label": ClassLabel(names=names), "title": s, "content": s})
        splits = {sp: {"label": labels(n, 14), "title": [f"Title {i}" for i in range(n)],
                       "content": [f" Content of {sp} {i}. " for i in range(n)]}
                  for sp, n in (("train", 42), ("test", 28))}
    elif name == "yahoo_answers":
        names = [f"topic{i}" for i in range(10)]
        features = Features({"id": Value("int32"), "topic": ClassLabel(names=names),
                             "question_title": s, "question_content": s, "best_answer": s})
        splits = {sp: {"id": list(range(n)), "topic": labels(n, 10),
                       "question_title": [f"why {i}?" for i in range(n)],
                       "question_content": ["" if i % 3 == 0 else f"details {i}" for i in range(n)],
                       "best_answer": [f"because {i}" for i in range(n)]}
                  for sp, n in (("train", 30), ("test", 20))}
    else:
        raise KeyError(name)
    dd = DatasetDict({sp: Dataset.from_dict(cols, features=features) for sp, cols in splits.items()})
    return dd, splits


def write_fixture(name: str, root: Path, layout: str) -> Path:
    """Write ``name``'s fixture as ``save_to_disk`` output or as a hub repository (parquet + README)."""
    dd, _ = hub_fixture(name)
    path = root / f"{name}-{layout}"
    if layout == "disk":
        dd.save_to_disk(str(path))
        return path
    source = HUB_SOURCES[name]
    config = source.config or "default"
    folder = source.config or "data"
    lines = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
    for split, ds in dd.items():
        (path / folder).mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(path / folder / f"{split}-00000-of-00001.parquet"))
        lines += [f"  - split: {split}", f"    path: {folder}/{split}-*"]
    (path / "README.md").write_text("\n".join([*lines, "---", f"# {name} fixture", ""]))
    return path


def _rgb(img: Any) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("layout", ["disk", "parquet"])
@pytest.mark.parametrize("name", sorted(HUB_SOURCES))
def test_paper_loader_reads_hub_format(name: str, layout: str, tmp_path: Path):
    source = HUB_SOURCES[name]
    path = write_fixture(name, tmp_path, layout)
    _, raw = hub_fixture(name)
    data = load_dataset(name, DataOptions(data_dir=str(path)))
    assert data.kind == source.kind == available_datasets()[name][0]
    assert available_datasets()[name][1] is False  # needs the hub cache (or data_dir)
    train_raw, test_raw = raw[source.train], raw[source.test]
    assert len(data.train) == len(train_raw[source.label]) and len(data.test) == len(test_raw[source.label])
    np.testing.assert_array_equal(data.train.labels, train_raw[source.label])
    np.testing.assert_array_equal(data.test.labels, test_raw[source.label])  # GLUE: validation, labelled
    assert data.test.labels.min() >= 0 and data.train.labels.dtype == np.int64
    expected_classes = {"cifar10": 10, "cifar100": 100, "tiny_imagenet": 200, "qqp": 2, "qnli": 2, "sst2": 2,
                        "imdb": 2, "ag_news": 4, "dbpedia14": 14, "yahoo_answers": 10}
    assert data.num_classes == expected_classes[name]
    if source.kind == "image":
        col = source.columns[0]
        x = data.train.inputs
        assert isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4 and x.shape[-1] == 3
        np.testing.assert_array_equal(x, np.stack([_rgb(im) for im in train_raw[col]]))
        np.testing.assert_array_equal(data.test.inputs, np.stack([_rgb(im) for im in test_raw[col]]))
        if name == "cifar10":
            assert data.class_names == CIFAR10 and x.shape[1:] == (32, 32, 3)
        if name == "tiny_imagenet":  # grayscale images come back as three equal channels
            gray = x[1]
            assert x.shape[1:] == (64, 64, 3) and (gray[..., 0] == gray[..., 2]).all()
        return
    text = data.train.inputs
    assert isinstance(text, list) and len(text) == len(data.train)
    if name in ("qqp", "qnli"):
        a, b = source.columns
        assert text == list(zip(train_raw[a], train_raw[b]))
        assert data.test.inputs[0] == (f"validation {a} 0 words", f"validation {b} 0 words")
    elif name == "dbpedia14":
        assert text[1] == "Title 1 Content of train 1."  # title and content joined by a space, as the authors
    elif name == "yahoo_answers":
        assert text[0] == "why 0? because 0" and text[1] == "why 1? details 1 because 1"
    else:
        assert text == train_raw[source.columns[0]]
    if name == "ag_news":
        assert data.class_names == ["World", "Sports", "Business", "Sci/Tech"]


@pytest.mark.parametrize("name, sizes", [("dbpedia14", (50_000, 10_000)),
                                         ("yahoo_answers", (100_000, 10_000))])
def test_large_text_sets_are_stratified_subsamples(name: str, sizes: tuple[int, int], tmp_path: Path):
    assert (HUB_SOURCES[name].train_size, HUB_SOURCES[name].test_size) == sizes
    path = write_fixture(name, tmp_path, "disk")
    k = 14 if name == "dbpedia14" else 10
    source = replace(HUB_SOURCES[name], train_size=2 * k, test_size=k)  # the same code path, fixture-sized
    a = load_hub(name, source, DataOptions(split_seed=0, data_dir=str(path)))
    b = load_hub(name, source, DataOptions(split_seed=0, data_dir=str(path)))
    c = load_hub(name, source, DataOptions(split_seed=1, data_dir=str(path)))
    assert len(a.train) == 2 * k and len(a.test) == k
    assert np.bincount(a.train.labels).tolist() == [2] * k and np.bincount(a.test.labels).tolist() == [1] * k
    assert a.train.inputs == b.train.inputs and a.train.inputs != c.train.inputs


def test_max_samples_subsample_before_decoding(tmp_path: Path):
    path = write_fixture("cifar10", tmp_path, "disk")
    data = load_dataset("cifar10", DataOptions(max_train_samples=10, max_test_samples=5, data_dir=str(path)))
    assert len(data.train) == 10 and len(data.test) == 5 and data.train.inputs.shape == (10, 32, 32, 3)
    assert np.bincount(data.train.labels).tolist() == [1] * 10


def test_missing_paper_dataset_says_where_and_how(capsys):
    with pytest.raises(DataUnavailable) as err:
        load_dataset("cifar100")
    msg = str(err.value)
    assert "\n" not in msg and "'cifar100'" in msg and "uoft-cs/cifar100" in msg
    assert "hf_datasets" in msg  # where it looked: the (here isolated) Hugging Face cache
    assert "ilora data prepare cifar100" in msg
    # through the CLI: one line, exit code 2, no traceback
    assert main(["run", "preset=smoke", "dataset=sst2", "model=minilm", "out_dir=/nonexistent"]) == 2
    err_out = capsys.readouterr().err
    assert err_out.startswith("error: dataset 'sst2'") and "ilora data prepare sst2" in err_out
    assert "Traceback" not in err_out and err_out.count("\n") == 1


def legacy_cache(name: str, legacy: str, root: Path) -> None:
    """Cache ``name``'s fixture the way ``load_dataset(legacy, config)`` did: under ``<datasets cache>/<legacy>/``."""
    import datasets

    folder = write_fixture(name, root, "parquet").rename(root / legacy)
    datasets.load_dataset(str(folder), HUB_SOURCES[name].config)  # a local copy named like the legacy id
    assert (Path(datasets.config.HF_DATASETS_CACHE) / legacy).is_dir()


@pytest.mark.parametrize("name, legacy", [("qqp", "glue"), ("dbpedia14", "dbpedia_14"), ("cifar10", "cifar10")])
def test_dataset_cached_under_its_legacy_id_is_found(name: str, legacy: str, isolated_caches: Path, capsys):
    legacy_cache(name, legacy, isolated_caches / "src")
    _, raw = hub_fixture(name)
    source = HUB_SOURCES[name]
    data = load_dataset(name)  # offline: nothing under the current id
    np.testing.assert_array_equal(data.train.labels, raw[source.train][source.label])
    assert len(data.test) == len(raw[source.test][source.label])
    assert f"under its legacy id {legacy!r}" in capsys.readouterr().err
    assert source.legacy == legacy


def test_missing_dataset_names_both_ids(isolated_caches: Path):
    legacy_cache("sst2", "glue", isolated_caches / "src")  # glue is cached, but only its sst2 config
    with pytest.raises(DataUnavailable) as err:
        load_dataset("qqp")
    msg = str(err.value)
    assert "\n" not in msg and "'nyu-mll/glue' config 'qqp'" in msg and "legacy id 'glue'" in msg
    assert "Available configs" not in msg and "ilora data prepare qqp" in msg
    with pytest.raises(DataUnavailable, match="'stanfordnlp/imdb' config 'plain_text' and under its legacy id 'imdb'"):
        load_dataset("imdb")  # nothing under either id


def test_missing_data_dir_and_offline_prepare(tmp_path: Path, capsys):
    pattern = r"no such directory.*data_dir .*nowhere.*ilora data prepare qqp"
    with pytest.raises(DataUnavailable, match=pattern):
        load_dataset("qqp", DataOptions(data_dir=str(tmp_path / "nowhere")))
    assert main(["data", "prepare", "imdb"]) == 2
    err = capsys.readouterr().err
    assert "could not download dataset 'imdb'" in err and "stanfordnlp/imdb" in err and "OFFLINE" in err
    assert main(["data", "prepare", "no_such_set"]) == 2


# ----------------------------------------------------------------------------- offline datasets


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_reads_idx_files(tmp_path: Path):
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    x_te = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    y_tr, y_te = np.arange(12) % 10, np.arange(4)
    for stem, arr in (("train-images-idx3-ubyte", x_tr), ("train-labels-idx1-ubyte", y_tr),
                      ("t10k-images-idx3-ubyte", x_te), ("t10k-labels-idx1-ubyte", y_te)):
        _write_idx(tmp_path / f"{stem}.gz", arr)
    data = load_dataset("fashion_mnist", DataOptions(data_dir=str(tmp_path)))
    np.testing.assert_array_equal(data.train.inputs, x_tr)
    np.testing.assert_array_equal(data.test.labels, y_te)
    assert data.class_names[0] == "T-shirt/top" and data.num_classes == 10
    truncated = b"\x00\x00\x08\x01\x00\x00\x00\x09abc"  # says 9 labels, holds 3
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(truncated))
    with pytest.raises(DataUnavailable, match="truncated"):
        load_dataset("fashion_mnist", DataOptions(data_dir=str(tmp_path)))


def test_fashion_mnist_falls_back_to_the_hub_with_a_clear_message(tmp_path: Path):
    with pytest.raises(DataUnavailable) as err:
        load_dataset("fashion_mnist", DataOptions(data_dir=str(tmp_path)))  # no IDX files, hub offline
    msg = str(err.value)
    assert "ilora data prepare fashion_mnist" in msg and "dataset-fashion-mnist" in msg and "\n" not in msg


def test_fashion_mnist_hub_format_keeps_grayscale(tmp_path: Path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    from ilora.data.offline import FASHION_MNIST_CLASSES

    rng = np.random.default_rng(1)
    features = Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_CLASSES)})
    arrays = {sp: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for sp, n in (("train", 6), ("test", 3))}
    dd = DatasetDict({sp: Dataset.from_dict({"image": [_gray(a) for a in x], "label": list(range(len(x)))},
                                            features=features) for sp, x in arrays.items()})
    dd.save_to_disk(str(tmp_path / "fm"))
    data = load_dataset("fashion_mnist", DataOptions(data_dir=str(tmp_path / "fm")))  # no IDX files there
    np.testing.assert_array_equal(data.train.inputs, arrays["train"])  # N x 28 x 28, as from the IDX files
    assert data.class_names == FASHION_MNIST_CLASSES and data.test.labels.tolist() == [0, 1, 2]


def _gray(a: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(a, mode="L")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_package():
    data = load_dataset("fashion_mnist", DataOptions(max_test_samples=500))
    assert len(data.train) == 60_000 and len(data.test) == 500 and data.train.inputs.shape[1:] == (28, 28)
    assert np.bincount(data.train.labels).tolist() == [6000] * 10


@pytest.mark.parametrize(
    "name, kind, sizes, classes",
    [
        ("bbc_news", "text", (1780, 445), 5),
        ("tweets", "text", (30527, 7631), 3),
        ("mnist5k", "image", (4000, 1000), 10),
        ("digits", "image", (1438, 359), 10),
    ],
)
def test_offline_datasets(name: str, kind: str, sizes: tuple[int, int], classes: int):
    assert available_datasets()[name] == (kind, True)
    data = load_dataset(name)
    assert (len(data.train), len(data.test)) == sizes and data.num_classes == classes
    # a stratified test split fixed by split_seed: every class in both, proportions kept
    share = np.bincount(data.test.labels) / np.bincount(data.train.labels)
    assert np.allclose(share, 0.25, atol=0.02)
    again, other = load_dataset(name), load_dataset(name, DataOptions(split_seed=1))
    np.testing.assert_array_equal(data.test.labels, again.test.labels)
    if kind == "text":
        assert data.test.inputs == again.test.inputs and data.test.inputs != other.test.inputs
        assert all(isinstance(t, str) and t for t in data.train.inputs[:50])
    else:
        x = data.train.inputs
        assert x.dtype == np.uint8 and x.ndim == 3 and x.max() == 255  # grayscale kept as N x H x W
        assert not np.array_equal(data.test.inputs, other.test.inputs)
    if name == "tweets":
        assert data.class_names == ["negative", "neutral", "positive"]


def test_subsampling_is_stratified_and_seeded():
    data = load_dataset("digits", DataOptions(max_train_samples=200, max_test_samples=50))
    assert len(data.train) == 200 and len(data.test) == 50
    assert set(np.bincount(data.train.labels).tolist()) <= {19, 20, 21}


# ----------------------------------------------------------------------------- preprocessing cache


def _counting_encoder() -> tuple[Any, list[int]]:
    calls: list[int] = []

    def encode(split: Split) -> dict[str, torch.Tensor]:
        calls.append(len(split))
        rows = [np.frombuffer(t.encode().ljust(8)[:8], dtype=np.uint8) for t in split.inputs]
        x = torch.as_tensor(np.stack(rows))
        return {"input_ids": x.long(), "labels": torch.as_tensor(split.labels)}

    return encode, calls


def test_preprocessing_cache_hits_on_second_call(isolated_caches: Path, monkeypatch: pytest.MonkeyPatch):
    from ilora.data.cache import cached_encode, encode_cache_path

    split = Split(["alpha", "beta", "gamma"], np.array([0, 1, 0]))
    key = {"dataset": "toy", "split": "train", "model": "m", "max_length": 8, "image_size": None,
           "split_seed": 0, "max_train_samples": None, "max_test_samples": None}
    encode, calls = _counting_encoder()
    first = cached_encode(encode, split, key)
    path = encode_cache_path(encode, split, key)
    assert calls == [3] and path is not None and path.exists() and path.suffix == ".safetensors"
    assert path.is_relative_to(isolated_caches / "ilora_cache")
    second = cached_encode(encode, split, key)
    assert calls == [3]  # served from the cache
    assert second.keys() == first.keys() and all(torch.equal(first[k], second[k]) for k in first)
    cached_encode(encode, split, {**key, "max_length": 16})  # another key: encoded again
    assert calls == [3, 3]
    path.write_bytes(b"garbage")  # an unreadable file is recomputed and replaced
    assert torch.equal(cached_encode(encode, split, key)["input_ids"], first["input_ids"]) and len(calls) == 3
    cached_encode(encode, split, key)
    assert len(calls) == 3
    monkeypatch.setenv("ILORA_CACHE", "off")
    cached_encode(encode, split, key)
    assert len(calls) == 4


def test_preprocessing_key_follows_the_loaders_code():
    """Editing how a loader builds its inputs (e.g. DBpedia's title/content join) must not reuse old encodings."""
    import hashlib
    from types import SimpleNamespace

    import ilora.data.hub as hub_module
    from ilora.data.cache import preprocessing_key

    available_datasets()  # the built-in loaders are registered
    fields = dict(max_train_samples=None, max_test_samples=None, split_seed=0, data_dir=None, model="m",
                  max_length=8, image_size=None)
    key = preprocessing_key(SimpleNamespace(dataset="dbpedia14", **fields), "train")
    assert key["loader"] == hashlib.sha256(Path(hub_module.__file__).read_bytes()).hexdigest()[:16]
    assert preprocessing_key(SimpleNamespace(dataset="digits", **fields), "train")["loader"] != key["loader"]


@pytest.mark.slow
def test_runner_setup_reuses_cached_encoding(isolated_caches: Path, monkeypatch: pytest.MonkeyPatch):
    import ilora.data.partition as partition_module
    import ilora.runner as runner_module
    from ilora.config import resolve_config

    calls: list[str] = []
    real_build, real_partition = runner_module.build_model, partition_module.partition

    def counting_build(*args: Any, **kwargs: Any) -> Any:
        backbone = real_build(*args, **kwargs)
        encode = backbone.encode

        def counted(split: Split) -> dict[str, torch.Tensor]:
            calls.append("encode")
            return encode(split)

        backbone.encode = counted
        return backbone

    def counting_partition(*args: Any, **kwargs: Any) -> list[np.ndarray]:
        calls.append("partition")
        return real_partition(*args, **kwargs)

    monkeypatch.setattr(runner_module, "build_model", counting_build)
    monkeypatch.setattr(partition_module, "partition", counting_partition)
    cfg = resolve_config(["preset=smoke", "max_train_samples=60", "max_test_samples=20",
                          "min_partition_size=2"])
    sim_a, facts_a = runner_module.setup(cfg)
    assert calls == ["partition", "encode", "encode"]
    files = sorted((isolated_caches / "ilora_cache").rglob("*.*"))
    assert [f.parent.name for f in files].count("preprocessed") == 2
    assert (isolated_caches / "ilora_cache" / "partitions" / f"{facts_a['partition_hash']}.npz") in files
    sim_b, facts_b = runner_module.setup(cfg)
    assert calls == ["partition", "encode", "encode"]  # the second setup recomputed nothing
    assert facts_a["partition_hash"] == facts_b["partition_hash"]
    assert facts_a["client_sizes"] == facts_b["client_sizes"]
    for a, b in zip(sim_a.client_data + [sim_a.test_data], sim_b.client_data + [sim_b.test_data]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_data_show_prints_sizes_and_saves_heatmap(tmp_path: Path, capsys):
    out = tmp_path / "heat.png"
    args = ["data", "show", "digits", "num_clients=4", "dirichlet_alpha=0.1", "min_partition_size=5",
            "seed=3"]
    assert main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hash_ = re.search(r"partition hash ([0-9a-f]{16})", text).group(1)  # type: ignore[union-attr]
    rows = [line.split() for line in text.splitlines() if re.match(r"^\s+\d+\s+\d+", line)]
    assert len(rows) == 4 and sum(int(r[1]) for r in rows) == 1438
    assert all(sum(map(int, r[4:])) == int(r[1]) for r in rows)  # per-class counts add up to the size
    assert main([*args, "--out", str(out)]) == 0  # the same partition again, from the cache
    assert hash_ in capsys.readouterr().out
    assert (tmp_path / "ilora_cache" / "partitions" / f"{hash_}.npz").exists()
    assert main(["data", "show", "digits", "partition=nope"]) == 2
