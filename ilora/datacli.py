"""``ilora data prepare|show``: fetch and cache datasets; inspect a federated partition."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from ilora.errors import ConfigError


def add_data_parser(sub: Any) -> None:
    """Register ``ilora data ...`` on the top-level subparsers."""
    data = sub.add_parser("data", help="datasets: prepare (download and cache), show (a partition)")
    dsub = data.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser(
        "prepare", help="download and cache datasets (on a connected machine): ilora data prepare NAME ..."
    )
    prep.add_argument("names", nargs="+",
                      help="dataset or model names, 'paper' (the hub datasets and models) or 'all'")
    prep.add_argument("--data-dir", default=None,
                      help="also save the splits here (one dataset only); runs then take data_dir=DIR")
    prep.set_defaults(func=cmd_prepare)
    show = dsub.add_parser("show", help="client sizes and a client-by-class heatmap of a partition")
    show.add_argument("dataset")
    show.add_argument("overrides", nargs="*",
                      help="config keys, e.g. partition=dirichlet num_clients=10 dirichlet_alpha=0.3 seed=1")
    show.add_argument("--out", default=None,
                      help="heatmap PNG (default: <out_dir>/partitions/partition-<dataset>-<hash>.png)")
    show.set_defaults(func=cmd_show)


def _expand(names: list[str]) -> list[str]:
    """Dataset and model names; ``paper`` is every hub dataset and hub model, ``all`` adds the offline ones."""
    from ilora.data import available_datasets
    from ilora.models.hub import HUB_REPOS

    known = available_datasets()
    out: list[str] = []
    for name in names:
        if name == "all":
            out += list(known) + list(HUB_REPOS)
        elif name == "paper":
            out += [n for n, (_, offline) in known.items() if not offline] + list(HUB_REPOS)
        elif name in known or name in HUB_REPOS:
            out.append(name)
        else:
            valid = ", ".join([*known, *HUB_REPOS])
            raise ConfigError(f"unknown dataset or model {name!r} (valid: {valid}, paper, all)")
    return list(dict.fromkeys(out))


def cmd_prepare(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from ilora.data import DataOptions, load_dataset
    from ilora.data.hub import FASHION_MNIST, HUB_SOURCES, prepare
    from ilora.data.offline import FASHION_MNIST_DIR
    from ilora.models.hub import HUB_REPOS, prepare_model

    names = _expand(args.names)
    if args.data_dir and len(names) != 1:
        raise ConfigError(f"--data-dir takes one dataset, got {len(names)}: {', '.join(names)}")
    rows = []
    for name in [n for n in names if n in HUB_REPOS]:
        print(f"prepared model {name}: {prepare_model(name)}", flush=True)
    for name in [n for n in names if n not in HUB_REPOS]:
        if name in HUB_SOURCES:
            prepare(name, HUB_SOURCES[name], args.data_dir)
            source = f"hf:{HUB_SOURCES[name].repo}"
        elif name == "fashion_mnist" and not FASHION_MNIST_DIR.is_dir():
            prepare(name, FASHION_MNIST, args.data_dir)
            source = f"hf:{FASHION_MNIST.repo}"
        else:
            source = "installed package"
        data = load_dataset(name, DataOptions(data_dir=args.data_dir))
        rows.append([name, data.kind, len(data.train), len(data.test), data.num_classes, source])
        print(f"prepared {name}: {len(data.train)} train / {len(data.test)} test, {data.num_classes} classes",
              flush=True)
    print(tabulate(rows, headers=["dataset", "kind", "train", "test", "classes", "source"]))
    return 0


def _show_config(dataset: str, overrides: list[str]) -> Any:
    """A validated ``RunConfig`` for ``dataset``; ``ranks`` follows ``num_clients`` unless given."""
    from ilora.config import resolve_config

    keys = {o.split("=", 1)[0] for o in overrides}
    extra = [f"dataset={dataset}"]
    if "num_clients" in keys and "ranks" not in keys:
        n = next(o.split("=", 1)[1] for o in overrides if o.startswith("num_clients="))
        if n.strip().lstrip("-").isdigit() and int(n) > 0:
            extra.append(f"ranks=[{','.join(['1'] * int(n))}]")
    return resolve_config([*overrides, *extra])


def client_class_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """``counts[i, c]``: examples of class ``c`` held by client ``i``."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def save_heatmap(counts: np.ndarray, class_names: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_clients, n_classes = counts.shape
    fig, ax = plt.subplots(figsize=(min(max(5.5, 2 + 0.45 * n_classes), 24), min(2 + 0.4 * n_clients, 16)))
    im = ax.imshow(counts, aspect="auto", cmap="viridis")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_yticks(range(n_clients))
    if n_classes <= 30:
        ax.set_xticks(range(n_classes), [n[:12] for n in class_names], rotation=60, ha="right", fontsize=8)
    if n_classes * n_clients <= 400:
        peak = counts.max() if counts.size else 0
        for i in range(n_clients):
            for c in range(n_classes):
                ax.text(c, i, str(counts[i, c]), ha="center", va="center", fontsize=7,
                        color="black" if counts[i, c] > 0.6 * peak else "white")
    fig.colorbar(im, ax=ax, label="examples")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def cmd_show(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from ilora.data import DataOptions, load_dataset
    from ilora.data.partition import PartitionSpec, cached_partition
    from ilora.runner import derive_seeds

    cfg = _show_config(args.dataset, list(args.overrides))
    data = load_dataset(
        cfg.dataset, DataOptions(cfg.split_seed, cfg.max_train_samples, cfg.max_test_samples, cfg.data_dir)
    )
    spec = PartitionSpec(cfg.partition, cfg.num_clients, cfg.dirichlet_alpha, cfg.min_partition_size,
                         cfg.classes_per_client, derive_seeds(cfg.seed)["partition"])
    labels = data.train.labels
    parts = cached_partition(labels, spec, cfg.dataset)
    key = spec.key(cfg.dataset, "train", labels)
    counts = client_class_counts(labels, parts, data.num_classes)

    if cfg.partition == "dirichlet":
        scheme = f"dirichlet alpha={cfg.dirichlet_alpha} min_size={cfg.min_partition_size}"
    elif cfg.partition == "pathological":
        scheme = f"pathological {cfg.classes_per_client} classes/client"
    else:
        scheme = "iid"
    print(f"{cfg.dataset}: {len(labels)} train examples, {data.num_classes} classes; "
          f"{cfg.num_clients} clients, {scheme}, seed {cfg.seed}; partition hash {key}")
    per_class = data.num_classes <= 12
    headers = ["client", "size", "classes", "top class share"] + (data.class_names if per_class else [])
    rows = []
    for i, row in enumerate(counts):
        size = int(row.sum())
        top = f"{row.max() / size:.2f}" if size else "-"
        rows.append([i, size, int((row > 0).sum()), top, *(row.tolist() if per_class else [])])
    print(tabulate(rows, headers=headers))
    out = Path(args.out) if args.out else Path(cfg.out_dir) / "partitions" / f"partition-{cfg.dataset}-{key}.png"
    save_heatmap(counts, data.class_names, f"{cfg.dataset}: {scheme}\nseed {cfg.seed}, partition {key}", out)
    print(f"heatmap: {out}")
    return 0
