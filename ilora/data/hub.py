"""The paper's datasets through Hugging Face ``datasets``: its cache, its offline mode, or a local copy.

Where a loader looks, in order:

- ``data_dir`` (config key, ``DataOptions.data_dir``) when set: either a directory written by
  ``DatasetDict.save_to_disk`` (what ``ilora data prepare NAME --data-dir DIR`` writes), or a local
  copy of the hub repository (parquet files plus its ``README.md`` that declares configs and features).
- otherwise ``datasets.load_dataset(repo, config)``: the Hugging Face cache (``HF_HOME`` /
  ``HF_DATASETS_CACHE``), downloading on a connected machine unless ``HF_HUB_OFFLINE`` /
  ``HF_DATASETS_OFFLINE`` is set; then, when that fails, the cache under the dataset's legacy id (the
  name before the hub moved it into an organisation: ``load_dataset("glue", "qqp")`` caches under
  ``glue/``, ``nyu-mll/glue`` under ``nyu-mll___glue/``).

If neither has the data, ``DataUnavailable`` says which dataset, where it looked, and how to fetch it.

Conventions of the returned ``Split.inputs``:

- images: ``uint8`` arrays ``N x H x W x 3`` (RGB; grayscale sources are converted), at the source's
  own resolution; resizing is the backbone's job.
- text: ``list[str]``; sentence-pair tasks (QQP, QNLI) give ``(first, second)`` tuples instead. A
  Hugging Face tokenizer called on a list of such tuples encodes them as pairs with its own separator
  (``[SEP]`` for BERT/MiniLM, ``</s></s>`` for RoBERTa), so ``tokenize_fn`` needs no change.
- DBpedia-14 and Yahoo Answers are stratified subsamples (50k/10k and 100k/10k) fixed by ``split_seed``;
  DBpedia's text is ``title content`` and Yahoo's ``title content best_answer``, joined by spaces (as the
  authors' script joins them).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ilora.data.base import DataOptions, RawDataset, Split, register_dataset, stratified_split
from ilora.errors import DataUnavailable

TextFn = Callable[[dict[str, list[Any]]], list[Any]]


@dataclass(frozen=True)
class HubSource:
    """Where a paper dataset lives on the hub and how to read its columns."""

    repo: str
    config: str | None
    kind: str  # "text" | "image"
    train: str
    test: str  # the split used as test set (GLUE and Tiny-ImageNet: their validation split)
    label: str
    columns: tuple[str, ...]  # input columns: one image column, or the text columns
    text: TextFn | None = None  # text columns (a batch dict) -> inputs; None: the single column as is
    train_size: int | None = None  # stratified subsample of the train split (split_seed)
    test_size: int | None = None
    rgb: bool = True  # images: convert to RGB (False keeps grayscale N x H x W)
    legacy: str | None = None  # the id before the hub moved it into an organisation (its cache folder differs)


def _pairs(a: str, b: str) -> TextFn:
    return lambda batch: list(zip(batch[a], batch[b]))


def _dbpedia(batch: dict[str, list[Any]]) -> list[str]:
    return [" ".join(p.strip() for p in row if p and p.strip()) for row in zip(batch["title"], batch["content"])]


def _yahoo(batch: dict[str, list[Any]]) -> list[str]:
    parts = zip(batch["question_title"], batch["question_content"], batch["best_answer"])
    return [" ".join(p.strip() for p in row if p and p.strip()) for row in parts]


HUB_SOURCES: dict[str, HubSource] = {
    "cifar10": HubSource("uoft-cs/cifar10", "plain_text", "image", "train", "test", "label", ("img",),
                         legacy="cifar10"),
    "cifar100": HubSource("uoft-cs/cifar100", "cifar100", "image", "train", "test", "fine_label", ("img",),
                          legacy="cifar100"),
    "tiny_imagenet": HubSource("zh-plus/tiny-imagenet", None, "image", "train", "valid", "label", ("image",)),
    "qqp": HubSource("nyu-mll/glue", "qqp", "text", "train", "validation", "label",
                     ("question1", "question2"), _pairs("question1", "question2"), legacy="glue"),
    "qnli": HubSource("nyu-mll/glue", "qnli", "text", "train", "validation", "label",
                      ("question", "sentence"), _pairs("question", "sentence"), legacy="glue"),
    "sst2": HubSource("nyu-mll/glue", "sst2", "text", "train", "validation", "label", ("sentence",),
                      legacy="glue"),
    "imdb": HubSource("stanfordnlp/imdb", "plain_text", "text", "train", "test", "label", ("text",), legacy="imdb"),
    "ag_news": HubSource("fancyzhx/ag_news", None, "text", "train", "test", "label", ("text",), legacy="ag_news"),
    "dbpedia14": HubSource("fancyzhx/dbpedia_14", None, "text", "train", "test", "label",
                           ("title", "content"), _dbpedia, train_size=50_000, test_size=10_000, legacy="dbpedia_14"),
    "yahoo_answers": HubSource(
        "community-datasets/yahoo_answers_topics", "yahoo_answers_topics", "text", "train", "test", "topic",
        ("question_title", "question_content", "best_answer"), _yahoo, train_size=100_000, test_size=10_000,
        legacy="yahoo_answers_topics",
    ),
}
# Fallback of the offline Fashion-MNIST loader when the Debian package is absent (grayscale kept).
FASHION_MNIST = HubSource("zalando-datasets/fashion_mnist", None, "image", "train", "test", "label",
                          ("image",), rgb=False, legacy="fashion_mnist")


def hf_cache_dirs() -> str:
    """The Hugging Face caches ``datasets`` reads, for messages."""
    import datasets

    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # very old huggingface_hub
        HF_HUB_CACHE = "?"
    return f"{datasets.config.HF_DATASETS_CACHE} and {HF_HUB_CACHE}"


def hf_offline() -> bool:
    import datasets

    flag = getattr(datasets.config, "HF_HUB_OFFLINE", False)
    return bool(flag or os.environ.get("HF_DATASETS_OFFLINE") == "1")


def unavailable(name: str, where: str, reason: str = "") -> DataUnavailable:
    why = f" ({reason})" if reason else ""
    return DataUnavailable(
        f"dataset {name!r} is not available here{why}: looked in {where}; fetch it on a connected machine "
        f"with `ilora data prepare {name}` (then copy the Hugging Face cache, or use "
        f"`ilora data prepare {name} --data-dir DIR` and pass data_dir=DIR)"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def open_source(name: str, source: HubSource, data_dir: str | None, download: bool = False) -> Any:
    """The ``DatasetDict`` of ``source``, from ``data_dir`` or the Hugging Face cache/hub."""
    import datasets

    if data_dir:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise unavailable(name, f"data_dir {path}", "no such directory")
        try:
            if (path / "dataset_dict.json").exists():
                return datasets.load_from_disk(str(path))
            config = source.config if (path / "README.md").exists() else None
            return datasets.load_dataset(str(path), config)
        except Exception as exc:  # unreadable or empty local copy
            raise unavailable(name, f"data_dir {path}", _first_line(exc)) from None
    try:
        return datasets.load_dataset(source.repo, source.config)
    except Exception as exc:  # offline without a cached copy, no network, gated or missing repo
        if download:
            raise DataUnavailable(
                f"could not download dataset {name!r} (Hugging Face {source.repo!r}"
                f"{', config ' + repr(source.config) if source.config else ''}): {_first_line(exc)}"
                + ("; HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set: unset it" if hf_offline() else "")
            ) from None
        reason = "offline mode" if hf_offline() else _first_line(exc)
    where = f"the Hugging Face cache ({hf_cache_dirs()}) for {source.repo!r}"
    if source.config:
        where += f" config {source.config!r}"
    if source.legacy and legacy_cache_dir(source.legacy).is_dir():
        try:
            dd = datasets.load_dataset(source.legacy, source.config)
        except Exception as exc:  # cached under the legacy id, but not this config or unreadable
            reason = f"{reason}; under its legacy id {source.legacy!r}: {_first_line(exc)}"
        else:
            print(f"dataset {name!r}: read from the Hugging Face cache under its legacy id {source.legacy!r}",
                  file=sys.stderr)
            return dd
    if source.legacy:
        where += f" and under its legacy id {source.legacy!r}"
    raise unavailable(name, where, reason)


def legacy_cache_dir(legacy: str) -> Path:
    """Where ``datasets`` caches a dataset loaded by its legacy id (e.g. ``glue``)."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE).expanduser() / legacy


