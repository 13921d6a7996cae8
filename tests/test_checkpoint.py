"""A killed run resumes from its last round and computes exactly what an uninterrupted run does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_backbone, tiny_data, tiny_federation

from ilora.algorithm import available_algorithms, get_algorithm
from ilora.checkpoint import load_checkpoint, save_checkpoint
from ilora.config import RunConfig, resolve_config
from ilora.runner import run_experiment
from ilora.simulation import Simulation, client_sampling_stream


def make_sim(method: str, rounds: int = 3) -> Simulation:
    backbone = tiny_backbone(seed=0)
    sizes = [20, 30, 40]
    clients = [tiny_data(n, seed=10 + i) for i, n in enumerate(sizes)]
    fed = tiny_federation(backbone, [2, 4, 6], sizes, seed=5)
    cfg = RunConfig(rounds=rounds, batch_size=8, optimizer="adamw", lr=0.01, progress=False)
    algo = get_algorithm(method)(fed)
    return Simulation(algo, backbone, clients, tiny_data(50, seed=99), cfg,
                      client_sampling_stream(3, 0.67, rounds, seed=5), seed=5)


@pytest.mark.parametrize("method", available_algorithms())
def test_resume_equals_uninterrupted(method: str, tmp_path: Path):
    full = [(r.accuracy, r.loss, r.uplink_bytes) for r in make_sim(method).run()]

    first = make_sim(method)
    done = []

    def stop_after_two(record):
        done.append({"round": record.round})
        save_checkpoint(tmp_path, first.algorithm, done, "h")
        if record.round == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.run(on_round=stop_after_two)

    second = make_sim(method)  # a new process: fresh backbone and algorithm
    rounds = load_checkpoint(tmp_path, second.algorithm, "h")
    assert len(rounds) == 2
    resumed = [(r.accuracy, r.loss, r.uplink_bytes) for r in second.run(start_round=2)]
    assert resumed == full[2:]
    assert load_checkpoint(tmp_path, make_sim(method).algorithm, "other-config") == []


def run_with_tiny_model(cfg: RunConfig, trained_rounds: list[int], kill_after: int | None = None) -> dict:
    """``run_experiment`` (the CLI's path: checkpoint after every round, resume from the last one) with the
    tiny model in place of the config's; ``trained_rounds`` gets the 0-based round of every client's local
    training; with ``kill_after`` the run is killed once that round is recorded and checkpointed."""

    def build(cfg: RunConfig) -> tuple[Simulation, dict]:
        sim = make_sim(cfg.method, rounds=cfg.rounds)
        train = sim.train_client

        def recording(round_index: int, cid: int, model):
            trained_rounds.append(round_index)
            return train(round_index, cid, model)

        sim.train_client = recording
        return sim, {}

    class Kill:
        def log_round(self, row: dict) -> None:
            if row["round"] == kill_after:
                raise KeyboardInterrupt

    return run_experiment(cfg, tracker=Kill() if kill_after else None, build=build)


@pytest.mark.parametrize("rounds_done", [1, 2, 3])
def test_a_resumed_run_continues_at_the_round_after_its_checkpoint(rounds_done: int, tmp_path: Path):
    """Killed after round k, the same command trains round k + 1 onwards: it neither redoes round k nor
    skips to k + 2, and its record has rounds 1..4 once each with an uninterrupted run's numbers."""
    cfg = resolve_config(["preset=smoke", "method=ilora_s", "rounds=4", "threads=1", f"out_dir={tmp_path}"])
    before, after = [], []
    with pytest.raises(KeyboardInterrupt):
        run_with_tiny_model(cfg, before, kill_after=rounds_done)
    assert sorted(set(before)) == list(range(rounds_done))
    record = run_with_tiny_model(cfg, after)
    assert sorted(set(after)) == list(range(rounds_done, 4))  # 0-based: round k + 1 is index k
    assert [r["round"] for r in record["rounds"]] == [1, 2, 3, 4]
    uninterrupted = [(r.round, r.accuracy, r.loss) for r in make_sim("ilora_s", rounds=4).run()]
    assert [(r["round"], r["accuracy"], r["loss"]) for r in record["rounds"]] == uninterrupted
    assert record["status"] == "ok" and not (tmp_path / record["run_id"] / "checkpoint").exists()


@pytest.mark.slow
def test_killed_cli_run_resumes(tmp_path: Path):
    class KillAtRound2:
        def log_round(self, row):
            if row["round"] == 2:
                raise KeyboardInterrupt

    overrides = ["preset=smoke", "rounds=3", f"out_dir={tmp_path}"]
    with pytest.raises(KeyboardInterrupt):
        run_experiment(resolve_config(overrides), tracker=KillAtRound2())
    (run_dir,) = list(tmp_path.iterdir())
    assert not (run_dir / "result.json").exists() and (run_dir / "checkpoint" / "checkpoint-2.json").exists()
    resumed = run_experiment(resolve_config(overrides))
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert not (run_dir / "checkpoint").exists()
    uninterrupted = run_experiment(resolve_config([*overrides[:-1], f"out_dir={tmp_path / 'u'}"]))
    keys = ("accuracy", "loss", "uplink_bytes")
    assert [[r[k] for k in keys] for r in resumed["rounds"]] == [[r[k] for k in keys] for r in uninterrupted["rounds"]]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"


def interrupted_after(method: str, directory: Path, rounds_done: int) -> None:
    """Run ``method`` with a checkpoint after every round and stop after ``rounds_done`` rounds."""
    sim = make_sim(method, rounds=4)
    done = []

    def checkpoint(record):
        done.append({"round": record.round})
        save_checkpoint(directory, sim.algorithm, done, "h")
        if record.round == rounds_done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sim.run(on_round=checkpoint)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


DAMAGES = {
    "truncated tensors": lambda d, n: truncate(d / f"state-{n}.safetensors"),
    "flipped tensor byte": lambda d, n: (d / f"state-{n}.safetensors").write_bytes(
        (lambda b: b[:-9] + bytes([b[-9] ^ 0xFF]) + b[-8:])((d / f"state-{n}.safetensors").read_bytes())),
    "missing tensors": lambda d, n: (d / f"state-{n}.safetensors").unlink(),
    "truncated json": lambda d, n: truncate(d / f"checkpoint-{n}.json"),
    "json of another shape": lambda d, n: (d / f"checkpoint-{n}.json").write_text("[1, 2]"),
}


def test_only_the_last_two_checkpoints_are_kept(tmp_path: Path):
    interrupted_after("fedit", tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-2.json", "checkpoint-3.json", "state-2.safetensors", "state-3.safetensors"]


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("method", ["ilora_s", "flora"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(method: str, damage: str, tmp_path: Path, capsys):
    full = [(r.accuracy, r.loss, r.uplink_bytes) for r in make_sim(method, rounds=4).run()]
    interrupted_after(method, tmp_path, 3)
    DAMAGES[damage](tmp_path, 3)
    second = make_sim(method, rounds=4)
    rounds = load_checkpoint(tmp_path, second.algorithm, "h")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint after round 3" in err[0] and "resuming after round 2" in err[0]
    assert len(rounds) == 2
    resumed = [(r.accuracy, r.loss, r.uplink_bytes) for r in second.run(start_round=2)]
    assert resumed == full[2:]


def test_with_every_checkpoint_damaged_the_run_starts_over(tmp_path: Path, capsys):
    full = [(r.accuracy, r.loss, r.uplink_bytes) for r in make_sim("fedit", rounds=4).run()]
    interrupted_after("fedit", tmp_path, 3)
    DAMAGES["truncated tensors"](tmp_path, 3)
    DAMAGES["truncated json"](tmp_path, 2)
    sim = make_sim("fedit", rounds=4)
    assert load_checkpoint(tmp_path, sim.algorithm, "h") == []
    assert "starting over" in capsys.readouterr().err
    assert [(r.accuracy, r.loss, r.uplink_bytes) for r in sim.run()] == full
