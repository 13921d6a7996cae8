"""Results records -> the paper's tables (Markdown, LaTeX booktabs, CSV) and plots (PNG, PDF).

Every number comes from a results record: the benchmark's grid says which runs make up which cell
(the same expansion the sweep uses, so the run ids match), the records under the sweep's ``out_dir``
give the numbers. Accuracy is shown in percent as mean +- std over seeds; the best mean per column is
bold; the paper's known value (``known:`` in the benchmark, nothing else) and our difference sit
beside a column only where such a value exists; the communication column is the mean over rounds of
(uplink + downlink bytes) / clients in the round, in MB.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ilora.sweep import Benchmark, PlannedRun, expand, read_record

METHOD_NAMES = {
    "fedit": "FedIT", "flora": "FLoRA", "lora_fair": "LoRA-FAIR", "ffa_lora": "FFA-LoRA", "ilora": "ILoRA",
    "ilora_s": "ILoRA-S", "flexlora": "FlexLoRA", "hetlora": "HetLoRA",
}
AVERAGE = "average"


def display(label: str) -> str:
    return METHOD_NAMES.get(label, label)


# -------------------------------------------------------------------------------------- collecting
def comm_mb(record: dict[str, Any]) -> tuple[float, float]:
    """Mean over rounds of uplink and downlink MB per participating client."""
    ups, downs = [], []
    for r in record.get("rounds") or []:
        k = max(1, len(r.get("clients") or []) or record.get("config", {}).get("num_clients", 1))
        ups.append(r.get("uplink_bytes", 0) / k / 1e6)
        downs.append(r.get("downlink_bytes", 0) / k / 1e6)
    return (float(np.mean(ups)), float(np.mean(downs))) if ups else (math.nan, math.nan)


def collect(runs: Iterable[PlannedRun]) -> pd.DataFrame:
    """One row per planned run: its labels and what its record says (status ``missing`` if none)."""
    rows = []
    for run in runs:
        record = read_record(run.result_path)
        row: dict[str, Any] = dict(run.labels)
        row.update(run_id=run.run_id, model=run.config.model, status="missing", accuracy=math.nan,
                   best=math.nan, up_mb=math.nan, down_mb=math.nan, curve=None, seconds=math.nan)
        if record is not None:
            row["status"] = record.get("status", "failed")
            rounds = record.get("rounds") or []
            if row["status"] == "ok" and record.get("final_accuracy") is not None:
                row["accuracy"] = 100.0 * record["final_accuracy"]
                row["best"] = 100.0 * record["best_accuracy"]
                row["curve"] = [100.0 * r["accuracy"] for r in rounds]
            row["up_mb"], row["down_mb"] = comm_mb(record)
            row["seconds"] = sum(r.get("wall_s", 0.0) for r in rounds)
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        df["comm_mb"] = df["up_mb"] + df["down_mb"]
    return df


# ---------------------------------------------------------------------------------------- the table
@dataclass
class Table:
    """A built table: display cells, the tidy per-cell numbers, and notes."""

    title: str
    display: pd.DataFrame  # strings; bold marked with ** (Markdown) -- converted for LaTeX
    tidy: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def _key(labels: dict[str, str], axes: list[str]) -> str:
    return " / ".join(labels[a] for a in axes) if axes else "accuracy"


def _fmt(mean: float, std: float, n: int) -> str:
    if n == 0 or math.isnan(mean):
        return ""
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def _matches(known_cell: dict[str, Any], row: dict[str, str], column: dict[str, str] | None) -> bool:
    labels = {**row, **(column or {})}
    return all(str(v) == labels.get(k) for k, v in known_cell.items()) and set(known_cell) == set(labels)


def build_table(bench: Benchmark, preset: str, df: pd.DataFrame) -> Table:
    """The paper's layout: one row per row label, one column per column label (+ average)."""
    row_axes, col_axes = bench.rows, bench.columns
    axes = {a.name: list(a.values) for a in bench.axes(preset)}
    row_keys = list(_product(axes, row_axes))
    col_keys = list(_product(axes, col_axes))
    known = bench.known_for(preset)
    ok = df[df["status"] == "ok"] if not df.empty else df

    def cell_runs(rl: dict[str, str], cl: dict[str, str]) -> pd.DataFrame:
        if df.empty:
            return df
        mask = np.ones(len(df), dtype=bool)
        for k, v in {**rl, **cl}.items():
            mask &= (df[k] == v).to_numpy()
        return df[mask]

    tidy_rows, means, papers = [], {}, {}
    for rl in row_keys:
        for cl in col_keys:
            sub = cell_runs(rl, cl)
            good = sub[sub["status"] == "ok"] if not sub.empty else sub
            acc = good["accuracy"].to_numpy(dtype=float) if not good.empty else np.array([])
            mean = float(acc.mean()) if acc.size else math.nan
            std = float(acc.std(ddof=1)) if acc.size > 1 else 0.0
            statuses = sorted(set(sub["status"])) if not sub.empty else []
            key = (_key(rl, row_axes), _key(cl, col_axes))
            means[key] = (mean, std, int(acc.size), statuses)
            paper = _known_value(known, rl, cl)
            diff = (mean - paper) if paper is not None and acc.size else None
            papers[key] = (paper, diff)
            tidy_rows.append({
                **rl, **cl, "n": int(acc.size), "mean": mean, "std": std if acc.size else math.nan,
                "paper": paper, "diff": diff,
                "comm_mb": float(good["comm_mb"].mean()) if not good.empty else math.nan,
                "up_mb": float(good["up_mb"].mean()) if not good.empty else math.nan,
                "down_mb": float(good["down_mb"].mean()) if not good.empty else math.nan,
                "statuses": ";".join(statuses),
                "run_ids": ";".join(sub["run_id"]) if not sub.empty else "",
            })
    columns = [_key(cl, col_axes) for cl in col_keys]
    if bench.average and len(col_keys) > 1:
        avg_labels = {a: AVERAGE for a in col_axes}
        for rl in row_keys:
            vals = [means[(_key(rl, row_axes), c)][0] for c in columns]
            avg = float(np.mean(vals)) if vals and not any(math.isnan(v) for v in vals) else math.nan
            n = 0 if math.isnan(avg) else 1
            key = (_key(rl, row_axes), AVERAGE)
            means[key] = (avg, 0.0, n, [])
            paper = _known_value(known, rl, avg_labels)
            diff = (avg - paper) if paper is not None and n else None
            papers[key] = (paper, diff)
            tidy_rows.append({**rl, **avg_labels, "n": n, "mean": avg, "std": math.nan, "paper": paper,
                              "diff": diff, "comm_mb": math.nan, "up_mb": math.nan, "down_mb": math.nan,
                              "statuses": "", "run_ids": ""})
        columns.append(AVERAGE)
    tidy = pd.DataFrame(tidy_rows)

    # display frame
    out: dict[str, list[str]] = {}
    row_names = [_key(rl, row_axes) for rl in row_keys]
    out[" / ".join(row_axes) or "run"] = [" / ".join(display(rl[a]) for a in row_axes) for rl in row_keys]
    for col in columns:
        vals = [means[(r, col)] for r in row_names]
        # best per column, within each group of rows that differ only in the last row axis (the method)
        groups = [tuple(rl[a] for a in row_axes[:-1]) for rl in row_keys]
        best_of: dict[tuple[str, ...], float] = {}
        for g, (m, _, n, _) in zip(groups, vals):
            if n and not math.isnan(m):
                best_of[g] = max(best_of.get(g, -math.inf), m)
        texts = []
        for g, (mean, std, n, statuses) in zip(groups, vals):
            best = best_of.get(g)
            text = _fmt(mean, std, n) if col != AVERAGE else (f"{mean:.2f}" if n else "")
            if not text and statuses and "ok" not in statuses:
                text = "/".join(s for s in statuses if s != "missing")
            if n and best is not None and mean == best:
                text = f"**{text}**"
            texts.append(text)
        out[col] = texts
        if any(papers[(r, col)][0] is not None for r in row_names):
            out[f"{col} paper"] = [_num(papers[(r, col)][0], "{:.2f}") for r in row_names]
            out[f"{col} Δ"] = [_num(papers[(r, col)][1], "{:+.2f}") for r in row_names]
    # communication: one column per model in the table
    ok_models = sorted(set(ok["model"])) if not ok.empty else []
    for model in ok_models or [None]:
        name = "MB/client/round" + (f" ({model})" if len(ok_models) > 1 else "")
        vals = []
        for rl in row_keys:
            sub = ok
            for k, v in rl.items():
                sub = sub[sub[k] == v] if not sub.empty else sub
            if model is not None and not sub.empty:
                sub = sub[sub["model"] == model]
            vals.append(f"{sub['comm_mb'].mean():.3f}" if not sub.empty else "")
        out[name] = vals
    notes = [f"{k.get('note')}" for k in known if k.get("note")]
    other = [k for k in bench.known if k.get("preset", "paper") != preset]
    if other:
        ref = "; ".join(f"{_cell_text(k['cell'])}: {k['value']:.2f}" for k in other)
        notes.append(f"The paper's known numbers for this table (its own setting, not comparable to these "
                     f"stand-in cells): {ref}.")
    return Table(bench.title, pd.DataFrame(out), tidy, sorted(set(notes), key=notes.index))