def _labels(ds: Any, column: str) -> np.ndarray:
    return np.asarray(ds.with_format("numpy")[column], dtype=np.int64)


def _class_names(ds: Any, column: str, labels: np.ndarray) -> list[str]:
    feature = ds.features[column]
    names = getattr(feature, "names", None)
    if names:
        return [str(n) for n in names]
    return [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []


def _images(ds: Any, column: str, rgb: bool, batch_size: int = 1000) -> np.ndarray:
    """Decode an image column into one ``uint8`` array (``N x H x W x 3``, or ``N x H x W`` grayscale)."""
    out: list[np.ndarray] = []
    for start in range(0, len(ds), batch_size):
        for img in ds[start:start + batch_size][column]:
            img = img.convert("RGB") if rgb else img.convert("L")
            out.append(np.asarray(img, dtype=np.uint8))
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise DataUnavailable(f"images in column {column!r} differ in size {sorted(shapes)[:3]}")
    return np.stack(out) if out else np.zeros((0, 1, 1, 3) if rgb else (0, 1, 1), dtype=np.uint8)


def _texts(ds: Any, source: HubSource) -> list[Any]:
    batch = ds.select_columns(list(source.columns)).to_dict()
    if source.text is not None:
        return source.text(batch)
    return [str(t) for t in batch[source.columns[0]]]


def read_split(name: str, ds: Any, source: HubSource, size: int | None, rng: np.random.Generator) -> Split:
    """One split as a ``Split``: stratified subsample to ``size`` first, then decode only those rows."""
    labels = _labels(ds, source.label)
    if size is not None and size < len(labels):
        idx = np.sort(stratified_split(labels, size, rng)[0])
        ds, labels = ds.select(idx), labels[idx]
    if source.kind == "image":
        return Split(_images(ds, source.columns[0], source.rgb), labels)
    return Split(_texts(ds, source), labels)


def _smallest(*sizes: int | None) -> int | None:
    given = [s for s in sizes if s is not None]
    return min(given) if given else None


def load_hub(name: str, source: HubSource, options: DataOptions) -> RawDataset:
    dd = open_source(name, source, options.data_dir)
    for split in (source.train, source.test):
        if split not in dd:
            where = options.data_dir or source.repo
            raise unavailable(name, where, f"split {split!r} missing, has {sorted(dd)}")
    rng = np.random.default_rng(options.split_seed)
    # max_*_samples applied here too, before decoding: a small run of a large set decodes only its rows
    train_size = _smallest(source.train_size, options.max_train_samples)
    test_size = _smallest(source.test_size, options.max_test_samples)
    train = read_split(name, dd[source.train], source, train_size, rng)
    test = read_split(name, dd[source.test], source, test_size, rng)
    classes = _class_names(dd[source.train], source.label, train.labels)
    return RawDataset(name, source.kind, train, test, classes)  # type: ignore[arg-type]


def prepare(name: str, source: HubSource, data_dir: str | None = None) -> None:
    """Download ``source`` into the Hugging Face cache; with ``data_dir``, also save its splits there."""
    dd = open_source(name, source, None, download=True)
    if data_dir:
        import datasets

        keep = datasets.DatasetDict({s: dd[s] for s in (source.train, source.test)})
        keep.save_to_disk(str(Path(data_dir).expanduser()))


def _register(name: str, source: HubSource) -> None:
    def loader(options: DataOptions) -> RawDataset:
        return load_hub(name, source, options)

    loader.__name__ = name
    loader.__doc__ = f"Hugging Face {source.repo!r}" + (f" ({source.config})" if source.config else "")
    register_dataset(name, kind=source.kind, offline=False)(loader)


for _name, _source in HUB_SOURCES.items():
    _register(_name, _source)
