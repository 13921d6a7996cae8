"""The sweep runner: grid expansion, skipping what exists, resuming after a kill, failures."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ilora.benchmark import available_benchmarks, expand, load_benchmark, plan, resolve_benchmarks
from ilora.config import RunConfig
from ilora.errors import ConfigError
from ilora.runner import run_id_for, write_record
from ilora.sweep import pending, run_sweep

BENCH = """
name: tiny
title: Tiny
table: {rows: [method], columns: [dataset, optimizer]}
presets:
  smoke:
    base: {rounds: 2, max_train_samples: 60}
    grid:
      dataset: [bbc_news]
      optimizer:
        sgd: {optimizer: sgd, lr: 0.01, momentum: 0.9}
        adamw: {optimizer: adamw, lr: 0.001}
      method: [fedit, ilora]
      seed: [1, 2]
"""


def write_bench(root: Path, text: str = BENCH, name: str = "tiny") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def fake_runner(cfg: RunConfig) -> dict[str, Any]:
    """Deterministic and instant: accuracy from the config alone; writes a record like the runner."""
    acc = 0.5 + 0.1 * cfg.seed + (0.05 if cfg.method == "ilora" else 0.0) + (0.01 if cfg.optimizer == "sgd" else 0)
    rounds = [{"round": t + 1, "clients": [0, 1, 2], "accuracy": acc * (t + 1) / cfg.rounds, "loss": 1.0,
               "uplink_bytes": 3000, "downlink_bytes": 6000, "wall_s": 0.1} for t in range(cfg.rounds)]
    record = {"run_id": run_id_for(cfg), "status": "ok", "error": None, "method": cfg.method, "seed": cfg.seed,
              "rounds": rounds, "final_accuracy": rounds[-1]["accuracy"],
              "best_accuracy": max(r["accuracy"] for r in rounds)}
    write_record(Path(cfg.out_dir) / record["run_id"], record)
    return record


class Interrupt(Exception):
    pass


def interrupting_runner(limit: int, counter: list[int]):
    def run(cfg: RunConfig) -> dict[str, Any]:
        if counter[0] >= limit:
            raise KeyboardInterrupt  # a kill: nothing written for this run
        counter[0] += 1
        return fake_runner(cfg)

    return run


def failing_runner(cfg: RunConfig) -> dict[str, Any]:
    if cfg.method == "ilora" and cfg.seed == 1:
        raise RuntimeError("boom")
    return fake_runner(cfg)


def records(out: Path) -> dict[str, dict[str, Any]]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))}


def test_grid_expansion(tmp_path):
    bench = load_benchmark(str(write_bench(tmp_path)))
    runs = expand(bench, "smoke", out_dir=str(tmp_path / "runs"))
    assert len(runs) == 1 * 2 * 2 * 2
    assert len({r.run_id for r in runs}) == 8
    first = runs[0]
    assert first.labels == {"dataset": "bbc_news", "optimizer": "sgd", "method": "fedit", "seed": "1"}
    assert first.cell == {"dataset": "bbc_news", "optimizer": "sgd", "method": "fedit"}
    assert (first.config.optimizer, first.config.lr, first.config.momentum) == ("sgd", 0.01, 0.9)
    assert first.config.rounds == 2 and first.config.max_train_samples == 60
    assert first.config.out_dir == str(tmp_path / "runs") and first.config.progress is False
    assert first.config.wandb_group == "tiny/smoke/dataset=bbc_news/optimizer=sgd/method=fedit"
    adamw = [r for r in runs if r.labels["optimizer"] == "adamw"]
    assert all(r.config.lr == 0.001 and r.config.optimizer == "adamw" for r in adamw)
    # command-line overrides apply to every run and change the run ids
    changed = expand(bench, "smoke", ["rounds=3"], out_dir=str(tmp_path / "runs"))
    assert all(r.config.rounds == 3 for r in changed)
    assert not {r.run_id for r in changed} & {r.run_id for r in runs}


def test_plan_dedups_shared_runs(tmp_path):
    write_bench(tmp_path / "b")
    write_bench(tmp_path / "b", BENCH.replace("name: tiny", "name: other").replace("method: [fedit, ilora]",
                                                                                     "method: [ilora]"), "other")
    benches = resolve_benchmarks([], tmp_path / "b")
    assert [b.name for b in benches] == ["other", "tiny"] == available_benchmarks(tmp_path / "b")
    runs = plan(benches, "smoke", out_dir=str(tmp_path / "runs"))
    assert len(runs) == 8  # the 'other' runs are a subset of 'tiny'


def test_plan_times_a_run_by_its_optimiser_steps_from_records_of_its_kind(tmp_path):
    """A pending run on twice the data is expected to take twice as long as finished ones of its kind (their
    median time per step); finished records of another table in the same records directory count too, and a
    kind with fewer than three records is timed by its dataset and model instead."""
    from ilora.sweep import make_plan, planned_steps

    write_bench(tmp_path / "b", BENCH.replace("method: [fedit, ilora]", "method: [fedit]")
                .replace("sgd: {optimizer: sgd, lr: 0.01, momentum: 0.9}\n", "")
                .replace("seed: [1, 2]", "seed: [1]"))
    out = tmp_path / "runs"
    epochs = ["local_steps=null", "batch_size=4"]  # one local epoch, its steps set by the data
    (done,) = plan(resolve_benchmarks([], tmp_path / "b"), "smoke", overrides=epochs, out_dir=str(out))
    steps = planned_steps(done.config)

    def finished(name: str, wall: float, method: str = "fedit") -> None:  # a record of another table's run
        rounds = [{"wall_s": wall / 2, "client_steps": [steps // 2 - 5, 5]},
                  {"wall_s": wall / 2, "client_steps": [steps // 2]}]
        record = {"status": "ok", "dataset": "bbc_news", "model": done.config.model, "method": method,
                  "config": {"dp": "none"}, "processor": "a test CPU", "rounds": rounds}
        (out / name).mkdir(parents=True)
        write_record(out / name, record)

    for i, wall in enumerate([100.0, 100.0, 1000.0]):  # the third shared its core with another sweep
        finished(f"fedit-{i}", wall)
    bigger = plan(resolve_benchmarks([], tmp_path / "b"), "smoke", out_dir=str(out),
                  overrides=[*epochs, "max_train_samples=120"])
    assert planned_steps(bigger[0].config) > 1.8 * steps
    result = make_plan(bigger, {"tiny": [r.run_id for r in bigger]}, jobs=1)
    assert result.pending == 1 and result.estimated == 1 and result.processors == ["a test CPU"]
    assert result.expected_s == pytest.approx(100.0 * planned_steps(bigger[0].config) / steps)

    for i in range(3):
        shutil.rmtree(out / f"fedit-{i}")
    finished("fedit-slow", 1000.0)  # one record of the kind: an outlier would set the time alone
    finished("ilora-0", 100.0, "ilora")
    finished("ilora-1", 100.0, "ilora")
    result = make_plan(bigger, {"tiny": [r.run_id for r in bigger]}, jobs=1)
    assert result.estimated == 0  # timed by bbc_news and its model: the median of 1000, 100, 100
    assert result.expected_s == pytest.approx(100.0 * planned_steps(bigger[0].config) / steps)


EXTENDED = BENCH.replace("      seed: [1, 2]\n", """      seed: [1, 2]
    extend:
      - {optimizer: [adamw], method: [ilora], seed: [2, 3, 4]}