def _known_value(known: list[dict[str, Any]], row: dict[str, str], column: dict[str, str]) -> float | None:
    """The paper's value for exactly this cell, if the benchmark lists one."""
    for k in known:
        if _matches(k["cell"], row, column):
            return float(k["value"])
    return None


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None or pd.isna(value) else fmt.format(value)


def _cell_text(cell: dict[str, Any]) -> str:
    return ", ".join(display(str(v)) for v in cell.values())


def _product(axes: dict[str, list[str]], names: list[str]) -> Iterable[dict[str, str]]:
    import itertools

    for combo in itertools.product(*(axes[n] for n in names)):
        yield dict(zip(names, combo))


# ------------------------------------------------------------------------------------------ writing
def to_markdown(table: Table, preset: str, description: str = "") -> str:
    lines = [f"## {table.title} ({preset} preset)", ""]
    if description:
        lines += [description, ""]
    lines += [table.display.to_markdown(index=False, disable_numparse=True), ""]
    lines += [f"- {n}" for n in table.notes]
    lines += ["- Accuracy in percent (final round, mean ± std over seeds); best per column in bold; "
              "MB/client/round = (uplink + downlink) per participating client, mean over rounds."]
    return "\n".join(lines) + "\n"


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def _tex_cell(text: str) -> str:
    bold = text.startswith("**") and text.endswith("**")
    text = _tex_escape(text.strip("*")).replace("±", r"$\pm$").replace("Δ", r"$\Delta$")
    return rf"\textbf{{{text}}}" if bold and text else text


