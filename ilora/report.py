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
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ilora.algorithm import available_algorithms, display_name, get_algorithm
from ilora.benchmark import PLOT_KINDS, Benchmark, PlannedRun, expand, read_record
from ilora.errors import UserError

AVERAGE = "average"


PERSONALISED_MARK = " †"
PERSONALISED_NOTE = ("† personalised method: no global model; its cell is the mean over clients of each client's own "
                     "model's accuracy on the same test set, not comparable one-to-one with a global model's.")
DIVERGED_NOTE = ("k diverged: k of the cell's seeds diverged (their loss exploded or they ended at chance; the "
                 "record names the round). The cell's mean and its paired differences are over the other seeds "
                 "only, so they flatter the method: read them with the failure count.")


def personalised(label: str) -> bool:
    """Whether ``label`` names a registered method that is evaluated per client (e.g. FedSA-LoRA)."""
    return label in available_algorithms() and get_algorithm(label).info.personalised


def display(label: str) -> str:
    """A row label as shown: a method's registered display name (marked if personalised), others as they are."""
    return display_name(label) + (PERSONALISED_MARK if personalised(label) else "")


# -------------------------------------------------------------------------------------- collecting
def comm_mb(record: dict[str, Any]) -> tuple[float, float]:
    """Mean over rounds of uplink and downlink MB per participating client."""
    ups, downs = [], []
    for r in record.get("rounds") or []:
        k = max(1, len(r.get("clients") or []) or record.get("config", {}).get("num_clients", 1))
        ups.append(r.get("uplink_bytes", 0) / k / 1e6)
        downs.append(r.get("downlink_bytes", 0) / k / 1e6)
    return (float(np.mean(ups)), float(np.mean(downs))) if ups else (math.nan, math.nan)


def step_ratio(rounds: list[dict[str, Any]]) -> float:
    """First local step's product update in round 2 over round 1 (after vs before the first aggregation)."""
    steps = [r.get("first_step_update") for r in rounds[:2]]
    if len(steps) < 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in steps) or steps[0] <= 0:
        return math.nan
    return float(steps[1] / steps[0])


TARGET_FRACTION = 0.95  # rounds_to_target: the first round reaching this share of the reference's final accuracy

# Per-run numbers a benchmark may show next to accuracy (``table: {extra: [...]}``): column header.
EXTRA_METRICS = {
    "step_ratio": "first-step update, round 2 / round 1",
    "round1_accuracy": "round-1 accuracy",
    "curve_mean": "mean accuracy over rounds",
    "rounds_to_target": "rounds to target",
    "epsilon": "epsilon spent (largest over seeds)",
}
# Extras that are accuracies or rounds of a converging run: shown with a paired difference to the reference row.
CONVERGENCE_METRICS = ("round1_accuracy", "curve_mean", "rounds_to_target")


def rounds_to(curve: list[float], target: float) -> float:
    """The first round (1-based) whose accuracy reaches ``target``; ``len(curve) + 1`` if none does
    (not reached within the run: counted as one round past its end, a lower bound)."""
    for i, acc in enumerate(curve, start=1):
        if acc >= target:
            return float(i)
    return float(len(curve) + 1)


def collect(runs: Iterable[PlannedRun]) -> pd.DataFrame:
    """One row per planned run: its labels and what its record says (status ``missing`` if none)."""
    rows = []
    for run in runs:
        record = read_record(run.result_path)
        row: dict[str, Any] = dict(run.labels)
        row.update(run_id=run.run_id, model=run.config.model, status="missing", accuracy=math.nan,
                   best=math.nan, up_mb=math.nan, down_mb=math.nan, curve=None, seconds=math.nan,
                   step_ratio=math.nan, round1_accuracy=math.nan, curve_mean=math.nan, epsilon=math.nan)
        if record is None and run.result_path.exists():
            print(f"warning: cannot read {run.result_path} (not a valid results record); its cell is left blank",
                  file=sys.stderr)
        if record is not None:
            row["status"] = record.get("status", "failed")
            rounds = record.get("rounds") or []
            row["step_ratio"] = step_ratio(rounds)
            if row["status"] == "ok" and record.get("final_accuracy") is not None:
                row["accuracy"] = 100.0 * record["final_accuracy"]
                row["best"] = 100.0 * record["best_accuracy"]
                row["curve"] = [100.0 * r["accuracy"] for r in rounds]
                row["round1_accuracy"] = row["curve"][0] if row["curve"] else math.nan
                row["curve_mean"] = float(np.mean(row["curve"])) if row["curve"] else math.nan
            row["epsilon"] = epsilon_of(record)
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
    reference: str | None = None  # the row label of the paired differences (e.g. fedit)
    references: list[str] = field(default_factory=list)  # every row label compared with (fedit, lora_fair)


def _key(labels: dict[str, str], axes: list[str]) -> str:
    return " / ".join(labels[a] for a in axes) if axes else "accuracy"


def epsilon_of(record: dict[str, Any]) -> float:
    """The record's epsilon spent: infinite without DP (or with noise 0)."""
    privacy = record.get("privacy")
    if not privacy or privacy.get("epsilon") is None:
        return math.inf
    return float(privacy["epsilon"])


def _fmt_epsilon(values: Seeds) -> str:
    if not values:
        return ""
    largest = max(values.values())
    return "∞ (no DP)" if math.isinf(largest) else f"{largest:.2f}"


def _fmt(mean: float, std: float, n: int) -> str:
    if n == 0 or math.isnan(mean):
        return ""
    return f"{mean:.2f} ± {std:.2f} (n={n})" if n > 1 else f"{mean:.2f} (n=1)"


