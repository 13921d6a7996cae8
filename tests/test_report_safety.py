"""A report never destroys results: tables without records are left alone, the committed tables are written
only from the committed records, partial tables name their missing runs, and the same records always give
the same files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import ilora.report as report_module
from ilora.benchmark import expand, load_benchmark
from ilora.cli import main
from ilora.runner import write_record

BENCH = """
name: safe
title: Safety table
table: {rows: [method], columns: [dataset]}
plots: [rounds]
presets:
  cpu:
    base: {rounds: 2}
    grid:
      dataset: [bbc_news]
      method: [fedit, lora_fair, ilora]
      seed: [1, 2, 3]
  smoke:
    base: {rounds: 2}
    grid:
      dataset: [bbc_news]
      method: [fedit]
      seed: [1]
"""
ACC = {"fedit": 0.60, "lora_fair": 0.62, "ilora": 0.65}


def _bench(tmp_path: Path):
    path = tmp_path / "safe.yaml"
    path.write_text(textwrap.dedent(BENCH))
    return path, load_benchmark(str(path))


def _records(bench, out: Path, skip: set[tuple[str, str]] = frozenset()) -> None:
    for run in expand(bench, "cpu", out_dir=str(out)):
        method, seed = run.labels["method"], run.labels["seed"]
        if (method, seed) in skip:
            continue
        acc = ACC[method] + 0.01 * int(seed)
        rounds = [{"round": t, "clients": [0, 1, 2], "accuracy": acc * t / 2, "loss": 1.0, "uplink_bytes": 10,
                   "downlink_bytes": 10, "wall_s": 1.0} for t in (1, 2)]
        write_record(out / run.run_id, {"run_id": run.run_id, "status": "ok", "error": None, "rounds": rounds,
                                        "final_accuracy": acc, "best_accuracy": acc, "device": "cpu",
                                        "processor": "test cpu", "finished": f"2026-01-0{seed}T00:00:00+00:00",
                                        "versions": {"torch": "x"}})


@pytest.fixture
def committed(tmp_path, monkeypatch):
    """A stand-in for the repository's results/ (with its committed records), so the real one is untouched."""
    root = tmp_path / "repo" / "results"
    monkeypatch.setattr(report_module, "COMMITTED_RESULTS", root)
    return root


def test_a_table_without_records_is_left_as_it_was_and_the_report_exits_1(tmp_path, committed, capsys):
    path, bench = _bench(tmp_path)
    table = tmp_path / "results" / "tables" / "cpu" / "safe.md"
    table.parent.mkdir(parents=True)
    table.write_text("the committed table\n")
    stray = tmp_path / "runs"  # one record that belongs to no planned run of this table
    write_record(stray / "stray-run", {"run_id": "stray-run", "status": "ok", "rounds": []})
    code = main(["report", str(path), "--preset", "cpu", "--out-dir", str(stray),
                 "--results-dir", str(tmp_path / "results")])
    assert code == 1
    assert table.read_text() == "the committed table\n"
    assert not (tmp_path / "results" / "plots" / "cpu").exists()
    assert "not written: safe: none of its planned runs has a record" in capsys.readouterr().err