def to_latex(table: Table, preset: str) -> str:
    frame = table.display.map(_tex_cell)
    frame.columns = [_tex_cell(c) for c in frame.columns]
    body = frame.to_latex(index=False, escape=False, column_format="l" + "r" * (frame.shape[1] - 1))
    caption = _tex_escape(f"{table.title} ({preset} preset)")
    return f"% generated by `ilora report`; numbers from results records\n% {caption}\n{body}"


def write_table(table: Table, name: str, preset: str, out_dir: Path, description: str = "") -> list[Path]:
    from ilora.runner import write_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.md", out_dir / f"{name}.tex", out_dir / f"{name}.csv"]
    write_atomic(paths[0], to_markdown(table, preset, description))
    write_atomic(paths[1], to_latex(table, preset))
    write_atomic(paths[2], table.tidy.to_csv(index=False, float_format="%.4f"))
    return paths


# ------------------------------------------------------------------------------------------- plots
def _figure(n: int) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _save(fig: Any, path: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    out = [path.with_suffix(".png"), path.with_suffix(".pdf")]
    fig.savefig(out[0], dpi=120)
    fig.savefig(out[1], metadata={"CreationDate": None})  # no timestamp: same records, same file
    plt.close(fig)
    return out


def _panels(bench: Benchmark, axes: dict[str, list[str]], skip: str | None = None) -> tuple[list[str], list[dict]]:
    """Panel axes (the columns and every row axis but the last, minus ``skip``) and their labels."""
    names = [a for a in bench.columns + bench.rows[:-1] if a != skip]
    return names, list(_product(axes, names)) or [{}]


def _method_cells(bench: Benchmark, axes: dict[str, list[str]], ok: pd.DataFrame, panel: dict):
    """For each method (last row axis) of a panel: its labels and its records in that panel."""
    for rl in _product(axes, bench.rows[-1:]):
        yield rl, _select(ok, {**rl, **panel})


def _select(df: pd.DataFrame, cell: dict) -> pd.DataFrame:
    """The rows of ``df`` whose columns equal every value in ``cell``."""
    for k, v in cell.items():
        if df.empty:
            break
        df = df[df[k] == v]
    return df


def plot_rounds(bench: Benchmark, preset: str, df: pd.DataFrame, path: Path) -> list[Path]:
    """Accuracy against round, one line per method (last row axis), one panel per other cell."""
    axes = {a.name: list(a.values) for a in bench.axes(preset)}
    names, cols = _panels(bench, axes)
    fig, panels = _figure(len(cols))
    ok = df[df["status"] == "ok"] if not df.empty else df
    for ax, cl in zip(panels, cols):
        for rl, sub in _method_cells(bench, axes, ok, cl):
            curves = [c for c in sub["curve"] if c] if not sub.empty else []
            if not curves:
                continue
            length = min(len(c) for c in curves)
            mean = np.mean([c[:length] for c in curves], axis=0)
            ax.plot(range(1, length + 1), mean, marker="o", ms=3, label=display(_key(rl, bench.rows[-1:])))
        ax.set_title(_key(cl, names) if cl else bench.name, fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    if panels and panels[0].get_legend_handles_labels()[0]:
        panels[0].legend(fontsize=7)
    fig.suptitle(f"{bench.title} ({preset})", fontsize=10)
    return _save(fig, path)


def plot_x_axis(bench: Benchmark, preset: str, df: pd.DataFrame, path: Path) -> list[Path]:
    """Accuracy against a numeric column axis (e.g. Dirichlet alpha), one line per row label."""
    axis = bench.x_axis or "dirichlet_alpha"
    axes = {a.name: list(a.values) for a in bench.axes(preset)}
    others, panels_labels = _panels(bench, axes, skip=axis)
    fig, panels = _figure(len(panels_labels))
    ok = df[df["status"] == "ok"] if not df.empty else df
    for ax, pl in zip(panels, panels_labels):
        for rl in _product(axes, bench.rows[-1:]):
            xs, ys, es = [], [], []
            for x in axes.get(axis, []):
                sub = _select(ok, {**rl, **pl, axis: x})
                if not sub.empty:
                    xs.append(float(x))
                    ys.append(sub["accuracy"].mean())
                    es.append(sub["accuracy"].std(ddof=1) if len(sub) > 1 else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2,
                            label=display(_key(rl, bench.rows[-1:])))
        ax.set_title(_key(pl, others) if pl else bench.name, fontsize=9)
        ax.set_xlabel(axis.replace("_", " "))
        ax.set_ylabel("final accuracy (%)")
        ax.grid(alpha=0.3)
    if panels and panels[0].get_legend_handles_labels()[0]:
        panels[0].legend(fontsize=7)
    fig.suptitle(f"{bench.title} ({preset})", fontsize=10)
    return _save(fig, path)


def plot_communication(bench: Benchmark, preset: str, df: pd.DataFrame, path: Path) -> list[Path]:
    """Final accuracy against MB per client per round, one point per method and panel."""
    axes = {a.name: list(a.values) for a in bench.axes(preset)}
    names, cols = _panels(bench, axes)
    fig, panels = _figure(len(cols))
    ok = df[df["status"] == "ok"] if not df.empty else df
    for ax, cl in zip(panels, cols):
        for rl, sub in _method_cells(bench, axes, ok, cl):
            if sub.empty:
                continue
            name = display(_key(rl, bench.rows[-1:]))
            x, y = sub["comm_mb"].mean(), sub["accuracy"].mean()
            ax.scatter([x], [y], label=name)
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(_key(cl, names) if cl else bench.name, fontsize=9)
        ax.set_xlabel("MB per client per round (up + down)")
        ax.set_ylabel("final accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{bench.title} ({preset})", fontsize=10)
    return _save(fig, path)


PLOTS = {"rounds": plot_rounds, "alpha": plot_x_axis, "communication": plot_communication}


# ---------------------------------------------------------------------------------------- the report
def report(
    benches: list[Benchmark],
    preset: str,
    overrides: list[str] | None = None,
    out_dir: str | None = None,
    results_dir: Path = Path("results"),
    plots: bool = True,
) -> list[Path]:
    """Tables (and plots) of ``benches`` from the records under the sweep's ``out_dir``."""
    written: list[Path] = []
    all_records: list[pd.DataFrame] = []
    for bench in benches:
        runs = expand(bench, preset, overrides, out_dir)
        df = collect(runs)
        all_records.append(df)
        table = build_table(bench, preset, df)
        written += write_table(table, bench.name, preset, results_dir / "tables" / preset, bench.description)
        if plots:
            for kind in bench.plots:
                if kind not in PLOTS:
                    continue
                target = results_dir / "plots" / preset / f"{bench.name}_{kind}"
                written += PLOTS[kind](bench, preset, df, target)
    written.append(write_provenance(benches, preset, out_dir, results_dir / "tables" / preset))
    return written


def write_provenance(benches: list[Benchmark], preset: str, out_dir: str | None, directory: Path) -> Path:
    """Where the tables came from: machine, versions and commits of the records, when."""
    from ilora.runner import write_atomic
    from ilora.sweep import default_out_dir

    root = Path(out_dir or default_out_dir(preset))
    versions: dict[str, set[str]] = {}
    devices: set[str] = set()
    count, seconds = 0, 0.0
    names = set()
    for bench in benches:
        for run in expand(bench, preset, None, out_dir):
            names.add(run.run_id)
    for run_id in sorted(names):
        rec = read_record(root / run_id / "result.json")
        if rec is None:
            continue
        count += 1
        seconds += sum(r.get("wall_s", 0.0) for r in rec.get("rounds") or [])
        devices.add(str(rec.get("device")))
        for k, v in (rec.get("versions") or {}).items():
            versions.setdefault(k, set()).add(str(v))
    lines = [
        f"# Provenance of the `{preset}` tables", "",
        f"- generated: {datetime.now(timezone.utc).isoformat(timespec='seconds')} by `ilora report`",
        f"- benchmarks: {', '.join(b.name for b in benches)}",
        f"- results records: {count} of {len(names)} planned runs, under `{root}` (not in git)",
        f"- training + evaluation time in those records: {seconds / 60:.1f} min",
        f"- report machine: {platform.platform()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}",
        f"- run devices: {', '.join(sorted(devices)) or '-'}",
    ]
    for k, v in sorted(versions.items()):
        lines.append(f"- {k}: {', '.join(sorted(v))}")
    path = directory / "PROVENANCE.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------- compare
def ranking(df: pd.DataFrame) -> pd.DataFrame:
    """Methods ranked by mean final accuracy over seeds (failed and missing runs last)."""
    rows = []
    for method, sub in df.groupby("method", sort=False):
        good = sub[sub["status"] == "ok"]
        rows.append({
            "method": display(str(method)),
            "accuracy": good["accuracy"].mean() if not good.empty else math.nan,
            "std": good["accuracy"].std(ddof=1) if len(good) > 1 else 0.0,
            "best": good["best"].mean() if not good.empty else math.nan,
            "MB/client/round": good["comm_mb"].mean() if not good.empty else math.nan,
            "seconds": good["seconds"].mean() if not good.empty else math.nan,
            "runs": f"{len(good)}/{len(sub)}",
        })
    out = pd.DataFrame(rows).sort_values("accuracy", ascending=False, na_position="last")
    out = out.reset_index(drop=True)
    out.insert(0, "rank", range(1, len(out) + 1))
    return out
