"""The W&B mirror: disabled by default, offline with no account, grouped by table cell, never leaking secrets."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from wandb_files import offline_run, offline_runs

from ilora.benchmark import expand, load_benchmark, plan, wandb_group
from ilora.config import PUBLIC_KEYS, config_hash, resolve_config, to_dict
from ilora.runner import run_id_for
from ilora.tracking import HIDDEN_KEYS, ROUND_KEYS, NullTracker, WandbTracker, create_tracker, summary_of, wandb_config

SECRET = "ilora-test-secret-key-0123456789abcdef0123"


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """W&B's own directories inside ``tmp_path``, a fake API key in the environment, no mode forced."""
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    for name in ("CACHE", "CONFIG", "DATA"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / f"wandb-{name.lower()}"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return tmp_path


def test_disabled_by_default(tmp_path):
    cfg = resolve_config(["preset=smoke", f"out_dir={tmp_path}"])
    assert cfg.wandb == "disabled"
    tracker = create_tracker(cfg, "run-a")
    assert isinstance(tracker, NullTracker)
    tracker.log_round({"round": 1, "accuracy": 0.5})
    tracker.finish(None)
    assert not any(tmp_path.iterdir())


def test_summary_of_record():
    record = {"status": "ok", "final_accuracy": 0.7, "best_accuracy": 0.8, "partition_hash": "h",
              "rounds": [{"uplink_bytes": 2_000_000, "downlink_bytes": 1_000_000, "wall_s": 1.5}] * 2}
    s = summary_of(record)
    assert s["uplink_mb_total"] == 4.0 and s["downlink_mb_total"] == 2.0 and s["wall_s_total"] == 3.0
    assert s["final_accuracy"] == 0.7 and s["rounds"] == 2


def test_wandb_config_is_the_resolved_config_without_bookkeeping(monkeypatch):
    monkeypatch.setenv("ILORA_FAKE_SECRET", SECRET)
    cfg = resolve_config(["preset=smoke", "wandb=offline", "wandb_group=g", "wandb_tags=[t1]", "run_id=r"])
    config = wandb_config(cfg)
    assert set(config) == set(PUBLIC_KEYS) - set(HIDDEN_KEYS)
    assert all(config[k] == v for k, v in to_dict(cfg).items() if k in config)
    assert "out_dir" not in config and "wandb_group" not in config
    assert SECRET not in repr(config)


def test_group_and_tags_stay_out_of_the_run_identity(tmp_path):
    base = ["preset=smoke", f"out_dir={tmp_path}"]
    plain = resolve_config(base)
    tagged = resolve_config([*base, "wandb_group=a/b", "wandb_tags=[x,y]", "wandb_project=p", "wandb=offline"])
    assert config_hash(plain) == config_hash(tagged) and run_id_for(plain) == run_id_for(tagged)


BENCH = """
name: {name}
table: {{rows: [method], columns: [dataset]}}
presets:
  smoke:
    base: {{rounds: 1}}
    grid:
      dataset: [bbc_news]
      method: {methods}
      seed: [1, 2]
"""


def _bench(root: Path, name: str, methods: str):
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(BENCH.format(name=name, methods=methods)))
    return load_benchmark(str(path))


def test_a_group_holds_the_seeds_of_one_method_in_one_cell(tmp_path):
    bench = _bench(tmp_path, "tiny", "[fedit, ilora]")
    runs = expand(bench, "smoke", out_dir=str(tmp_path / "runs"))
    groups = {}
    for run in runs:
        groups.setdefault(run.config.wandb_group, []).append(run.labels["seed"])
        assert run.config.wandb_tags == ["tiny"]
    assert groups == {"tiny/smoke/dataset=bbc_news/method=fedit": ["1", "2"],
                      "tiny/smoke/dataset=bbc_news/method=ilora": ["1", "2"]}
    assert wandb_group("b", "cpu", {"dataset": "d", "method": "m", "seed": "1"}) == "b/cpu/dataset=d/method=m"
    # a user's wandb_group on the command line wins
    assert {r.config.wandb_group for r in expand(bench, "smoke", ["wandb_group=mine"], str(tmp_path))} == {"mine"}


