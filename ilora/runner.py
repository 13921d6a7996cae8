"""One run from a resolved config to a results record (``<out_dir>/<run_id>/result.json``)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ilora.algorithm import Algorithm, Federation, LayerSpec, get_algorithm
from ilora.checkpoint import load_checkpoint, save_checkpoint
from ilora.config import RunConfig, config_hash, method_options, to_dict
from ilora.data import DataOptions, load_dataset
from ilora.data.cache import cached_encode, preprocessing_key
from ilora.data.partition import PartitionSpec, cached_partition
from ilora.errors import RunInterrupted, UserError
from ilora.models import Backbone, ModelOptions, build_model, check_model_files, dataset_model_check
from ilora.privacy import noise_multiplier, privacy_facts
from ilora.server_update import attach_server_update
from ilora.simulation import RoundRecord, Simulation, client_sampling_stream


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available (valid here: auto, cpu)")
    return torch.device(name)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_threads(setting: str, jobs: int | None = None) -> int:
    """``threads``: a number as given, or ``auto``: the available cores divided by the concurrent jobs.

    The jobs default to ``ILORA_JOBS`` (set by a sweep for its worker processes), else 1.
    """
    if setting != "auto":
        return int(setting)
    jobs = jobs or int(os.environ.get("ILORA_JOBS", "1") or 1)
    return max(1, available_cores() // max(1, jobs))


def derive_seeds(seed: int) -> dict[str, int]:
    """Partition, sampling, training and head seeds, all derived from the one run seed."""
    names = ("partition", "sampling", "training", "head", "algorithm")
    states = np.random.SeedSequence(seed).spawn(len(names))
    return {n: int(s.generate_state(1)[0] & 0x7FFFFFFF) for n, s in zip(names, states)}


def run_id_for(cfg: RunConfig) -> str:
    return cfg.run_id or f"{cfg.method}-{cfg.dataset}-{cfg.model}-s{cfg.seed}-{config_hash(cfg)}"


def package_version(name: str) -> str | None:
    """A package's version from its installed metadata (no import: importing timm alone takes ~1 s)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def processor_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere): speeds differ by processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "timm": package_version("timm"),
        "git_commit": commit,
    }


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename: complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def drill_pause(point: str) -> None:
    """A test hook for the kill drill (scripts/kill_drill.py), which widens a moment so that a kill -9 lands in
    it: ``ILORA_DRILL_PAUSE="run:2,record:2"`` sleeps 2 s before each run of a sweep and 2 s between a record's
    ``metrics.csv`` and its ``result.json``. Unset (always, outside the drill): nothing."""
    for item in filter(None, os.environ.get("ILORA_DRILL_PAUSE", "").split(",")):
        name, _, seconds = item.partition(":")
        if name.strip() == point:
            time.sleep(float(seconds))