""")


def test_extend_adds_seeds_for_a_few_cells_only(tmp_path):
    bench = load_benchmark(str(write_bench(tmp_path, EXTENDED)))
    runs = expand(bench, "smoke", out_dir=str(tmp_path / "runs"))
    extra = [r for r in runs if r.labels["seed"] in ("3", "4")]
    assert len(runs) == 8 + 2 and len({r.run_id for r in runs}) == 10  # seed 2 of that cell is not run twice
    assert all(r.labels["optimizer"] == "adamw" and r.labels["method"] == "ilora" for r in extra)
    assert all(r.config.optimizer == "adamw" and r.config.lr == 0.001 and r.config.seed in (3, 4) for r in extra)
    assert [a.name for a in bench.axes("smoke")] == ["dataset", "optimizer", "method", "seed"]  # the table's
    # the sweep's order stays seed-major: every seed-1 and seed-2 run before the extension's seeds
    order = [r.labels["seed"] for r in plan([bench], "smoke", out_dir=str(tmp_path / "runs"))]
    assert order == sorted(order)


@pytest.mark.parametrize("extend, message", [
    ("{colour: [red]}", "extend\\[0\\]: 'colour' is not an axis of the grid"),
    ("{method: [flora]}", "extend\\[0\\]: method has no label 'flora' in the grid; only the seed axis may add"),
    ("{optimizer: [lion]}", "extend\\[0\\]: optimizer has no label 'lion'"),
    ("seeds", "extend\\[0\\] must be a mapping axis -> labels"),
])
def test_extend_errors_name_the_entry(tmp_path, extend, message):
    path = write_bench(tmp_path, EXTENDED.replace("{optimizer: [adamw], method: [ilora], seed: [2, 3, 4]}", extend))
    with pytest.raises(ConfigError, match=message):
        load_benchmark(str(path))


@pytest.mark.parametrize("layout, message", [
    ("table: {rows: [method], columns: [dataset, optimizer]}\nplots: [rounds, bars]",
     "plots: unknown plot 'bars' \\(valid: rounds, communication, x_axis\\)"),
    ("table: {rows: [method], columns: [dataset, optimizer]}\nplots: [x_axis]",
     "table: x_axis must name one of its columns \\(dataset, optimizer\\)"),
    ("table: {rows: [method], columns: [dataset, optimizer], x_axis: seed}\nplots: [x_axis]",
     "table: x_axis must name one of its columns"),
    ("table: {rows: [method], columns: [dataset, optimizer], change_from: sgd}",
     "table: change_from needs exactly one column axis \\(it has 2: dataset, optimizer\\)"),
    ("table: {rows: [method], columns: [optimizer], change_from: lion}",
     "table: change_from 'lion' is not a label of the column axis 'optimizer' at preset 'smoke' "
     "\\(valid: sgd, adamw\\)"),
])
def test_plot_errors_name_the_field_and_the_choices(tmp_path, layout, message):
    path = write_bench(tmp_path, BENCH.replace("table: {rows: [method], columns: [dataset, optimizer]}", layout))
    with pytest.raises(ConfigError, match=message):
        load_benchmark(str(path))


def test_benchmark_errors(tmp_path):
    bench = load_benchmark(str(write_bench(tmp_path)))
    with pytest.raises(ConfigError, match="no preset 'cpu'"):
        expand(bench, "cpu")
    bad = write_bench(tmp_path, BENCH.replace("seed: [1, 2]", "colour: [red]"), "bad")
    with pytest.raises(ConfigError, match="axis 'colour' is not a config key"):
        expand(load_benchmark(str(bad)), "smoke")
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
        load_benchmark("nope", tmp_path)
    wrong = write_bench(tmp_path, BENCH.replace("method: [fedit, ilora]", "method: [fedit, magic]"), "wrong")
    with pytest.raises(ConfigError, match="unknown method 'magic'"):
        expand(load_benchmark(str(wrong)), "smoke")


def test_every_shipped_benchmark_expands_for_cpu_quick_and_smoke():
    for bench in resolve_benchmarks(available_benchmarks()):
        assert set(bench.presets) == {"paper", "cpu", "quick", "smoke"}
        assert expand(bench, "smoke"), bench.name
        expand(bench, "quick")
        # a cpu preset either runs a grid of at least 5 seeds in the paper's regime or says why it does not
        runs = expand(bench, "cpu")
        if not runs:
            assert bench.presets["cpu"].get("dropped"), bench.name
            continue
        assert len({r.labels["seed"] for r in runs}) >= 5, bench.name
        for run in runs:
            cfg = run.config
            assert (cfg.local_steps, cfg.local_epochs, cfg.rounds, cfg.num_clients) == (None, 1, 5, 3), run.run_id
            # one epoch over each client's partition: >= 50 steps per client on average, none under 20
            assert cfg.max_train_samples / cfg.num_clients / cfg.batch_size >= 50, run.run_id
            assert cfg.min_partition_size / cfg.batch_size >= 20, run.run_id


def test_all_leaves_out_benchmarks_that_say_so_and_names_bring_them_in():
    everything = set(available_benchmarks())
    in_all = {b.name for b in resolve_benchmarks(["all"])}
    assert {"authors_audit_vision", "authors_audit_text", "authors_audit_ilora"} <= everything - in_all
    assert {"nlp_dirichlet05", "ilora_stability"} <= in_all
    named = [b.name for b in resolve_benchmarks(["all", "authors_audit_text", "nlp_dirichlet05"])]
    assert len(named) == len(set(named)) == len(in_all) + 1


def test_a_preset_without_grid_runs_nothing_and_reports_why(tmp_path):
    from ilora.report import report

    bench = load_benchmark("many_clients")
    assert not bench.runs_at("cpu") and expand(bench, "cpu") == []
    written = report([bench], "cpu", out_dir=str(tmp_path / "runs"), results_dir=tmp_path / "results")
    text = (tmp_path / "results" / "tables" / "cpu" / "many_clients.md").read_text()
    assert "Not run at the `cpu` preset" in text and "a later grid" in text
    assert all(p.suffix == ".md" for p in written)


def test_skip_existing_and_resume_after_kill(tmp_path):
    bench = load_benchmark(str(write_bench(tmp_path)))
    # uninterrupted reference sweep
    ref_runs = expand(bench, "smoke", out_dir=str(tmp_path / "ref"))
    summary = run_sweep(ref_runs, runner=fake_runner, progress=False, log=lambda s: None)
    assert (summary.ran, summary.skipped) == (8, 0)
    # a sweep killed after three runs ...
    runs = expand(bench, "smoke", out_dir=str(tmp_path / "out"))
    counter = [0]
    with pytest.raises(KeyboardInterrupt):
        run_sweep(runs, runner=interrupting_runner(3, counter), progress=False, log=lambda s: None)
    assert len(records(tmp_path / "out")) == 3 and len(pending(runs)) == 5
    # ... then rerun: finishes the five missing ones, redoes none of the three
    calls = [0]
    summary = run_sweep(runs, runner=interrupting_runner(100, calls), progress=False, log=lambda s: None)
    assert (summary.ran, summary.skipped, calls[0]) == (5, 3, 5)
    assert records(tmp_path / "out") == records(tmp_path / "ref")
    # and a third run does nothing at all
    summary = run_sweep(runs, runner=interrupting_runner(0, [0]), progress=False, log=lambda s: None)
    assert (summary.ran, summary.skipped) == (0, 8)


def test_failed_run_is_recorded_and_sweep_goes_on(tmp_path):
    bench = load_benchmark(str(write_bench(tmp_path)))
    runs = expand(bench, "smoke", out_dir=str(tmp_path / "out"))
    summary = run_sweep(runs, runner=failing_runner, progress=False, log=lambda s: None)
    assert summary.ran == 8 and len(summary.failed) == 2
    recs = records(tmp_path / "out")
    failed = [r for r in recs.values() if r["status"] == "failed"]
    assert len(failed) == 2 and all("RuntimeError: boom" in r["error"] for r in failed)
    assert all(r["config"]["method"] == "ilora" and r["seed"] == 1 for r in failed)
    # a rerun skips failed runs unless asked to retry them
    assert run_sweep(runs, runner=failing_runner, progress=False, log=lambda s: None).ran == 0
    again = run_sweep(runs, runner=fake_runner, retry_failed=True, progress=False, log=lambda s: None)
    assert again.ran == 2 and not again.failed
    assert all(r["status"] == "ok" for r in records(tmp_path / "out").values())


def test_parallel_jobs_match_serial(tmp_path):
    bench = load_benchmark(str(write_bench(tmp_path)))
    serial = expand(bench, "smoke", out_dir=str(tmp_path / "serial"))
    run_sweep(serial, jobs=1, runner=fake_runner, progress=False, log=lambda s: None)
    para = expand(bench, "smoke", out_dir=str(tmp_path / "para"))
    summary = run_sweep(para, jobs=2, runner=fake_runner, progress=False, log=lambda s: None)
    assert summary.ran == 8 and not summary.failed
    assert records(tmp_path / "para") == records(tmp_path / "serial")


@pytest.mark.slow
def test_real_smoke_sweep_then_rerun_does_nothing(tmp_path):
    from ilora.cli import main

    bench = write_bench(tmp_path, """
        name: tiny
        table: {rows: [method], columns: [dataset]}
        presets:
          smoke:
            base: {rounds: 1, local_steps: 1, max_train_samples: 60, max_test_samples: 30, max_length: 16}
            grid:
              dataset: [bbc_news]
              method: [fedit, ilora]
              seed: [1]
        """)
    out = tmp_path / "runs"
    args = ["sweep", str(bench), "--preset", "smoke", "--out-dir", str(out), "--report",
            "--results-dir", str(tmp_path / "results")]
    assert main(args) == 0
    recs = records(out)
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs.values())
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")} == mtimes
    assert (tmp_path / "results" / "tables" / "smoke" / "tiny.md").exists()


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_sigterm_stops_the_sweep_and_its_workers(tmp_path):
    """A terminated sweep leaves no worker running on (a finished sweep's timing must not be shared)."""
    import signal
    import subprocess
    import sys
    import time

    bench = write_bench(tmp_path)
    cmd = [sys.executable, "-m", "ilora.cli", "sweep", str(bench), "local_steps=50", "--preset", "smoke",
           "--jobs", "2", "--out-dir", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        workers = {c for c in _children(proc.pid) if _alive(c)}
        if len(workers) >= 2:
            break
        time.sleep(0.2)
    assert len(workers) >= 2, "the sweep never started its workers"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("all", None),
        ("extended", ["fedex_lora", "fedsa_lora", "fed_sb", "flexlora", "hetlora", "rolora"]),
        ("[fedit, extended]", ["fedit", "fedex_lora", "fedsa_lora", "fed_sb", "flexlora", "hetlora", "rolora"]),
        ("[paper, fedit]", ["fedit", "ffa_lora", "flora", "ilora", "ilora_s", "lora_fair"]),
    ],
)
def test_method_axis_takes_groups(tmp_path, spec, expected):
    from ilora.algorithm import available_algorithms

    bench = load_benchmark(str(write_bench(tmp_path, BENCH.replace("method: [fedit, ilora]", f"method: {spec}"))))
    methods = [a for a in bench.axes("smoke") if a.name == "method"][0].values
    assert sorted(methods) == sorted(expected or available_algorithms())
    if spec == "all":
        assert list(methods) == available_algorithms()  # the paper's methods first