def test_a_run_shared_by_benchmarks_takes_the_group_of_the_first_name_and_every_tag(tmp_path):
    zeta = _bench(tmp_path, "zeta", "[fedit, ilora]")
    alpha = _bench(tmp_path, "alpha", "[ilora]")
    out = str(tmp_path / "runs")
    for order in ([zeta, alpha], [alpha, zeta]):
        runs = plan(order, "smoke", out_dir=out)
        assert len(runs) == 4
        shared = [r for r in runs if r.labels["method"] == "ilora"]
        assert {r.config.wandb_group for r in shared} == {"alpha/smoke/dataset=bbc_news/method=ilora"}
        assert all(r.config.wandb_tags == ["alpha", "zeta"] and r.benchmark == "alpha" for r in shared)
        only = [r for r in runs if r.labels["method"] == "fedit"]
        assert all(r.config.wandb_tags == ["zeta"] for r in only)
    # seed-major (a sweep stopped early leaves whole seeds), then the order the benchmarks were given
    assert [r.labels["method"] for r in plan([zeta, alpha], "smoke", out_dir=out)] == ["fedit", "ilora"] * 2


def test_offline_mirror_without_account(wandb_home):
    out = wandb_home / "runs"
    cfg = resolve_config(["preset=smoke", "wandb=offline", f"out_dir={out}", "wandb_project=proj-x",
                          "wandb_group=table/cell-7", "wandb_tags=[bench-a]", "method=fedit"])
    tracker = create_tracker(cfg, "fedit-run-1")
    assert isinstance(tracker, WandbTracker)
    rounds = [{"round": t, "accuracy": 0.25 * t, "loss": 1.0 / t, "train_loss": 2.0 / t, "uplink_bytes": 10 * t,
               "downlink_bytes": 20, "train_s": 0.5, "aggregate_s": 0.01, "eval_s": 0.2, "compute_s": 0.4,
               "wall_s": 0.7, "clients": [0, 1, 2], "client_accuracy": [0.1, 0.2, 0.3]} for t in (1, 2, 3)]
    for row in rounds:
        tracker.log_round(row)
    tracker.finish({"status": "ok", "error": None, "final_accuracy": 0.75, "best_accuracy": 0.75, "rounds": rounds,
                    "config_hash": config_hash(cfg), "device": "cpu", "versions": {"torch": "2.x"}})

    (directory,) = offline_runs(out / "fedit-run-1" / "wandb")
    run = offline_run(directory)
    assert run.run.project == "proj-x" and run.run.run_group == "table/cell-7"
    assert run.run.job_type == "fedit" and run.run.display_name == "fedit-run-1"
    assert list(run.run.tags) == ["bench-a", "smoke", cfg.dataset, cfg.model, "fedit"]
    assert run.config == wandb_config(cfg)
    # one history row per round, at step = round, with exactly the round metrics
    assert [h["_step"] for h in run.history] == [1, 2, 3]
    for h, row in zip(run.history, rounds):
        assert {k: v for k, v in h.items() if not k.startswith("_")} == {k: row[k] for k in ROUND_KEYS}
    assert run.summary["final_accuracy"] == 0.75 and run.summary["rounds"] == 3 and run.summary["status"] == "ok"
    assert run.summary["config_hash"] == config_hash(cfg) and run.summary["versions"] == {"torch": "2.x"}
    # no environment record (command line, program, git, host facts), no package list, no code
    assert "environment" not in run.kinds and run.run.host == ""
    assert not run.files.exists() or not any(p.is_file() for p in run.files.rglob("*"))
    # the API key reaches no file the run wrote, W&B's own directories included
    for path in Path(wandb_home).rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
