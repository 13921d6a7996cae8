"""Tables and plots from synthetic results records: mean +- std, bold best, known values only."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from ilora.benchmark import expand, load_benchmark
from ilora.report import build_table, collect, ranking, report, to_latex, to_markdown
from ilora.runner import write_record

BENCH = """
name: synth
title: Synthetic table
table: {rows: [method], columns: [dataset], average: true, x_axis: dataset}
plots: [rounds, communication, x_axis]
presets:
  smoke:
    base: {rounds: 3}
    grid:
      dataset: [bbc_news, tweets]
      method: [fedit, flora, ilora]
      seed: [1, 2]
known:
  - {preset: smoke, cell: {method: ilora, dataset: bbc_news}, value: 80.0, note: "a known value"}
  - {preset: smoke, cell: {method: ilora, dataset: average}, value: 70.0}
  - {preset: paper, cell: {method: fedit, dataset: qnli}, value: 11.0}
"""

# final accuracy per (method, dataset, seed); flora on tweets is missing, fedit on tweets seed 2 failed
ACC = {
    ("fedit", "bbc_news", "1"): 0.60, ("fedit", "bbc_news", "2"): 0.64,
    ("flora", "bbc_news", "1"): 0.70, ("flora", "bbc_news", "2"): 0.72,
    ("ilora", "bbc_news", "1"): 0.82, ("ilora", "bbc_news", "2"): 0.86,
    ("fedit", "tweets", "1"): 0.50,
    ("ilora", "tweets", "1"): 0.40, ("ilora", "tweets", "2"): 0.44,
}


def make_records(tmp_path: Path):
    path = tmp_path / "synth.yaml"
    path.write_text(textwrap.dedent(BENCH))
    bench = load_benchmark(str(path))
    out = tmp_path / "runs"
    runs = expand(bench, "smoke", out_dir=str(out))
    for run in runs:
        key = (run.labels["method"], run.labels["dataset"], run.labels["seed"])
        if key == ("fedit", "tweets", "2"):
            rec = {"run_id": run.run_id, "status": "failed", "error": "RuntimeError: x", "rounds": [],
                   "final_accuracy": None, "best_accuracy": None}
        elif key in ACC:
            acc = ACC[key]
            up = {"fedit": 1_000_000, "flora": 1_000_000, "ilora": 1_000_000}[key[0]]
            down = {"fedit": 1_000_000, "flora": 3_000_000, "ilora": 1_000_000}[key[0]]
            rounds = [{"round": t, "clients": [0, 1, 2], "accuracy": acc * t / 3, "loss": 1.0,
                       "uplink_bytes": 3 * up, "downlink_bytes": 3 * down, "wall_s": 1.0} for t in (1, 2, 3)]
            rec = {"run_id": run.run_id, "status": "ok", "error": None, "rounds": rounds,
                   "final_accuracy": acc, "best_accuracy": acc, "device": "cpu",
                   "versions": {"torch": "x", "git_commit": "abc123"}}
        else:
            continue
        write_record(out / run.run_id, rec)
    return bench, runs, out


def test_table_from_records(tmp_path):
    bench, runs, _ = make_records(tmp_path)
    df = collect(runs)
    assert sorted(df["status"].value_counts().items()) == [("failed", 1), ("missing", 2), ("ok", 9)]
    table = build_table(bench, "smoke", df)
    shown = table.display.set_index("method")
    # mean +- std over seeds with n, in percent
    assert shown.loc["FedIT", "bbc_news"] == "62.00 ± 2.83 (n=2)"
    assert shown.loc["FedIT", "tweets"] == "50.00 (n=1)"  # one ok seed, the failed one left out
    assert shown.loc["FLoRA", "tweets"] == ""  # no record: empty
    assert shown.loc["ILoRA", "tweets"] == "42.00 ± 2.83 (n=2)"
    # bold only where the lead over the runner-up is outside the paired 95% interval:
    # ILoRA - FLoRA on bbc_news = 12, 14 -> 13 +- 12.71 (t, 1 dof): bold; tweets: FedIT leads on one seed only
    assert shown.loc["ILoRA", "bbc_news"] == "**84.00 ± 2.83 (n=2)**"
    assert shown.loc["FedIT", "tweets"] == "50.00 (n=1)" and "**" not in "".join(shown["tweets"])
    # paired differences to FedIT over the same seeds, with 95% t-intervals
    diff = shown["bbc_news Δ FedIT [95% CI]"]
    assert diff["FedIT"] == "ref." and diff["ILoRA"] == "+22.00 [+22.00, +22.00]"
    assert diff["FLoRA"] == "+9.00 [-3.71, +21.71]"  # inside the noise: the interval holds 0
    assert shown.loc["ILoRA", "tweets Δ FedIT [95% CI]"] == "-10.00 (n=1)"
    # the average column is the per-seed average over the columns, over seeds that have them all
    assert shown.loc["ILoRA", "average"] == "63.00 ± 2.83 (n=2)" and shown.loc["FLoRA", "average"] == ""
    assert shown.loc["FedIT", "average"] == "55.00 (n=1)"
    # the paper's known values only, with our difference; unknown cells empty
    assert list(shown["bbc_news paper"]) == ["", "", "80.00"]
    assert list(shown["bbc_news Δ paper"]) == ["", "", "+4.00"]
    assert list(shown["average paper"]) == ["", "", "70.00"]
    assert list(shown["average Δ paper"]) == ["", "", "-7.00"]
    assert "tweets paper" not in shown.columns
    tidy = table.tidy.set_index(["method", "dataset"])
    assert tidy.loc[("flora", "bbc_news"), "diff_ref_low"] == pytest.approx(9 - 12.7062, abs=1e-3)
    assert not tidy.loc[("flora", "bbc_news"), "significant"] and tidy.loc[("ilora", "bbc_news"), "best"]
    # communication: (up + down) per client per round, MB
    assert list(shown["MB/client/round"]) == ["2.000", "4.000", "2.000"]
    md = to_markdown(table, "smoke")
    assert "**84.00 ± 2.83 (n=2)**" in md and "a known value" in md and "not comparable" in md
    assert "inside the noise" in md
    tex = to_latex(table, "smoke")
    assert r"\toprule" in tex and r"\textbf{84.00 $\pm$ 2.83 (n=2)}" in tex and r"$\Delta$" in tex


def test_change_from_a_column_is_paired_by_seed_and_compared_with_the_reference(tmp_path):
    bench, runs, _ = make_records(tmp_path)
    bench.change_from = "bbc_news"
    table = build_table(bench, "smoke", collect(runs))
    shown = table.display.set_index("method")
    # ILoRA: tweets - bbc_news = 40-82, 44-86 on seeds 1 and 2; FedIT has seed 1 only (60 -> 50); FLoRA no tweets
    change = shown["tweets − bbc_news [95% CI]"]
    assert change["ILoRA"] == "-42.00 [-42.00, -42.00]" and change["FedIT"] == "-10.00 (n=1)"
    assert change["FLoRA"] == ""
    versus = shown["tweets − bbc_news: Δ FedIT [95% CI]"]
    assert versus["FedIT"] == "ref." and versus["ILoRA"] == "-32.00 (n=1)"  # seed 1 only: -42 - (-10)
    assert not any(c.startswith(("bbc_news −", "average −")) for c in shown.columns)  # no change from itself
    tidy = table.tidy.set_index(["method", "dataset"])
    assert tidy.loc[("ilora", "tweets"), "change"] == pytest.approx(-42.0)
    assert tidy.loc[("ilora", "tweets"), "change_diff_ref"] == pytest.approx(-32.0)
    assert "difference in differences" in to_markdown(table, "smoke")


def test_report_writes_tables_and_plots(tmp_path):
    bench, runs, out = make_records(tmp_path)
    results = tmp_path / "results"
    written = report([bench], "smoke", out_dir=str(out), results_dir=results)
    tables = results / "tables" / "smoke"
    for ext in ("md", "tex", "csv"):
        assert (tables / f"synth.{ext}").exists()
    for kind in ("rounds", "communication", "dataset"):  # the x_axis plot is named by its axis
        for ext in ("png", "pdf"):
            path = results / "plots" / "smoke" / f"synth_{kind}.{ext}"
            assert path.exists() and path.stat().st_size > 1000, path
    assert tables / "PROVENANCE.md" in written
    prov = (tables / "PROVENANCE.md").read_text()
    assert "results records: 10 of 12 planned runs" in prov  # 9 ok + 1 failed
    assert "abc123" in prov
    # the CSV traces every number to run ids
    rows = list(csv.DictReader((tables / "synth.csv").open()))
    ilora_bbc = next(r for r in rows if r["method"] == "ilora" and r["dataset"] == "bbc_news")
    assert float(ilora_bbc["mean"]) == 84.0 and float(ilora_bbc["paper"]) == 80.0
    assert len(ilora_bbc["run_ids"].split(";")) == 2
    fedit_bbc = next(r for r in rows if r["method"] == "fedit" and r["dataset"] == "bbc_news")
    assert fedit_bbc["paper"] == "" and fedit_bbc["diff"] == ""


def test_ranking_orders_by_accuracy(tmp_path):
    _, runs, _ = make_records(tmp_path)
    df = collect([r for r in runs if r.labels["dataset"] == "bbc_news"])
    ranked = ranking(df)
    assert list(ranked["method"]) == ["ILoRA", "FLoRA", "FedIT"]
    assert list(ranked["rank"]) == ["1", "2", "3"]
    assert isinstance(ranked, pd.DataFrame) and ranked.loc[0, "runs"] == "2/2"


def test_ranking_shows_ties_as_ties():
    df = pd.DataFrame({
        "method": ["fedit", "flora", "ilora", "ffa_lora"], "status": ["ok", "ok", "ok", "failed"],
        "accuracy": [70.0, 75.0, 70.0, float("nan")], "best": [70.0] * 4, "comm_mb": [1.0] * 4,
        "seconds": [1.0] * 4,
    })
    ranked = ranking(df)
    assert list(zip(ranked["method"], ranked["rank"])) == [
        ("FLoRA", "1"), ("FedIT", "2="), ("ILoRA", "2="), ("FFA-LoRA", "4")]


def test_display_names_come_from_the_registry_and_mark_personalised_methods():
    from ilora.report import display

    assert display("fedit") == "FedIT" and display("fed_sb") == "Fed-SB"
    assert display("fedsa_lora") == "FedSA-LoRA †"
    assert display("+ QR init") == "+ QR init"  # not a method: shown as it is


def test_a_damaged_record_is_named_and_its_cell_left_blank(tmp_path, capsys):
    bench, runs, out = make_records(tmp_path)
    damaged = next(r for r in runs if r.result_path.exists())
    damaged.result_path.write_text('{"run_id": "trunc')
    df = collect(runs)
    assert f"cannot read {damaged.result_path}" in capsys.readouterr().err
    assert df.loc[df["run_id"] == damaged.run_id, "status"].item() == "missing"


def test_provenance_counts_the_runs_the_overrides_select(tmp_path):
    bench, runs, out = make_records(tmp_path)
    report([bench], "smoke", out_dir=str(out), results_dir=tmp_path / "results", plots=False)
    prov = (tmp_path / "results" / "tables" / "smoke" / "PROVENANCE.md").read_text()
    held = sum(r.result_path.exists() for r in runs)
    assert f"results records: {held} of {len(runs)} planned runs" in prov and "overrides: none" in prov
    report([bench], "smoke", ["rounds=7"], out_dir=str(out), results_dir=tmp_path / "results", plots=False)
    prov = (tmp_path / "results" / "tables" / "smoke" / "PROVENANCE.md").read_text()
    assert f"results records: 0 of {len(runs)} planned runs" in prov and "overrides: rounds=7" in prov


def test_rankings_keep_every_axis_but_the_seed(tmp_path):
    """Two alphas are two rankings: their means are never pooled into one 'std' (an axis is not a seed)."""
    from ilora.report import rankings

    path = tmp_path / "drift.yaml"
    path.write_text(textwrap.dedent("""
        name: drift
        title: Drift
        table: {rows: [method], columns: [dirichlet_alpha]}
        presets:
          smoke:
            grid:
              dirichlet_alpha: [0.4, 0.8]
              method: [fedit, ilora]
              seed: [1, 2, 3]
    """))
    bench = load_benchmark(str(path))
    out = tmp_path / "runs"
    runs = expand(bench, "smoke", out_dir=str(out))
    for run in runs:
        acc = (0.10 if run.labels["dirichlet_alpha"] == "0.4" else 0.075) + \
            (0.01 if run.labels["method"] == "ilora" else 0.0) + 0.001 * int(run.labels["seed"])
        write_record(out / run.run_id, {"run_id": run.run_id, "status": "ok", "rounds": [],
                                        "final_accuracy": acc, "best_accuracy": acc})
    groups = rankings(bench, "smoke", collect(runs))
    assert [cell for cell, _ in groups] == [{"dirichlet_alpha": "0.4"}, {"dirichlet_alpha": "0.8"}]
    first = groups[0][1].set_index("method")
    assert first.loc["ILoRA", "accuracy"] == pytest.approx(11.2) and first.loc["ILoRA", "std"] == "0.10"
    assert first.loc["ILoRA", "group"] == "top" and first.loc["FedIT", "group"] == "below"
    assert first.loc["FedIT", "Δ best [95% CI]"].startswith("-1.00 [-1.00, -1.00]")
    one_seed = collect([r for r in runs if r.labels["seed"] == "1"])
    assert ranking(one_seed.iloc[:2])["std"].tolist() == ["n/a", "n/a"]


def test_sixteen_methods_get_sixteen_distinct_looks_and_facets_name_their_axis():
    from ilora.report import _panel_title, _style

    looks = [(_style(i)["color"], _style(i)["marker"], _style(i)["linestyle"]) for i in range(16)]
    assert len(set(looks)) == 16
    assert all(a[0] != b[0] and a[1] != b[1] for a, b in zip(looks, looks[1:]))  # neighbours: colour and marker
    axes = {"dataset": ["fashion_mnist"], "optimizer": ["sgd", "adamw"]}
    assert _panel_title({"dataset": "fashion_mnist", "optimizer": "sgd"}, axes, "x") == "optimizer: sgd"


def test_a_cell_with_a_diverged_seed_says_so(tmp_path):
    """A diverged seed is left out of the mean (its early rounds are not a result), and the cell counts it: a
    method that diverges on some seeds must not look as good as one that never does."""
    bench, runs, out = make_records(tmp_path)
    flora_tweets = next(r for r in runs if (r.labels["method"], r.labels["dataset"], r.labels["seed"])
                        == ("flora", "tweets", "1"))
    rounds = [{"round": 1, "clients": [0, 1, 2], "accuracy": 0.1, "loss": 1.0, "wall_s": 1.0}]
    write_record(out / flora_tweets.run_id, {"run_id": flora_tweets.run_id, "status": "diverged",
                                             "error": "test loss 40 in round 1", "rounds": rounds,
                                             "final_accuracy": 0.1, "best_accuracy": 0.1})
    ilora_tweets = next(r for r in runs if (r.labels["method"], r.labels["dataset"], r.labels["seed"])
                        == ("ilora", "tweets", "2"))
    write_record(out / ilora_tweets.run_id, {"run_id": ilora_tweets.run_id, "status": "diverged",
                                             "error": "test loss 40 in round 1", "rounds": rounds,
                                             "final_accuracy": 0.1, "best_accuracy": 0.1})
    table = build_table(bench, "smoke", collect(runs))
    shown = table.display.set_index("method")
    assert shown.loc["FLoRA", "tweets"] == "diverged"  # no seed finished: the status, not a number
    assert shown.loc["ILoRA", "tweets"] == "40.00 (n=1; 1 diverged)"
    assert shown.loc["ILoRA", "bbc_news"].endswith("(n=2)**")  # cells without a diverged seed are unchanged
    assert table.tidy.set_index(["method", "dataset"]).loc[("ilora", "tweets"), "diverged"] == 1
    assert any(note.startswith("k diverged") for note in table.notes)


def test_tables_say_whether_the_reference_converged(tmp_path):
    """The regime's convergence criterion (FedIT gains under 1 point in the last round) is stated per cell."""
    bench, runs, _ = make_records(tmp_path)
    table = build_table(bench, "smoke", collect(runs))
    # synthetic curves rise linearly: FedIT bbc_news ends at 60/64 after 40/42.67, a gain of 20 and 21.33
    note = next(n for n in table.notes if n.startswith("Convergence"))
    # the two seeds' gains are 20 and 21.33: standard error 0.67 (none for one seed)
    assert "bbc_news +20.67 ± 0.67 (still rising, n=2)" in note and "tweets +16.67 (still rising, n=1)" in note