def test_unknown_method_group_is_named(tmp_path):
    path = write_bench(tmp_path, BENCH.replace("method: [fedit, ilora]", "method: newest"))
    with pytest.raises(ConfigError, match="unknown method group 'newest'.*valid: all"):
        load_benchmark(str(path)).axes("smoke")


def test_sweep_exits_1_after_the_tables_naming_failed_and_diverged_runs(tmp_path, capsys):
    from ilora.cli import main

    bench = write_bench(tmp_path)
    out = tmp_path / "runs"
    runs = expand(load_benchmark(str(bench)), "smoke", out_dir=str(out))
    for run in runs:
        fake_runner(run.config)
    for run, status in zip(runs[:2], ("failed", "diverged")):
        record = json.loads(run.result_path.read_text())
        record.update(status=status, error="RuntimeError: boom" if status == "failed" else None)
        write_record(run.result_path.parent, record)
    args = ["sweep", str(bench), "--preset", "smoke", "--out-dir", str(out), "--report",
            "--results-dir", str(tmp_path / "results")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"failed: {runs[0].run_id}: RuntimeError: boom" in err
    assert f"diverged: {runs[1].run_id}: diverged at round 2" in err
    assert (tmp_path / "results" / "tables" / "smoke" / "tiny.md").exists()  # the tables are written first


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["sweep", "all", "--preset", "smoke", "--jobs", "2", "rounds=1"], ("items", ["all", "rounds=1"])),
        (["sweep", "all", "--preset", "cpu", "wandb=offline"], ("items", ["all", "wandb=offline"])),
        (["report", "--preset", "cpu", "nlp_dirichlet05", "rounds=2"], ("items", ["nlp_dirichlet05", "rounds=2"])),
        (["compare", "--preset", "smoke", "dataset=tweets"], ("overrides", ["dataset=tweets"])),
        (["run", "method=ilora", "rounds=2"], ("overrides", ["method=ilora", "rounds=2"])),
    ],
)
def test_overrides_are_accepted_anywhere_on_the_line(argv, expected):
    from ilora.cli import build_parser, parse_args

    args = parse_args(build_parser(), argv)
    assert getattr(args, expected[0]) == expected[1]