def _matches(known_cell: dict[str, Any], row: dict[str, str], column: dict[str, str] | None) -> bool:
    labels = {**row, **(column or {})}
    return all(str(v) == labels.get(k) for k, v in known_cell.items()) and set(known_cell) == set(labels)


Seeds = dict[str, float]  # seed label -> final accuracy (percent) of an ok run


@dataclass(frozen=True)
class Paired:
    """A paired difference over the seeds two cells share: mean and its 95% t-interval."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def significant(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def text(self) -> str:
        if self.n == 0:
            return ""
        if self.n == 1:
            return f"{self.mean:+.2f} (n=1)"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def summarize(values: Seeds) -> tuple[float, float, int]:
    """Mean, sample standard deviation and count of the per-seed values."""
    acc = np.array(list(values.values()), dtype=float)
    if not acc.size:
        return math.nan, math.nan, 0
    return float(acc.mean()), float(acc.std(ddof=1)) if acc.size > 1 else 0.0, int(acc.size)


def paired_difference(a: Seeds, b: Seeds, level: float = 0.95) -> Paired:
    """``a - b`` over the seeds both have (same seeds: same partitions and sampling), with a t-interval."""
    from scipy import stats

    common = [k for k in a if k in b]
    d = np.array([a[k] - b[k] for k in common], dtype=float)
    if d.size == 0:
        return Paired(math.nan, math.nan, math.nan, 0)
    mean = float(d.mean())
    if d.size == 1:
        return Paired(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return Paired(mean, mean - half, mean + half, int(d.size))


NOT_THE_REGIME = {  # presets whose tables are a first look, not results
    "quick": "Quick preset: small slices and about 4 local steps per client per round, not the paper's regime "
             "(one epoch of tens of steps, converged): a first look, not a result; the committed tables are cpu.",
    "smoke": "Smoke preset: a few steps on a tiny slice, to check that things run; not a result.",
}
CHANGE_NOTE = ("X − {base} [95% CI]: each row's paired change from the {base} column over the same seeds, mean "
               "and 95% t-interval; its Δ {ref}: that change minus {ref}'s, paired by seed (a difference in "
               "differences: an interval above 0 means the row fares better than {ref} going from {base} to X; "
               "one that contains 0, that the two changes differ inside the noise).")
SECOND_REFERENCE = "lora_fair"  # the paper's runner-up: every method table also shows the difference to it


def reference_labels(bench: Benchmark, preset: str) -> list[str]:
    """The row labels every other row is compared with: ``table.reference`` (default ``fedit``), and LoRA-FAIR
    (the paper's runner-up) where the rows are methods that include it."""
    last = bench.rows[-1] if bench.rows else None
    labels = {a.name: list(a.values) for a in bench.axes(preset)}.get(last or "", [])
    refs = [bench.reference or "fedit"]
    if bench.reference is None:
        refs.append(SECOND_REFERENCE)
    return [r for r in dict.fromkeys(refs) if r in labels]


def reference_label(bench: Benchmark, preset: str) -> str | None:
    """The first reference row (``table.reference``, default ``fedit``), if the rows have it."""
    refs = reference_labels(bench, preset)
    return refs[0] if refs else None


def resolvable_difference(pairs: list[Paired]) -> str | None:
    """What a table's paired intervals can resolve: the range and median of their half-widths."""
    halves = sorted((p.high - p.low) / 2 for p in pairs if p.n > 1 and math.isfinite(p.high - p.low))
    if not halves:
        return None
    ns = sorted({p.n for p in pairs if p.n > 1})
    seeds = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return (f"Resolvable difference: the paired 95% intervals against the reference rows have half-widths "
            f"{halves[0]:.2f} to {halves[-1]:.2f} points (median {float(np.median(halves)):.2f}) with {seeds} seeds; "
            "a difference smaller than its interval's half-width is inside the noise.")


CONVERGED_GAIN = 1.0  # points: the regime's convergence criterion for the reference's last round


def last_round_gain(ok: pd.DataFrame, row_keys: list[dict[str, str]], col_keys: list[dict[str, str]],
                    ref: str | None, method_axis: str | None) -> str | None:
    """Whether the table's runs have converged: FedIT's accuracy change in the last round, mean over its seeds
    and its standard error, for each of its cells (e.g. ``sgd +0.89 ± 0.27; adamw +0.70 ± 0.30``); None where
    FedIT is not the reference row (the regime's criterion is FedIT's) or there are no curves."""
    if ref != "fedit" or method_axis is None or ok.empty:
        return None
    parts = []
    for rl in row_keys:
        if rl[method_axis] != ref:
            continue
        for cl in col_keys or [{}]:
            curves = [c for c in _select(ok, {**rl, **cl})["curve"] if c and len(c) > 1]
            if not curves:
                continue
            gains = [c[-1] - c[-2] for c in curves]
            gain = float(np.mean(gains))
            spread = f" ± {float(np.std(gains, ddof=1)) / np.sqrt(len(gains)):.2f}" if len(gains) > 1 else ""
            where = ", ".join(display(v) for k, v in {**rl, **cl}.items() if k != method_axis)
            verdict = "converged" if gain < CONVERGED_GAIN else "still rising"
            parts.append(f"{where + ' ' if where else ''}{gain:+.2f}{spread} ({verdict}, n={len(curves)})")
    if not parts:
        return None
    return (f"Convergence: {display(ref)}'s accuracy change in the last round, mean over its seeds ± its "
            f"standard error: {'; '.join(parts)} (the regime asks for under {CONVERGED_GAIN:g} point; a "
            "seed's change is noisy, so a mean near the line is not a verdict either way).")


def build_table(bench: Benchmark, preset: str, df: pd.DataFrame) -> Table:
    """The paper's layout: one row per row label, one column per column label (+ average).

    A cell is the mean ± std over seeds with its count; next to each column, every row's paired
    difference to the reference row (FedIT unless the benchmark names another) over the same seeds,
    with a 95% t-interval. Within each group of rows (rows that differ only in the method), the best
    mean is bold only when its paired interval against the runner-up excludes zero.
    """
    row_axes, col_axes = bench.rows, bench.columns
    axes = {a.name: list(a.values) for a in bench.axes(preset)}
    row_keys = list(_product(axes, row_axes))
    col_keys = list(_product(axes, col_axes))
    known = bench.known_for(preset)
    ok = df[df["status"] == "ok"] if not df.empty else df
    refs = reference_labels(bench, preset)
    ref = refs[0] if refs else None
    method_axis = row_axes[-1] if row_axes else None
    pairs_seen: list[Paired] = []
    any_diverged = False

    def seeds_of(sub: pd.DataFrame) -> Seeds:
        if sub.empty:
            return {}
        good = sub[sub["status"] == "ok"]
        seed_col = good["seed"] if "seed" in good else pd.Series(["-"] * len(good), index=good.index)
        return {str(k): float(v) for k, v in zip(seed_col, good["accuracy"]) if not math.isnan(v)}

    columns = [_key(cl, col_axes) for cl in col_keys]
    values: dict[tuple[str, str], Seeds] = {}
    statuses: dict[tuple[str, str], list[str]] = {}
    cells: dict[tuple[str, str], pd.DataFrame] = {}
    for rl in row_keys:
        for cl in col_keys:
            key = (_key(rl, row_axes), _key(cl, col_axes))
            sub = _select(df, {**rl, **cl})
            cells[key] = sub
            values[key] = seeds_of(sub)
            statuses[key] = sorted(set(sub["status"])) if not sub.empty else []
    if bench.average and len(col_keys) > 1:
        for rl in row_keys:
            r = _key(rl, row_axes)
            per_col = [values[(r, c)] for c in columns]
            common = set.intersection(*(set(v) for v in per_col))
            values[(r, AVERAGE)] = {k: float(np.mean([v[k] for v in per_col])) for k in per_col[0] if k in common}
            statuses[(r, AVERAGE)] = []
            cells[(r, AVERAGE)] = df.iloc[0:0]
        columns.append(AVERAGE)

    def ref_row(rl: dict[str, str], reference: str | None = ref) -> str | None:
        return None if reference is None or method_axis is None else _key({**rl, method_axis: reference}, row_axes)

    tidy_rows = []
    tidy_at: dict[tuple[str, str], dict[str, Any]] = {}  # (row, column) -> its tidy row
    out: dict[str, list[str]] = {" / ".join(row_axes) or "run": [" / ".join(display(rl[a]) for a in row_axes)
                                                                  for rl in row_keys]}
    groups = [tuple(rl[a] for a in row_axes[:-1]) for rl in row_keys]
    for col in columns:
        col_labels = {a: AVERAGE for a in col_axes} if col == AVERAGE else \
            next(cl for cl in col_keys if _key(cl, col_axes) == col)
        bold = _significant_best(row_keys, groups, [values[(_key(rl, row_axes), col)] for rl in row_keys])
        texts, papers, deltas = [], [], []
        diffs: dict[str, list[str]] = {r: [] for r in refs}
        for i, rl in enumerate(row_keys):
            r = _key(rl, row_axes)
            mean, std, n = summarize(values[(r, col)])
            text = _fmt(mean, std, n)
            sub = cells[(r, col)]
            diverged = int((sub["status"] == "diverged").sum()) if not sub.empty else 0
            if text and diverged:  # the mean is over the seeds that did not diverge: say how many did
                text = f"{text[:-1]}; {diverged} diverged)"
                any_diverged = True
            if not text and statuses[(r, col)] and "ok" not in statuses[(r, col)]:
                text = "/".join(s for s in statuses[(r, col)] if s != "missing")
            texts.append(f"**{text}**" if i in bold else text)
            paired: dict[str, Paired | None] = {}
            for reference in refs:
                rr = ref_row(rl, reference)
                pair = paired_difference(values[(r, col)], values[(rr, col)]) if rr and rr != r else None
                paired[reference] = pair
                diffs[reference].append("ref." if rr == r else (pair.text() if pair else ""))
                if pair is not None:
                    pairs_seen.append(pair)
            pair = paired.get(ref) if ref else None
            rr = ref_row(rl)
            paper = _known_value(known, rl, col_labels)
            papers.append(paper)
            deltas.append(mean - paper if paper is not None and n else None)
            good = sub[sub["status"] == "ok"] if not sub.empty else sub
            row = {
                **rl, **col_labels, "n": n, "mean": mean, "std": std if n else math.nan,
                "ref": ref if rr and rr != r else "",
                "diff_ref": pair.mean if pair and pair.n else math.nan,
                "diff_ref_low": pair.low if pair else math.nan, "diff_ref_high": pair.high if pair else math.nan,
                "significant": bool(pair.significant) if pair else False,
            }
            for reference in refs[1:]:
                second = paired[reference]
                row[f"diff_{reference}"] = second.mean if second and second.n else math.nan
                row[f"diff_{reference}_low"] = second.low if second else math.nan
                row[f"diff_{reference}_high"] = second.high if second else math.nan
            row.update({
                "best": i in bold, "paper": paper, "diff": deltas[-1],
                "comm_mb": float(good["comm_mb"].mean()) if not good.empty else math.nan,
                "up_mb": float(good["up_mb"].mean()) if not good.empty else math.nan,
                "down_mb": float(good["down_mb"].mean()) if not good.empty else math.nan,
                "diverged": diverged,
                "personalised": personalised(rl[method_axis]) if method_axis else False,
                "statuses": ";".join(statuses[(r, col)]),
                "run_ids": ";".join(sub["run_id"]) if not sub.empty else "",
            })
            tidy_rows.append(row)
            tidy_at[(r, col)] = row
        out[col] = texts
        if len(row_keys) > 1:
            for reference in refs:
                out[f"{col} Δ {display(reference)} [95% CI]"] = diffs[reference]
        if any(p is not None for p in papers):
            out[f"{col} paper"] = [_num(p, "{:.2f}") for p in papers]
            out[f"{col} Δ paper"] = [_num(d, "{:+.2f}") for d in deltas]
    notes: list[str] = []
    if bench.change_from is not None and bench.change_from in columns:
        keys = [_key(rl, row_axes) for rl in row_keys]
        out.update(_changes(bench.change_from, columns, keys, values, tidy_at,
                            [ref_row(rl) for rl in row_keys], ref))
        notes.append(CHANGE_NOTE.format(base=bench.change_from, ref=display(ref) if ref else "the reference row"))
    tidy = pd.DataFrame(tidy_rows)

    finished = df[df["status"].isin(["ok", "diverged"])] if not df.empty else df  # a diverged run has its early rounds
    for metric in bench.extra:
        header = EXTRA_METRICS.get(metric, metric)
        for cl in col_keys:
            prefix = f"{_key(cl, col_axes)} " if len(col_keys) > 1 else ""
            per_row = [_extra_values(metric, ok if metric in CONVERGENCE_METRICS else finished, rl, cl, row_axes, ref)
                       for rl in row_keys]
            if metric == "epsilon":  # a budget, not a measurement: the largest over the cell's seeds
                out[prefix + header] = [_fmt_epsilon(v) for v in per_row]
                continue
            out[prefix + header] = [_fmt(*summarize(v)) for v in per_row]
            if metric in CONVERGENCE_METRICS and ref is not None and method_axis is not None:
                diffs = []
                for rl, vals in zip(row_keys, per_row):
                    ref_vals = per_row[row_keys.index({**rl, method_axis: ref})]
                    diffs.append("ref." if rl[method_axis] == ref else paired_difference(vals, ref_vals).text())
                out[f"{prefix}{header} Δ {display(ref)} [95% CI]"] = diffs
    if any(m == "rounds_to_target" for m in bench.extra) and ref is not None:
        notes.append(f"Rounds to target: per seed, the first round whose test accuracy reaches {TARGET_FRACTION:.0%} "
                     f"of {display(ref)}'s final accuracy on that seed; a run that never reaches it counts as "
                     "rounds + 1 (a lower bound).")

    # communication: one column per model in the table
    ok_models = sorted(set(ok["model"])) if not ok.empty else []
    for model in ok_models or [None]:
        name = "MB/client/round" + (f" ({model})" if len(ok_models) > 1 else "")
        vals = []
        for rl in row_keys:
            sub = _select(ok, rl)
            if model is not None and not sub.empty:
                sub = sub[sub["model"] == model]
            vals.append(f"{sub['comm_mb'].mean():.3f}" if not sub.empty else "")
        out[name] = vals
    notes[:0] = [f"{k.get('note')}" for k in known if k.get("note")]
    if preset in NOT_THE_REGIME:
        notes.append(NOT_THE_REGIME[preset])
    convergence = last_round_gain(ok, row_keys, col_keys, ref, method_axis)
    if convergence:
        notes.append(convergence)
    resolvable = resolvable_difference(pairs_seen)
    if resolvable:
        notes.append(resolvable)
    if any_diverged:
        notes.append(DIVERGED_NOTE)
    if method_axis is not None and any(personalised(rl[method_axis]) for rl in row_keys):
        notes.append(PERSONALISED_NOTE)
    dropped = bench.presets[preset].get("dropped")
    if dropped:
        notes.append(f"Cells of the paper's grid not run at this preset: {dropped}.")
    other = [k for k in bench.known if k.get("preset", "paper") != preset]
    if other:
        ref_text = "; ".join(f"{_cell_text(k['cell'])}: {k['value']:.2f}" for k in other)
        notes.append(f"The paper's known numbers for this table (its own setting, not comparable to these "
                     f"stand-in cells): {ref_text}.")
    return Table(bench.title, pd.DataFrame(out), tidy, sorted(set(notes), key=notes.index), ref, refs)


def _changes(base: str, columns: list[str], rows: list[str], values: dict[tuple[str, str], Seeds],
             tidy_at: dict[tuple[str, str], dict[str, Any]], ref_rows: list[str | None],
             ref: str | None) -> dict[str, list[str]]:
    """Each row's paired change from the ``base`` column and, where there is a reference row, that change minus
    the reference row's, paired by seed (a difference in differences); the tidy rows get the same numbers."""
    out: dict[str, list[str]] = {}
    for col in columns:
        if col in (base, AVERAGE):
            continue
        change = {r: {k: v - values[(r, base)][k] for k, v in values[(r, col)].items() if k in values[(r, base)]}
                  for r in rows}
        texts, versus = [], []
        for r, rr in zip(rows, ref_rows):
            own = paired_difference(values[(r, col)], values[(r, base)])
            rel = paired_difference(change[r], change[rr]) if rr and rr != r else None
            texts.append(own.text())
            versus.append("ref." if rr == r else (rel.text() if rel else ""))
            tidy_at[(r, col)].update({
                "change": own.mean if own.n else math.nan, "change_low": own.low, "change_high": own.high,
                "change_diff_ref": rel.mean if rel and rel.n else math.nan,
                "change_diff_ref_low": rel.low if rel else math.nan,
                "change_diff_ref_high": rel.high if rel else math.nan,
            })
        out[f"{col} − {base} [95% CI]"] = texts
        if ref is not None:
            out[f"{col} − {base}: Δ {display(ref)} [95% CI]"] = versus
    return out


def _extra_values(metric: str, df: pd.DataFrame, row: dict[str, str], column: dict[str, str],
                  row_axes: list[str], reference: str | None) -> Seeds:
    """Per seed, one extra metric of a cell's runs; ``rounds_to_target`` against the reference row's final
    accuracy on the same seed (no reference run for a seed: no value)."""
    sub = _select(df, {**row, **column}) if not df.empty else df
    if sub.empty:
        return {}
    seeds = sub["seed"] if "seed" in sub else pd.Series(["-"] * len(sub), index=sub.index)
    if metric != "rounds_to_target":
        return {str(k): float(v) for k, v in zip(seeds, sub[metric]) if not math.isnan(v)}
    if reference is None or not row_axes:
        return {}
    ref_sub = _select(df, {**row, row_axes[-1]: reference, **column})
    ref_final = {str(k): float(v) for k, v in zip(ref_sub.get("seed", []), ref_sub.get("accuracy", []))
                 if not math.isnan(v)}
    return {str(k): rounds_to(curve, TARGET_FRACTION * ref_final[str(k)])
            for k, curve in zip(seeds, sub["curve"]) if curve and str(k) in ref_final}


def _significant_best(row_keys: list[dict[str, str]], groups: list[tuple[str, ...]], values: list[Seeds]) -> set[int]:
    """Indices of rows whose mean is the best of their group by a margin outside the 95% interval.

    The leader is compared with the runner-up over their shared seeds; a lead inside the noise (or
    a single seed) is not marked.
    """
    bold = set()
    for g in dict.fromkeys(groups):
        members = [i for i, gg in enumerate(groups) if gg == g and values[i]]
        ranked = sorted(members, key=lambda i: summarize(values[i])[0], reverse=True)
        if len(ranked) >= 2 and paired_difference(values[ranked[0]], values[ranked[1]]).significant:
            bold.add(ranked[0])
    return bold


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
    lines += ["- Accuracy in percent: final round, mean ± sample std over seeds, n = number of seeds."]
    for reference in table.references or ([table.reference] if table.reference else []):
        lines += [f"- Δ {display(reference)} [95% CI]: each row's paired difference to "
                  f"{display(reference)} over the same seeds (same partitions, client sampling and initial head), "
                  "mean and 95% t-interval; an interval that contains 0 means the difference is inside the noise."]
    lines += ["- Bold: the best mean of its group, only where its paired 95% interval against the runner-up "
              "excludes 0 (no bold: the lead is inside the noise).",
              "- MB/client/round = (uplink + downlink) per participating client, mean over rounds."]
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
    """``path`` as PNG and PDF, each through a temporary file and a rename (a killed report leaves no torn plot)."""
    import os

    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    out = [path.with_suffix(".png"), path.with_suffix(".pdf")]
    options = [{"dpi": 120}, {"metadata": {"CreationDate": None}}]  # the PDF without a timestamp: the same file
    for target, extra in zip(out, options):
        tmp = target.with_name(f".{target.name}.tmp")
        fig.savefig(tmp, format=target.suffix[1:], bbox_inches="tight", **extra)  # the legend sits right of the panels
        os.replace(tmp, target)
    plt.close(fig)
    return out


def _panels(bench: Benchmark, axes: dict[str, list[str]], skip: str | None = None) -> tuple[list[str], list[dict]]:
    """Panel axes (the columns and every row axis but the last, minus ``skip``) and their labels."""
    names = [a for a in bench.columns + bench.rows[:-1] if a != skip]
    return names, list(_product(axes, names)) or [{}]


MARKERS = "osD^v<>pPX*h"
LINESTYLES = ("-", "--", ":", "-.")
# Paul Tol's "muted" scheme (colour-blind safe), then black and grey: 11 colours
PALETTE = ("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499",
           "#000000", "#888888")


def _style(i: int) -> dict[str, Any]:
    """The i-th row label's colour, marker and line style: a colour-blind-safe palette whose neighbours differ
    in all three, so that up to 16 methods stay apart (in grey too) and each keeps its look across panels."""
    return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[(i // 2) % len(LINESTYLES)]}


def _panel_title(cell: dict[str, str], axes: dict[str, list[str]], fallback: str) -> str:
    """A facet's title names each axis that varies with its label (``optimizer: sgd``), never the bare label;
    axes with one label in the grid are the same in every panel and go to the figure's title."""
    varying = {a: v for a, v in cell.items() if len(axes.get(a, [])) > 1}
    return ", ".join(f"{axis.replace('_', ' ')}: {display(label)}" for axis, label in varying.items()) or fallback


def _no_records(ax: Any) -> None:
    ax.text(0.5, 0.5, "no finished runs yet", transform=ax.transAxes, ha="center", va="center", color="#888888")


def _constant(axes: dict[str, list[str]], names: list[str]) -> str:
    """The labels of the panel axes that do not vary (e.g. the one dataset and model), for a figure's title."""
    return ", ".join(axes[a][0] for a in names if len(axes.get(a, [])) == 1)


def _legend(fig: Any, panels: list[Any]) -> None:
    """One legend for the figure, right of the panels (the methods are the same in every panel)."""
    handles, labels = panels[0].get_legend_handles_labels() if panels else ([], [])
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)


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
    import matplotlib.ticker
    axes = {a.name: list(a.values) for a in bench.axes(preset)}
    names, cols = _panels(bench, axes)
    fig, panels = _figure(len(cols))
    ok = df[df["status"] == "ok"] if not df.empty else df
    seeds_seen: set[int] = set()
    for ax, cl in zip(panels, cols):
        rounds_seen = 0
        for i, (rl, sub) in enumerate(_method_cells(bench, axes, ok, cl)):
            curves = [c for c in sub["curve"] if c] if not sub.empty else []
            if not curves:
                continue
            length = min(len(c) for c in curves)
            stacked = np.array([c[:length] for c in curves])
            mean, xs = stacked.mean(axis=0), np.arange(1, length + 1)
            label = display(_key(rl, bench.rows[-1:])) + f" (n={len(curves)})"
            ax.plot(xs, mean, ms=4, lw=1.3, label=label, **_style(i))
            if len(curves) > 1:
                seeds_seen.add(len(curves))
                std = stacked.std(axis=0, ddof=1)
                ax.fill_between(xs, mean - std, mean + std, color=_style(i)["color"], alpha=0.08, linewidth=0)
            rounds_seen = max(rounds_seen, length)
        if not rounds_seen:
            _no_records(ax)
        ax.set_title(_panel_title(cl, axes, bench.name), fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (%)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if rounds_seen:
            ax.set_xlim(0.8, rounds_seen + 0.2)
        ax.grid(alpha=0.3)
    _legend(fig, panels)
    what = "mean over seeds, band ± 1 std over seeds" if seeds_seen else "one seed per line, no band"
    fixed = _constant(axes, names)
    fig.suptitle(f"{bench.title}{': ' + fixed if fixed else ''} ({preset}; {what})", fontsize=10)
    return _save(fig, path)


def plot_x_axis(bench: Benchmark, preset: str, df: pd.DataFrame, path: Path) -> list[Path]:
    """Accuracy against the table's ``x_axis`` column axis, one line per row label: at its values where
    they are numbers (Dirichlet alpha, FedProx's mu), else at evenly spaced, labelled positions
    (privacy budgets, server optimisers)."""
    axis = str(bench.x_axis)  # the loader requires it for this plot
    axes = {a.name: list(a.values) for a in bench.axes(preset)}
    others, panels_labels = _panels(bench, axes, skip=axis)
    values = axes.get(axis, [])
    numeric = all(_is_number(v) for v in values)
    position = {v: float(v) if numeric else float(i) for i, v in enumerate(values)}
    fig, panels = _figure(len(panels_labels))
    ok = df[df["status"] == "ok"] if not df.empty else df
    lines = list(_product(axes, bench.rows[-1:]))
    for ax, pl in zip(panels, panels_labels):
        for i, rl in enumerate(lines):
            dodge = 0.0 if numeric else 0.25 * (i - (len(lines) - 1) / 2) / max(len(lines), 1)  # bars side by side
            xs, ys, es = [], [], []
            for x in values:
                sub = _select(ok, {**rl, **pl, axis: x})
                if not sub.empty:
                    xs.append(position[x] + dodge)
                    ys.append(sub["accuracy"].mean())
                    es.append(sub["accuracy"].std(ddof=1) if len(sub) > 1 else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, ms=4, capsize=2, label=display(_key(rl, bench.rows[-1:])), **_style(i))
        if not numeric:
            ax.set_xticks(list(position.values()), [str(v) for v in values])
            ax.set_xlim(-0.3, len(values) - 0.7)
        ax.set_title(_panel_title(pl, axes, bench.name), fontsize=9)
        ax.set_xlabel(axis.replace("_", " "))
        ax.set_ylabel("final accuracy (%)")
        ax.grid(alpha=0.3)
    _legend(fig, panels)
    fixed = _constant(axes, others)
    fig.suptitle(f"{bench.title}{': ' + fixed if fixed else ''} ({preset}; mean over seeds, bars ± 1 std over seeds "
                 "where n > 1)", fontsize=10)
    return _save(fig, path)


def _is_number(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def plot_communication(bench: Benchmark, preset: str, df: pd.DataFrame, path: Path) -> list[Path]:
    """Final accuracy against MB per client per round, one point per method and panel."""
    axes = {a.name: list(a.values) for a in bench.axes(preset)}
    names, cols = _panels(bench, axes)
    fig, panels = _figure(len(cols))
    ok = df[df["status"] == "ok"] if not df.empty else df
    for ax, cl in zip(panels, cols):
        for i, (rl, sub) in enumerate(_method_cells(bench, axes, ok, cl)):
            if sub.empty:
                continue
            x, y = sub["comm_mb"].mean(), sub["accuracy"].mean()
            err = sub["accuracy"].std(ddof=1) if len(sub) > 1 else 0.0
            label = display(_key(rl, bench.rows[-1:])) + f" (n={len(sub)})"
            ax.errorbar([x], [y], yerr=[err] if len(sub) > 1 else None, ms=6, capsize=2, label=label,
                        **{**_style(i), "linestyle": "none"})
        ax.set_xscale("log")  # methods differ by orders of magnitude in what they send
        ax.set_title(_panel_title(cl, axes, bench.name), fontsize=9)
        ax.set_xlabel("MB per client per round (up + down, log scale)")
        ax.set_ylabel("final accuracy (%)")
        ax.grid(alpha=0.3, which="both")
    _legend(fig, panels)
    fixed = _constant(axes, names)
    fig.suptitle(f"{bench.title}{': ' + fixed if fixed else ''} ({preset}; mean over seeds, bars ± 1 std over seeds "
                 "where n > 1)", fontsize=10)
    return _save(fig, path)


PLOTS = {"rounds": plot_rounds, "x_axis": plot_x_axis, "communication": plot_communication}
assert set(PLOTS) == set(PLOT_KINDS)


# ---------------------------------------------------------------------------------------- the report
class ReportFiles(list):
    """The files a report wrote, and what it could not write: benchmarks with no records at all (their
    tables left as they were) and, per benchmark, the planned runs that have no record yet."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: list[str] = []
        self.missing: dict[str, list[str]] = {}


REPO_ROOT = Path(__file__).resolve().parent.parent
COMMITTED_RESULTS = REPO_ROOT / "results"
COMMITTED_PRESETS = ("cpu", "paper")  # presets whose tables, plots and records are committed under results/


def guard_committed(results_dir: Path, preset: str, out_dir: str | None, overwrite: bool = False) -> None:
    """Refuse to write the committed tables of ``preset`` from records that are not the committed ones."""
    from ilora.benchmark import default_out_dir

    if overwrite or preset not in COMMITTED_PRESETS or results_dir.resolve() != COMMITTED_RESULTS.resolve():
        return
    records = Path(out_dir or default_out_dir(preset))
    if records.resolve() != (COMMITTED_RESULTS / "records" / preset).resolve():
        raise UserError(f"refusing to replace the committed {preset} tables in {results_dir}/ with a report of the "
                        f"records under {records} (the committed records are results/records/{preset}): give "
                        "--results-dir DIR for this report, or --overwrite-results to replace them")


def report(
    benches: list[Benchmark],
    preset: str,
    overrides: list[str] | None = None,
    out_dir: str | None = None,
    results_dir: Path = Path("results"),
    plots: bool = True,
    built: list[tuple[Benchmark, Table]] | None = None,
    overwrite: bool = False,
) -> ReportFiles:
    """Tables (and plots) of ``benches`` from the records under the sweep's ``out_dir``; each built table is
    also appended to ``built`` when given (``ilora report --wandb`` logs them).

    Only what the records support is written: a benchmark none of whose planned runs has a record keeps
    its existing table and plots (``skipped``); a partial table names its missing runs in its notes. The
    committed tables are written only from the committed records (``overwrite``: from any).
    """
    guard_committed(results_dir, preset, out_dir, overwrite)
    if any(bench.runs_at(preset) for bench in benches):
        check_records(preset, out_dir)
    written = ReportFiles()
    for bench in benches:
        if not bench.runs_at(preset):
            written.append(write_not_run(bench, preset, results_dir / "tables" / preset))
            continue
        runs = expand(bench, preset, overrides, out_dir)
        df = collect(runs)
        absent = [r for r, status in zip(runs, df["status"]) if status == "missing"] if not df.empty else runs
        if runs and len(absent) == len(runs):
            written.skipped.append(bench.name)
            continue
        varying = {a.name for a in bench.axes(preset) if len(a.values) > 1}
        if absent:
            written.missing[bench.name] = [_run_text(r, varying) for r in absent]
        table = build_table(bench, preset, df)
        if absent:
            table.notes.append(f"Partial: {len(absent)} of {len(runs)} planned runs have no record yet "
                               f"({_abbreviated([_run_text(r, varying) for r in absent])}).")
        if built is not None:
            built.append((bench, table))
        written += write_table(table, bench.name, preset, results_dir / "tables" / preset, bench.description)
        if plots:
            for kind in bench.plots:
                name = bench.x_axis if kind == "x_axis" else kind  # e.g. privacy_budget, fedprox_fedprox_mu
                target = results_dir / "plots" / preset / f"{bench.name}_{name}"
                written += PLOTS[kind](bench, preset, df, target)
    written.append(write_provenance(benches, preset, out_dir, results_dir / "tables" / preset, overrides))
    return written


def _run_text(run: PlannedRun, varying: set[str] | None = None) -> str:
    return " ".join(f"{k}={v}" for k, v in run.labels.items() if varying is None or k in varying)


def _abbreviated(items: list[str], limit: int = 6) -> str:
    return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def check_records(preset: str, out_dir: str | None) -> Path:
    """The records directory must exist and hold at least one ``result.json``, else nothing is written."""
    from ilora.benchmark import default_out_dir

    root = Path(out_dir or default_out_dir(preset))
    if not root.is_dir():
        raise UserError(f"no results records: {root} does not exist (run `ilora sweep ... --preset {preset}` first, "
                        "or give --out-dir)")
    if next(root.glob("*/result.json"), None) is None:
        raise UserError(f"no results records under {root} (run `ilora sweep ... --preset {preset}` first)")
    return root


def write_not_run(bench: Benchmark, preset: str, directory: Path) -> Path:
    """A table page that says why ``bench`` has no runs at ``preset`` (stale tables and plots removed)."""
    from ilora.runner import write_atomic

    for stale in [directory / f"{bench.name}.{ext}" for ext in ("tex", "csv")] + \
            list((directory.parent.parent / "plots" / preset).glob(f"{bench.name}_*")):
        stale.unlink(missing_ok=True)
    reason = bench.presets[preset].get("dropped") or "no grid at this preset"
    text = (f"## {bench.title} ({preset} preset)\n\n{bench.description}\n\n"
            f"Not run at the `{preset}` preset: {reason}.\n")
    path = directory / f"{bench.name}.md"
    write_atomic(path, text)
    return path


def write_provenance(
    benches: list[Benchmark], preset: str, out_dir: str | None, directory: Path, overrides: list[str] | None = None
) -> Path:
    """Where the tables came from, read from the records alone, so that the same records always give the same
    file: the runs of every shipped benchmark (whichever of them this report was asked for: the tables of one
    directory share the file), or of the benchmarks given when one of them is a file of the user's."""
    from ilora.benchmark import BENCHMARK_ROOT, available_benchmarks, default_out_dir, resolve_benchmarks
    from ilora.runner import write_atomic

    if all(b.path.resolve().parent == BENCHMARK_ROOT.resolve() for b in benches):
        benches = resolve_benchmarks(available_benchmarks())
    root = Path(out_dir or default_out_dir(preset))
    versions: dict[str, set[str]] = {}
    devices: set[str] = set()
    processors: set[str] = set()
    count, seconds, finished = 0, 0.0, []
    names = set()
    per_benchmark = []
    for bench in benches:
        ids = [run.run_id for run in expand(bench, preset, overrides, out_dir)]
        names.update(ids)
        if ids:
            have = sum((root / i / "result.json").is_file() for i in ids)
            per_benchmark.append(f"  - {bench.name}: {have} of {len(ids)}")
    for run_id in sorted(names):
        rec = read_record(root / run_id / "result.json")
        if rec is None:
            continue
        count += 1
        seconds += sum(r.get("wall_s", 0.0) for r in rec.get("rounds") or [])
        devices.add(str(rec.get("device")))
        processors.add(str(rec.get("processor") or "not recorded"))
        if rec.get("finished"):
            finished.append(str(rec["finished"]))
        for k, v in (rec.get("versions") or {}).items():
            versions.setdefault(k, set()).add(str(v))
    lines = [
        f"# Provenance of the `{preset}` tables", "",
        f"- benchmarks: {', '.join(b.name for b in benches)}",
        f"- overrides: {' '.join(overrides) if overrides else 'none'}",
        f"- results records: {count} of {len(names)} planned runs, under `{root.as_posix()}`; by benchmark "
        "(runs shared between benchmarks count in each):",
        *per_benchmark,
        f"- training + evaluation time in those records: {seconds / 60:.1f} min (summed over runs)",
        f"- records finished: {min(finished)} to {max(finished)}" if finished else "- records finished: -",
        f"- run devices: {', '.join(sorted(devices)) or '-'}",
        f"- run processors: {', '.join(sorted(processors)) or '-'}",
    ]
    for k, v in sorted(versions.items()):
        lines.append(f"- {k}: {', '.join(sorted(v))}")
    path = directory / "PROVENANCE.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------- compare
def ranking(df: pd.DataFrame) -> pd.DataFrame:
    """Methods ranked by mean final accuracy over seeds (failed and missing runs last); equal means share a
    rank, marked ``=`` (competition ranking: 1=, 1=, 3).

    ``Δ best [95% CI]`` is each method's paired difference to the leader over their shared seeds; ``group``
    is ``top`` for the leader and every method whose interval contains 0 (not distinguishable from it),
    ``below`` where the interval excludes 0, ``n/a`` with fewer than two shared seeds. ``std`` is ``n/a`` at
    one seed."""
    rows, seeds = [], {}
    for method, sub in df.groupby("method", sort=False):
        good = sub[sub["status"] == "ok"]
        seed_col = good["seed"] if "seed" in good else pd.Series(["-"] * len(good), index=good.index)
        seeds[method] = {str(k): float(v) for k, v in zip(seed_col, good["accuracy"]) if not math.isnan(v)}
        rows.append({
            "method": method,
            "accuracy": good["accuracy"].mean() if not good.empty else math.nan,
            "std": f"{good['accuracy'].std(ddof=1):.2f}" if len(good) > 1 else "n/a",
            "best": good["best"].mean() if not good.empty else math.nan,
            "MB/client/round": good["comm_mb"].mean() if not good.empty else math.nan,
            "seconds": good["seconds"].mean() if not good.empty else math.nan,
            "runs": f"{len(good)}/{len(sub)}",
        })
    out = pd.DataFrame(rows).sort_values("accuracy", ascending=False, na_position="last", kind="stable")
    out = out.reset_index(drop=True)
    leader = out.loc[0, "method"] if len(out) and not math.isnan(out.loc[0, "accuracy"]) else None
    deltas, groups = [], []
    for method in out["method"]:
        if leader is None or not seeds[method]:
            deltas.append("")
            groups.append("")
            continue
        if method == leader:
            deltas.append("leader")
            groups.append("top")
            continue
        pair = paired_difference(seeds[method], seeds[leader])
        deltas.append(pair.text())
        groups.append("n/a" if pair.n < 2 else ("below" if pair.significant else "top"))
    out.insert(3, "Δ best [95% CI]", deltas)
    out.insert(4, "group", groups)
    out["method"] = [display(str(m)) for m in out["method"]]
    rank = out["accuracy"].rank(method="min", ascending=False, na_option="bottom").astype(int)
    tied = rank.duplicated(keep=False)
    out.insert(0, "rank", [f"{r}=" if t else str(r) for r, t in zip(rank, tied)])  # 1=, 1=, 3: a tie is a tie
    return out


def rankings(bench: Benchmark, preset: str, df: pd.DataFrame) -> list[tuple[dict[str, str], pd.DataFrame]]:
    """One ranking per setting: grouped by every grid axis but the seed and the method, never pooled."""
    axes = [a.name for a in bench.axes(preset) if a.name not in ("seed", "method")]
    if df.empty or not axes:
        return [({}, ranking(df))]
    return [(cell, ranking(_select(df, cell))) for cell in _product({a.name: list(a.values)
                                                                    for a in bench.axes(preset)}, axes)]