def test_the_committed_tables_are_written_only_from_the_committed_records(tmp_path, committed, capsys):
    path, bench = _bench(tmp_path)
    scratch = tmp_path / "scratch"
    _records(bench, scratch)
    table = committed / "tables" / "cpu" / "safe.md"
    table.parent.mkdir(parents=True)
    table.write_text("the committed table\n")
    assert main(["report", str(path), "--preset", "cpu", "--out-dir", str(scratch),
                 "--results-dir", str(committed)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to replace the committed cpu tables" in err
    assert table.read_text() == "the committed table\n"
    # elsewhere: fine; into the committed results with the explicit flag: fine
    assert main(["report", str(path), "--preset", "cpu", "--out-dir", str(scratch),
                 "--results-dir", str(tmp_path / "mine")]) == 0
    assert main(["report", str(path), "--preset", "cpu", "--out-dir", str(scratch),
                 "--results-dir", str(committed), "--overwrite-results"]) == 0
    assert "Safety table" in table.read_text()
    # from the committed records themselves: no flag needed
    _records(bench, committed / "records" / "cpu")
    assert main(["report", str(path), "--preset", "cpu", "--out-dir", str(committed / "records" / "cpu"),
                 "--results-dir", str(committed)]) == 0


def test_a_partial_table_names_its_missing_runs(tmp_path, committed, capsys):
    path, bench = _bench(tmp_path)
    out = tmp_path / "runs"
    _records(bench, out, skip={("ilora", "3")})
    assert main(["report", str(path), "--preset", "cpu", "--out-dir", str(out),
                 "--results-dir", str(tmp_path / "results")]) == 0
    assert "partial: safe: 1 planned runs have no record: method=ilora seed=3" in \
        capsys.readouterr().err
    text = (tmp_path / "results" / "tables" / "cpu" / "safe.md").read_text()
    assert "Partial: 1 of 9 planned runs have no record yet (method=ilora seed=3)" in text


def test_the_same_records_give_the_same_files(tmp_path, committed):
    path, bench = _bench(tmp_path)
    out = tmp_path / "runs"
    _records(bench, out)
    contents = []
    for target in ("a", "b"):
        assert main(["report", str(path), "--preset", "cpu", "--out-dir", str(out),
                     "--results-dir", str(tmp_path / target)]) == 0
        root = tmp_path / target
        contents.append({p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()})
    assert contents[0] == contents[1] and len(contents[0]) >= 6  # md, tex, csv, png, pdf, PROVENANCE
    provenance = contents[0][Path("tables/cpu/PROVENANCE.md")].decode()
    assert "9 of 9 planned runs" in provenance and "test cpu" in provenance


def test_every_method_table_pairs_against_fedit_and_lora_fair_and_states_its_resolution(tmp_path, committed):
    path, bench = _bench(tmp_path)
    out = tmp_path / "runs"
    _records(bench, out)
    assert main(["report", str(path), "--preset", "cpu", "--out-dir", str(out),
                 "--results-dir", str(tmp_path / "results")]) == 0
    text = (tmp_path / "results" / "tables" / "cpu" / "safe.md").read_text()
    assert "bbc_news Δ FedIT [95% CI]" in text and "bbc_news Δ LoRA-FAIR [95% CI]" in text
    # ILoRA - FedIT is +5 points on every seed: a zero-width interval
    assert "+5.00 [+5.00, +5.00]" in text and "+3.00 [+3.00, +3.00]" in text
    assert "Resolvable difference: the paired 95% intervals" in text


CONVERGENCE_BENCH = """
name: speed
title: Convergence table
table: {rows: [method], columns: [dataset], extra: [round1_accuracy, curve_mean, rounds_to_target]}
plots: []
presets:
  cpu:
    base: {rounds: 3}
    grid:
      dataset: [bbc_news]
      method: [fedit, ilora]
      seed: [1, 2, 3]
"""
# per method: accuracy after rounds 1..3 (the seed adds 0.01 to every round)
CURVES = {"fedit": [0.50, 0.58, 0.60], "ilora": [0.58, 0.60, 0.61]}


def test_convergence_columns_pair_round_one_the_curve_and_rounds_to_target(tmp_path, committed):
    path = tmp_path / "speed.yaml"
    path.write_text(textwrap.dedent(CONVERGENCE_BENCH))
    bench, out = load_benchmark(str(path)), tmp_path / "runs"
    for run in expand(bench, "cpu", out_dir=str(out)):
        curve = [a + 0.01 * int(run.labels["seed"]) for a in CURVES[run.labels["method"]]]
        rounds = [{"round": t, "clients": [0, 1, 2], "accuracy": a, "loss": 1.0, "uplink_bytes": 10,
                   "downlink_bytes": 10, "wall_s": 1.0} for t, a in enumerate(curve, start=1)]
        write_record(out / run.run_id, {"run_id": run.run_id, "status": "ok", "error": None, "rounds": rounds,
                                        "final_accuracy": curve[-1], "best_accuracy": max(curve),
                                        "device": "cpu", "processor": "test cpu", "versions": {"torch": "x"}})
    assert main(["report", str(path), "--preset", "cpu", "--out-dir", str(out),
                 "--results-dir", str(tmp_path / "results")]) == 0
    text = (tmp_path / "results" / "tables" / "cpu" / "speed.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| ILoRA"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # round 1: +8 points on every seed; mean over rounds: (8 + 2 + 1) / 3 = +3.67
    assert "+8.00 [+8.00, +8.00]" in cells and "+3.67 [+3.67, +3.67]" in cells
    # 95% of FedIT's final (61-63%) is 58-60%: ILoRA reaches it in round 1 (58-60 >= 0.95 x 61-63), FedIT in round 2
    assert "1.00 ± 0.00 (n=3)" in cells and "-1.00 [-1.00, -1.00]" in cells
    assert "Rounds to target: per seed, the first round" in text


def test_rounds_to_target_counts_a_target_never_reached_as_one_past_the_end():
    assert report_module.rounds_to([50.0, 60.0, 70.0], 60.0) == 2.0
    assert report_module.rounds_to([50.0, 60.0, 70.0], 71.0) == 4.0