def test_unknown_options_are_one_line_errors(capsys):
    from ilora.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["sweep", "all", "--bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments: --bogus" in err[0]


def test_one_cell_by_name_is_the_sweeps_own_run(capsys):
    from ilora.benchmark import select_cell
    from ilora.cli import main

    bench = load_benchmark("vision_heterogeneous")
    cell = select_cell(bench, "cpu", ["method=ilora", "optimizer=adamw", "seed=44"])
    planned = {r.run_id for r in expand(bench, "cpu")}
    assert cell.run_id in planned and cell.config.out_dir == str(Path("results") / "records" / "cpu")
    assert cell.labels == {"dataset": "fashion_mnist", "model": "efficientnet_lite0", "optimizer": "adamw",
                           "method": "ilora", "seed": "44"}
    assert select_cell(bench, "cpu", ["method=ilora", "optimizer=adamw"]).labels["seed"] == "42"  # the first seed
    for selectors, message in ((["method=ilora"], "name the cell's optimizer (valid: sgd, adamw)"),
                               (["method=ilora", "optimizer=adamw", "lr=3"], "'lr=3' does not name a cell"),
                               (["method=nope", "optimizer=adamw"], "method has no label 'nope'")):
        assert main(["run", "--benchmark", "vision_heterogeneous", "--preset", "cpu", *selectors]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_drill_pause_sleeps_only_at_the_points_named(monkeypatch):
    from ilora.runner import drill_pause

    slept = []
    monkeypatch.setattr("ilora.runner.time.sleep", slept.append)
    monkeypatch.setenv("ILORA_DRILL_PAUSE", "run:1.5, record:0.25")
    drill_pause("run")
    drill_pause("record")
    drill_pause("report")
    monkeypatch.delenv("ILORA_DRILL_PAUSE")
    drill_pause("run")
    assert slept == [1.5, 0.25]
