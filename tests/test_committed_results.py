"""The committed cpu tables and plots are exactly what their committed records give (``make plots`` on a
fresh clone rebuilds them byte for byte), and every committed record is still a run the cpu grid plans
(a change to the config's identity would orphan them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ilora.benchmark import available_benchmarks, default_out_dir, plan, read_record, resolve_benchmarks
from ilora.config import config_hash
from ilora.report import report

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "results" / "records" / "cpu"
TABLES = ROOT / "results" / "tables" / "cpu"
PLOTS = ROOT / "results" / "plots" / "cpu"

pytestmark = pytest.mark.skipif(not any(RECORDS.glob("*/result.json")), reason="no committed cpu records")


def test_every_committed_record_is_a_planned_cpu_run_with_the_same_identity(monkeypatch):
    monkeypatch.chdir(ROOT)
    planned = {run.run_id: run for run in plan(resolve_benchmarks(available_benchmarks()), "cpu")}  # run by name too
    for path in sorted(RECORDS.glob("*/result.json")):
        record = read_record(path)
        assert record is not None, f"{path} is not a readable record"
        assert record["run_id"] in planned, f"{record['run_id']} is no longer planned by the cpu grid"
        assert record["config_hash"] == config_hash(planned[record["run_id"]].config)
        assert all(len(r["client_steps"]) == len(r["clients"]) for r in record["rounds"])


@pytest.mark.slow
def test_make_plots_rebuilds_the_committed_tables_and_plots_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert default_out_dir("cpu") == str(Path("results") / "records" / "cpu")
    # what `make plots` reports (all), and the audits if their tables are committed (`make reproduce-audit`)
    names = set(b.name for b in resolve_benchmarks(["all"])) | \
        {p.stem for p in TABLES.glob("*.md") if p.stem in available_benchmarks()}
    written = report(resolve_benchmarks(sorted(names)), "cpu", results_dir=tmp_path)
    rebuilt = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    committed = {p.relative_to(ROOT / "results"): p.read_bytes()
                 for directory in (TABLES, PLOTS) if directory.exists() for p in directory.rglob("*") if p.is_file()}
    assert committed, "no committed cpu tables"
    missing = sorted(str(p) for p in committed if p not in rebuilt)
    assert not missing, f"committed files the records no longer give: {missing} (skipped: {written.skipped})"
    differ = sorted(str(p) for p, data in committed.items() if rebuilt[p] != data)
    assert not differ, f"committed files that differ from a rebuild: {differ} (run `make plots` and commit)"
    extra = sorted(str(p) for p in rebuilt if p not in committed)
    assert not extra, f"files a rebuild writes that are not committed: {extra}"