@dataclass
class RunParts:
    """What every process of a run builds the same way from its config: data, partition, backbone."""

    cfg: RunConfig
    device: torch.device
    seeds: dict[str, int]
    data: Any  # the dataset's train / test splits
    spec: PartitionSpec
    parts: list[np.ndarray]  # each client's training example indices
    backbone: Backbone
    sampling: list[list[int]]

    noise_multiplier: float | None = None  # DP's sigma: given, or solved from dp_epsilon (None without DP)
    _train: dict[str, Tensor] | None = None

    def encoded(self, split: str) -> dict[str, Tensor]:
        """The encoded ``split`` ("train" or "test"); a dry run's (``pretrained=False``) is never cached: its
        tokenizer may be a stand-in."""
        data = getattr(self.data, split)
        if not self.cfg.pretrained:
            return self.backbone.encode(data)
        return cached_encode(self.backbone.encode, data, preprocessing_key(self.cfg, split))

    def client_data(self, cid: int) -> dict[str, Tensor]:
        """Client ``cid``'s encoded training examples, on the device."""
        if self._train is None:
            self._train = self.encoded("train")
        return {k: v[torch.from_numpy(self.parts[cid])].to(self.device) for k, v in self._train.items()}

    def test_data(self) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in self.encoded("test").items()}

    def algorithm(self) -> Algorithm:
        """A fresh algorithm object (on Flower also each client's replica: the same construction)."""
        backbone, cfg = self.backbone, self.cfg
        fed = Federation(
            layers={n: LayerSpec(l.out_features, l.in_features) for n, l in backbone.lora_layers.items()},
            ranks=list(cfg.ranks),
            num_examples=[len(p) for p in self.parts],
            head_init={n: p.detach().clone() for n, p in backbone.head.items()},
            pretrained_weights=lambda: {n: l.pretrained_weight.detach() for n, l in backbone.lora_layers.items()},
            lora_alpha=cfg.lora_alpha,
            rslora=cfg.rslora,
            seed=self.seeds["algorithm"],
            device=self.device,
            sampling=self.sampling,
        )
        algorithm = get_algorithm(cfg.method)(fed, method_options(cfg))
        attach_server_update(algorithm, cfg, self.noise_multiplier)
        return algorithm


    def simulation(self, algorithm: Algorithm, client_data: Any, test: dict[str, Tensor]) -> Simulation:
        return Simulation(algorithm, self.backbone, client_data, test, self.cfg, self.sampling, self.seeds["training"],
                          self.device, noise_multiplier=self.noise_multiplier if self.cfg.dp == "sample" else None)

    def facts(self, algorithm: Algorithm) -> dict[str, Any]:
        """What the record says about the run's data, device and method options."""
        device = self.device
        return {
            "partition_hash": self.spec.key(self.cfg.dataset, "train", self.data.train.labels),
            "client_sizes": [len(p) for p in self.parts],
            "initial_head_sha256": tensors_sha256(algorithm.fed.head_init),
            "num_train": len(self.data.train),
            "num_test": len(self.data.test),
            "num_classes": self.data.num_classes,
            "chance_accuracy": chance_accuracy(self.data.test.labels),
            "pretrained": self.cfg.pretrained,  # false: a dry run with random weights, not a result
            "backbone_parameters": backbone_parameters(self.backbone),
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "processor": processor_name(),
            "method_options": dataclasses.asdict(algorithm.config),
            "privacy": privacy_facts(self.cfg, self.noise_multiplier, [len(p) for p in self.parts], self.sampling),
            "evaluation": (
                "personalised: mean over clients of each client's own model's accuracy on the global test set"
                if algorithm.info.personalised else "global model on the global test set"
            ),
        }


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """A fingerprint of named tensors (names, shapes, dtypes and bytes, in name order)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def backbone_parameters(backbone: Backbone) -> int:
    """Parameters of the frozen network: the module's, less the head's and the LoRA factors'."""
    head = {id(p) for p in backbone.head.values()}
    return sum(p.numel() for n, p in backbone.module.named_parameters()
               if id(p) not in head and not n.rpartition(".")[2].startswith("lora_"))


