"""Benchmarks as data: expand a benchmark's grid into resolved runs, run the missing ones, resume.

A benchmark is one YAML under ``benchmarks/`` (one per paper table or figure)::

    name: nlp_dir05
    title: Text classification, Dirichlet alpha = 0.5
    table: {rows: [method], columns: [dataset], average: true}
    plots: [rounds, communication]
    presets:
      cpu:
        base: {model: minilm, dirichlet_alpha: 0.5, max_train_samples: 300}
        grid:
          dataset: [bbc_news, tweets]                  # a list: the axis is a config key
          method: [fedit, ilora]
          seed: [42]
      ...
    known:                                             # the paper's reported numbers (percent)
      - {preset: paper, cell: {method: ilora, dataset: average}, value: 85.02}

An axis given as a mapping names each value with a label and the overrides it stands for, e.g.
``optimizer: {sgd: {optimizer: sgd, lr: 0.01}, adamw: {optimizer: adamw, lr: 1.0e-4}}``. The axis
``seed`` is the one the report averages over. A preset's ``extend`` adds grid points: each entry names some
axes' labels (e.g. ``{method: [fedit, ilora], seed: [47, 48]}``: more seeds for a few methods), the other
axes keep the grid's; only the seed axis may add labels, so the tables keep their rows. ``method: all``
stands for every registered method and ``method: <group>`` (or a group's name in the list) for a group's
methods (``ilora list`` shows them).

Each grid point becomes a ``RunConfig`` through ``resolve_config`` (the benchmark preset's
``configs/preset/<preset>.yaml``, then ``base``, then the axis overrides, then the command line's
``key=value`` overrides). Its run id is keyed by the resolved config, so a run is skipped when its
``result.json`` exists; runs shared by several benchmarks run once.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ilora.config import PUBLIC_KEYS, RunConfig, available_presets, resolve_config
from ilora.errors import ConfigError
from ilora.paths import check_name, is_plain_name

BENCHMARK_ROOT = Path(__file__).resolve().parent.parent / "benchmarks"
SWEEP_PRESETS = ("paper", "cpu", "quick", "smoke")
PLOT_KINDS = ("rounds", "communication", "x_axis")  # results/plots/<preset>/<benchmark>_<kind, or the x_axis name>


@dataclass(frozen=True)
class Axis:
    """One grid dimension: ordered labels, each with the config overrides it stands for."""

    name: str
    values: dict[str, dict[str, Any]]


@dataclass
class Benchmark:
    name: str
    title: str
    description: str
    rows: list[str]
    columns: list[str]
    average: bool
    plots: list[str]
    presets: dict[str, dict[str, Any]]
    known: list[dict[str, Any]]
    path: Path
    x_axis: str | None = None  # the column axis plotted on x (e.g. dirichlet_alpha), if any
    reference: str | None = None  # the row label of the paired differences (default: fedit, if present)
    change_from: str | None = None  # a column label: each row's paired change from it (e.g. "eps inf")
    extra: list[str] = field(default_factory=list)  # per-run metrics shown next to accuracy (report.EXTRA_METRICS)
    in_all: bool = True  # part of ``all`` (``make reproduce-tables``); false: run by name only

    def axes(self, preset: str) -> list[Axis]:
        if preset not in self.presets:
            raise ConfigError(
                f"benchmark {self.name!r} has no preset {preset!r} (valid: {', '.join(self.presets)})"
            )
        grid = (self.presets[preset] or {}).get("grid") or {}
        return [_axis(self.name, name, spec) for name, spec in grid.items()]

    def grids(self, preset: str) -> list[list[Axis]]:
        """The grid, then each of the preset's ``extend`` entries as a grid of its own: the same axes, with the
        entry's labels in place of the grid's for the axes it names (e.g. more seeds for a few methods)."""
        axes = self.axes(preset)
        by_name = {a.name: a for a in axes}
        extend = (self.presets[preset] or {}).get("extend") or []
        if not isinstance(extend, list):
            raise ConfigError(f"benchmark {self.name}: preset {preset!r}: extend must be a list of mappings "
                              "axis -> labels")
        grids = [axes]
        for i, entry in enumerate(extend):
            where = f"benchmark {self.name}: preset {preset!r}: extend[{i}]"
            if not isinstance(entry, dict) or not entry:
                raise ConfigError(f"{where} must be a mapping axis -> labels (axes: {', '.join(by_name)})")
            grid = list(axes)
            for name, spec in entry.items():
                if name not in by_name:
                    raise ConfigError(f"{where}: {name!r} is not an axis of the grid (axes: {', '.join(by_name)})")
                main = by_name[name]
                if isinstance(spec, list) and spec and all(_label(v) in main.values for v in spec):
                    sub = Axis(name, {_label(v): main.values[_label(v)] for v in spec})  # a subset of the grid's
                else:
                    sub = _axis(self.name, name, spec)
                new = [label for label in sub.values if label not in main.values]
                if new and name != "seed":  # a row or column the table does not have
                    raise ConfigError(f"{where}: {name} has no label {new[0]!r} in the grid; only the seed axis "
                                      f"may add labels (valid: {', '.join(main.values)})")
                grid[[a.name for a in axes].index(name)] = sub
            grids.append(grid)
        return grids

    def base(self, preset: str) -> dict[str, Any]:
        self.axes(preset)  # validates the preset name
        return dict(self.presets[preset].get("base") or {})

    def runs_at(self, preset: str) -> bool:
        """Whether ``preset`` has a grid (a preset may only say what it ``dropped``)."""
        self.axes(preset)
        return bool(self.presets[preset].get("grid"))

    def known_for(self, preset: str) -> list[dict[str, Any]]:
        return [k for k in self.known if k.get("preset", "paper") == preset]


@dataclass
class PlannedRun:
    """One grid point: its labels (axis -> label), resolved config and run id."""

    benchmark: str
    labels: dict[str, str]
    config: RunConfig
    run_id: str

    @property
    def cell(self) -> dict[str, str]:
        return {k: v for k, v in self.labels.items() if k != "seed"}

    @property
    def result_path(self) -> Path:
        return Path(self.config.out_dir) / self.run_id / "result.json"


def _methods(bench: str, spec: Any) -> Any:
    """A ``method`` axis with method groups (``all``, ``paper``, ``extended``...) expanded to their methods."""
    from ilora.algorithm import method_groups

    groups = method_groups()
    items = [spec] if isinstance(spec, str) else spec
    if not isinstance(items, list):
        return spec
    out: list[Any] = []
    for item in items:
        for method in groups.get(item, [item]) if isinstance(item, str) else [item]:
            if method not in out:
                out.append(method)
    if isinstance(spec, str) and spec not in groups:
        raise ConfigError(f"benchmark {bench}: unknown method group {spec!r} (valid: {', '.join(groups)})")
    return out


def _axis(bench: str, name: str, spec: Any) -> Axis:
    if name == "method":
        spec = _methods(bench, spec)
    if isinstance(spec, dict):
        values = {}
        for label, overrides in spec.items():
            if not isinstance(overrides, dict):
                raise ConfigError(f"benchmark {bench}: axis {name!r} label {label!r} must map to overrides")
            values[str(label)] = dict(overrides)
        return Axis(name, values)
    if isinstance(spec, list) and spec:
        if name not in PUBLIC_KEYS:
            raise ConfigError(
                f"benchmark {bench}: axis {name!r} is not a config key; give it as a mapping "
                f"label -> overrides (config keys: {', '.join(PUBLIC_KEYS)})"
            )
        return Axis(name, {_label(v): {name: v} for v in spec})
    raise ConfigError(f"benchmark {bench}: axis {name!r} must be a non-empty list or a mapping")


def _label(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def available_benchmarks(root: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (root or BENCHMARK_ROOT).glob("*.yaml"))


def load_benchmark(name: str, root: Path | None = None) -> Benchmark:
    """A benchmark by name (``benchmarks/<name>.yaml``) or by path to a YAML file."""
    root = root or BENCHMARK_ROOT
    if not name.endswith((".yaml", ".yml")) and not is_plain_name(name):
        raise ConfigError(f"unknown benchmark {name!r} (valid: {', '.join(available_benchmarks(root))}, "
                          "or the path of a benchmark YAML file)")
    path = Path(name) if name.endswith((".yaml", ".yml")) else root / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown benchmark {name!r} (valid: {', '.join(available_benchmarks(root))})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"benchmark {path}: cannot parse: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict) or "presets" not in data:
        raise ConfigError(f"benchmark {path}: must be a mapping with a 'presets' section")
    table = data.get("table") or {}
    check_name(f"benchmark {path}: name", str(data.get("name", path.stem)))  # names its tables' and plots' files
    bench = Benchmark(
        name=str(data.get("name", path.stem)),
        title=str(data.get("title", path.stem)),
        description=str(data.get("description", "")).strip(),
        rows=list(table.get("rows", ["method"])),
        columns=list(table.get("columns", [])),
        average=bool(table.get("average", False)),
        plots=list(data.get("plots", ["rounds", "communication"])),
        presets=dict(data["presets"]),
        known=list(data.get("known") or []),
        path=path,
        x_axis=table.get("x_axis"),
        reference=table.get("reference"),
        change_from=None if table.get("change_from") is None else str(table["change_from"]),
        extra=list(table.get("extra") or []),
        in_all=bool(data.get("in_all", True)),
    )
    unknown = [kind for kind in bench.plots if kind not in PLOT_KINDS]
    if unknown:
        raise ConfigError(f"benchmark {bench.name}: plots: unknown plot {unknown[0]!r} "
                          f"(valid: {', '.join(PLOT_KINDS)})")
    if "x_axis" in bench.plots and bench.x_axis not in bench.columns:
        raise ConfigError(f"benchmark {bench.name}: table: x_axis must name one of its columns "
                          f"({', '.join(bench.columns) or 'none'}) for the x_axis plot")
    if bench.change_from is not None and len(bench.columns) != 1:
        raise ConfigError(f"benchmark {bench.name}: table: change_from needs exactly one column axis "
                          f"(it has {len(bench.columns)}: {', '.join(bench.columns) or 'none'})")
    for preset in bench.presets:
        if not bench.runs_at(preset):
            continue
        axes = {a.name: a for a in bench.axes(preset)}
        bench.grids(preset)  # validates the extend entries
        missing = [a for a in bench.rows + bench.columns if a not in axes]
        if missing:
            raise ConfigError(f"benchmark {bench.name}: preset {preset!r} has no grid axis {missing[0]!r}")
        labels = list(axes[bench.columns[0]].values) if bench.change_from is not None else []
        if bench.change_from is not None and bench.change_from not in labels:
            raise ConfigError(f"benchmark {bench.name}: table: change_from {bench.change_from!r} is not a label "
                              f"of the column axis {bench.columns[0]!r} at preset {preset!r} "
                              f"(valid: {', '.join(labels)})")
    return bench


def resolve_benchmarks(names: list[str], root: Path | None = None) -> list[Benchmark]:
    """Benchmarks by name; ``all`` (or nothing) stands for every benchmark under ``benchmarks/`` that does
    not say ``in_all: false`` (studies run by name, e.g. the audit of the authors' baselines)."""
    names = names or ["all"]
    benches = []
    for name in names:
        if name == "all":
            benches += [b for b in (load_benchmark(n, root) for n in available_benchmarks(root)) if b.in_all]
        else:
            benches.append(load_benchmark(name, root))
    return list({b.name: b for b in benches}.values())  # each once, first mention's order


def _dotlist(overrides: dict[str, Any]) -> list[str]:
    out = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        out.append(f"{key}={text}")
    return out


COMMITTED_RECORDS = ("cpu", "paper")  # presets whose records are committed with their tables


def default_out_dir(preset: str) -> str:
    """Where a sweep of ``preset`` keeps its records: ``results/records/<preset>`` for the presets whose tables
    are committed (the records are committed with them, checkpoints and models are not), else ``runs/<preset>``."""
    return os.path.join("results", "records", preset) if preset in COMMITTED_RECORDS else os.path.join("runs", preset)


def expand(
    bench: Benchmark, preset: str, overrides: list[str] | None = None, out_dir: str | None = None
) -> list[PlannedRun]:
    """Every grid point of ``bench`` under ``preset`` as a resolved, validated run (none without a grid)."""
    if not bench.runs_at(preset):
        return []
    base = bench.base(preset)
    config_preset = base.pop("preset", preset if preset in available_presets() else "cpu")
    from ilora.runner import run_id_for

    out = out_dir or default_out_dir(preset)
    runs = []
    combos = itertools.chain.from_iterable(
        ((grid, combo) for combo in itertools.product(*(list(a.values.items()) for a in grid)))
        for grid in bench.grids(preset))
    seen: set[tuple[str, ...]] = set()
    for axes, combo in combos:
        labels = {a.name: label for a, (label, _) in zip(axes, combo)}
        if tuple(labels.values()) in seen:  # an extend entry that repeats a grid point
            continue
        seen.add(tuple(labels.values()))
        merged: dict[str, Any] = dict(base)
        for _, values in combo:
            merged.update(values)
        fixed = {"preset": config_preset, "progress": False, "wandb_group": wandb_group(bench.name, preset, labels)}
        cfg = _resolve(tuple(_dotlist(fixed) + _dotlist(merged) + list(overrides or []) + [f"out_dir={out}"]))
        cfg = _tagged(cfg, [bench.name])
        runs.append(PlannedRun(bench.name, labels, cfg, run_id_for(cfg)))
    return runs


def select_cell(bench: Benchmark, preset: str, selectors: list[str], out_dir: str | None = None) -> PlannedRun:
    """The one planned run of ``bench`` at ``preset`` that ``axis=label`` selectors name (``ilora run --benchmark``).

    Every axis with more than one label must be named, except the seed (default: the grid's first); a
    selector that is not an axis of the grid, or a label the axis does not have, is an error that lists
    the valid ones. The run is exactly the sweep's: the same config, run id and record.
    """
    axes: dict[str, list[str]] = {}
    for grid in bench.grids(preset):
        for axis in grid:
            axes.setdefault(axis.name, [])
            axes[axis.name] += [label for label in axis.values if label not in axes[axis.name]]
    if not axes:
        raise ConfigError(f"benchmark {bench.name!r} runs nothing at preset {preset!r}: "
                          f"{bench.presets[preset].get('dropped') or 'no grid'}")
    chosen: dict[str, str] = {}
    for item in selectors:
        key, sep, value = item.partition("=")
        if not sep or key not in axes:
            raise ConfigError(f"--benchmark {bench.name}: {item!r} does not name a cell; give axis=label for the "
                              f"axes {', '.join(axes)} (other overrides would make a different run; use "
                              "`ilora run key=value` for that)")
        if value not in axes[key]:
            raise ConfigError(f"--benchmark {bench.name}: {key} has no label {value!r} at preset {preset!r} "
                              f"(valid: {', '.join(axes[key])})")
        chosen[key] = value
    if "seed" in axes:
        chosen.setdefault("seed", axes["seed"][0])
    missing = [name for name, labels in axes.items() if name not in chosen and len(labels) > 1]
    if missing:
        raise ConfigError(f"--benchmark {bench.name}: name the cell's " + "; ".join(
            f"{name} (valid: {', '.join(axes[name])})" for name in missing))
    for run in expand(bench, preset, None, out_dir):
        if all(run.labels[k] == v for k, v in chosen.items()):
            return run
    raise ConfigError(f"--benchmark {bench.name}: no planned run has {chosen}")  # not reached


def wandb_group(bench: str, preset: str, labels: dict[str, str]) -> str:
    """A sweep run's W&B group: ``<benchmark>/<preset>/<axis>=<label>/...``, every grid axis but the seed in
    the grid's order (the method included), so that one group holds the seeds of one table cell's method."""
    cell = "/".join(f"{k}={v}" for k, v in labels.items() if k != "seed")
    return "/".join(part for part in (bench, preset, cell) if part)


def _tagged(cfg: RunConfig, tags: list[str]) -> RunConfig:
    """``cfg`` (never changed: resolved configs are shared) with ``tags`` added to its W&B tags."""
    merged = list(dict.fromkeys([*cfg.wandb_tags, *tags]))
    return cfg if merged == list(cfg.wandb_tags) else dataclasses.replace(cfg, wandb_tags=merged)


@functools.lru_cache(maxsize=4096)
def _resolve(overrides: tuple[str, ...]) -> RunConfig:
    """``resolve_config``, memoised: a report expands the same grids several times."""
    return resolve_config(list(overrides))


def plan(
    benches: list[Benchmark], preset: str, overrides: list[str] | None = None, out_dir: str | None = None
) -> list[PlannedRun]:
    """All runs of several benchmarks, each distinct run once, in the order the benchmarks list them.

    A run shared by several benchmarks runs once: its labels and W&B group are those of the benchmark
    whose name sorts first (whatever the order given), and its W&B tags name every benchmark it is in.
    """
    expanded = {bench.name: expand(bench, preset, overrides, out_dir) for bench in benches}
    owner: dict[str, PlannedRun] = {}
    members: dict[str, list[str]] = {}
    for name in sorted(expanded):
        for run in expanded[name]:
            owner.setdefault(run.run_id, run)
            members.setdefault(run.run_id, []).append(name)
    # seed-major: every run of a benchmark's first seed before its second, so that a sweep stopped early
    # leaves whole seeds (a paired interval needs every method of a seed)
    ranked = [(rank, run.run_id) for runs in expanded.values() for rank, run in _seed_major(runs)]
    order = dict.fromkeys(run_id for _, run_id in sorted(ranked, key=lambda item: item[0]))
    return [dataclasses.replace(owner[i], config=_tagged(owner[i].config, members[i])) for i in order]


def _seed_major(runs: list[PlannedRun]) -> list[tuple[int, PlannedRun]]:
    """Each run with the position of its seed among the benchmark's seeds (0 without a seed axis)."""
    seeds = list(dict.fromkeys(run.labels.get("seed", "") for run in runs))
    return [(seeds.index(run.labels.get("seed", "")), run) for run in runs]


def read_record(path: Path) -> dict[str, Any] | None:
    """A results record, or ``None`` if it is absent or not a readable JSON object (a damaged file)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None