def chance_accuracy(labels: Any) -> float:
    """The accuracy of always guessing the test set's most frequent class."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    return float(counts.max() / counts.sum()) if counts.size else 0.0


def divergence(rounds: list[dict[str, Any]], num_classes: int | None, chance: float | None,
               cfg: RunConfig) -> tuple[int, str] | None:
    """The round and the reason a run diverged, or None.

    A run diverged when a loss is not finite; when a round's mean training loss or test loss exceeds
    ``divergence_loss_factor`` times the larger of ``ln(classes)`` (a uniform guess: about where an
    untrained head starts) and the first round's test loss; or, with ``divergence_at_chance``, when it
    ends no better than always guessing the most frequent test class (plus one point; not for a dry run with
    random weights, ``pretrained=False``, which is expected to).
    """
    if not rounds:
        return None
    factor = cfg.divergence_loss_factor
    uniform = math.log(num_classes) if num_classes and num_classes > 1 else 1.0
    first = rounds[0]["loss"]
    limit = factor * max(uniform, first if math.isfinite(first) else uniform)
    for r in rounds:
        for name, key, bound in (("test loss", "loss", limit), ("training loss", "train_loss", factor * uniform)):
            value = r.get(key)
            if value is None:
                continue
            if not math.isfinite(value):
                return r["round"], f"{name} is {value} in round {r['round']}"
            if value > bound:
                return r["round"], (f"{name} {value:.3g} in round {r['round']} is above {bound:.3g} "
                                    f"({factor:g} x max(ln {num_classes}, round 1's test loss))"
                                    if key == "loss" else
                                    f"{name} {value:.3g} in round {r['round']} is above {bound:.3g} "
                                    f"({factor:g} x ln {num_classes}, a uniform guess's loss)")
    last = rounds[-1]
    if cfg.divergence_at_chance and cfg.pretrained and chance is not None and last["accuracy"] <= chance + 0.01:
        return last["round"], (f"accuracy {100 * last['accuracy']:.2f}% after round {last['round']} is at chance "
                               f"(the most frequent test class is {100 * chance:.2f}%)")
    return None


def build_partition(cfg: RunConfig) -> tuple[Any, PartitionSpec, list[np.ndarray]]:
    """The dataset's splits and every client's training example indices for ``cfg`` (no model)."""
    dataset_model_check(cfg.dataset, cfg.model)
    data = load_dataset(
        cfg.dataset,
        DataOptions(cfg.split_seed, cfg.max_train_samples, cfg.max_test_samples, cfg.data_dir),
    )
    spec = PartitionSpec(
        cfg.partition, cfg.num_clients, cfg.dirichlet_alpha, cfg.min_partition_size, cfg.classes_per_client,
        derive_seeds(cfg.seed)["partition"],
    )
    return data, spec, cached_partition(data.train.labels, spec, cfg.dataset)


def build_parts(cfg: RunConfig) -> RunParts:
    """Load the data, partition it and build the backbone for ``cfg`` (seeded: the same in every process)."""
    device = resolve_device(cfg.device)
    seeds = derive_seeds(cfg.seed)
    dataset_model_check(cfg.dataset, cfg.model)
    check_model_files(cfg.model, cfg.pretrained)  # missing files are found before the data is read
    data, spec, parts = build_partition(cfg)
    sampling = client_sampling_stream(cfg.num_clients, cfg.participation, cfg.rounds, seeds["sampling"])
    sigma = noise_multiplier(cfg, [len(p) for p in parts], sampling)  # a budget too small fails here, before the model
    backbone = build_model(
        cfg.model,
        ModelOptions(
            num_classes=data.num_classes, rank=max(cfg.ranks), lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout, rslora=cfg.rslora, max_length=cfg.max_length,
            image_size=cfg.image_size, lora_targets=cfg.lora_targets, seed=seeds["head"], pretrained=cfg.pretrained,
        ),
    ).to(device)
    backbone.module.backbone_dropout = cfg.backbone_dropout
    return RunParts(cfg, device, seeds, data, spec, parts, backbone, sampling, sigma)


def setup(cfg: RunConfig) -> tuple[Simulation, dict[str, Any]]:
    """Data, partition, backbone, algorithm and simulator for ``cfg``; plus facts for the record."""
    parts = build_parts(cfg)
    algorithm = parts.algorithm()
    client_data = [parts.client_data(cid) for cid in range(cfg.num_clients)]
    return parts.simulation(algorithm, client_data, parts.test_data()), parts.facts(algorithm)


def new_record(cfg: RunConfig, started: str) -> dict[str, Any]:
    """The fields every results record has, before any round ran."""
    return {
        "run_id": run_id_for(cfg),
        "status": "ok",
        "error": None,
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
        "method": cfg.method,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "seed": cfg.seed,
        "rounds": [],
        "final_accuracy": None,
        "best_accuracy": None,
        "started": started,
        "finished": None,
    }


def run_experiment(cfg: RunConfig, tracker: Any = None, build: Any = None, engine: str = "inprocess") -> dict[str, Any]:
    """Run ``cfg`` and write its results record; user errors propagate before anything is written.

    ``build(cfg) -> (loop, facts)`` makes the round loop (default: the in-process ``Simulation``;
    ``ilora.flower`` passes its server); ``engine`` is recorded, and keys the checkpoints."""
    run_dir = Path(cfg.out_dir) / run_id_for(cfg)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    threads = resolve_threads(cfg.threads)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    sim, facts = (build or setup)(cfg)  # UserError here: nothing written
    record = new_record(cfg, started)
    record["engine"] = engine
    record.update(facts)
    record["threads"] = threads
    record["versions"] = versions()

    checkpoint_dir = run_dir / "checkpoint"
    # a checkpoint holds the server's state; in-process that includes every client's, on Flower it does not
    checkpoint_key = record["config_hash"] + ("" if engine == "inprocess" else f"-{engine.split('-')[0]}")
    record["rounds"] = load_checkpoint(checkpoint_dir, sim.algorithm, checkpoint_key)
    if record["rounds"]:
        print(f"resuming {record['run_id']} after round {len(record['rounds'])}", file=sys.stderr)

    def on_round(r: RoundRecord) -> None:
        row = {**asdict(r), "overhead_share": r.overhead_share}
        row.update(row.pop("extra"))
        record["rounds"].append(row)
        if r.round < cfg.rounds:
            save_checkpoint(checkpoint_dir, sim.algorithm, record["rounds"], checkpoint_key)
        if tracker is not None:
            tracker.log_round(row)

    try:
        sim.run(start_round=len(record["rounds"]), on_round=on_round)
    except (UserError, RunInterrupted):
        raise
    except Exception as exc:  # a crash mid-run is recorded, not hidden
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
    accs = [r["accuracy"] for r in record["rounds"]]
    diverged = divergence(record["rounds"], record.get("num_classes"), record.get("chance_accuracy"), cfg) \
        if record["status"] == "ok" else None
    if diverged is not None:
        record["status"] = "diverged"
        record["diverged_round"], record["error"] = diverged
    record["final_accuracy"] = accs[-1] if accs else None
    record["best_accuracy"] = max(accs) if accs else None
    if record["status"] == "ok":
        save_final_model(cfg, sim, run_dir, record)
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_record(run_dir, record)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return record


def save_final_model(cfg: RunConfig, sim: Any, run_dir: Path, record: dict[str, Any]) -> None:
    """The evaluated global model next to the record (``ilora export`` reads it), and the export ``cfg.export``
    asks for. Personalised methods save client 0's model; on Flower their client models stay on the clients."""
    from ilora.export import GLOBAL_MODEL, about_run, default_export_dir, export_model, save_global_model

    algorithm = sim.algorithm
    if algorithm.info.personalised and not isinstance(sim, Simulation):
        return
    model = algorithm.eval_model()
    save_global_model(run_dir / GLOBAL_MODEL, model, cfg.method)
    if cfg.export != "none":
        backbone = sim.backbone if isinstance(sim, Simulation) else sim.evaluator.backbone
        export_model(backbone, model, cfg.export, default_export_dir(run_dir, cfg.export), about_run(record))


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """``result.json`` and ``metrics.csv``, each written atomically (metrics first)."""
    buf = io.StringIO()
    if record["rounds"]:
        fields = [k for k in record["rounds"][0] if k not in ("clients", "client_accuracy")]
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(record["rounds"])
    write_atomic(run_dir / "metrics.csv", buf.getvalue())
    drill_pause("record")
    write_atomic(run_dir / "result.json", json.dumps(record, indent=2, default=str))
