"""Server optimisers and client-level DP around every method's aggregation (ilora/server_update.py).

Identities: ``fedavgm`` with momentum 0 and server_lr 1, and ``dp=client`` with no noise and a clip no update
reaches, give FedAvg's records bit for bit, for every method where they are defined. Oracles: each optimiser's
update written out by hand in float64, the coverage rule on known tensors, clipping and noise measured.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_backbone, tiny_data, tiny_federation

from ilora.algorithm import available_algorithms, get_algorithm
from ilora.checkpoint import load_checkpoint, save_checkpoint
from ilora.config import RunConfig, resolve_config
from ilora.errors import ConfigError
from ilora.privacy import _epsilon, noise_multiplier
from ilora.server_update import ClientPrivacy, ServerOptimizer, aggregate_round, attach_server_update, clip_update
from ilora.simulation import Simulation, client_sampling_stream

SIZES = [20, 30, 40]


def make_sim(method: str, rounds: int = 3, **settings) -> Simulation:
    backbone = tiny_backbone(seed=0)
    clients = [tiny_data(n, seed=10 + i) for i, n in enumerate(SIZES)]
    fed = tiny_federation(backbone, [2, 4, 6], SIZES, seed=5)
    cfg = RunConfig(method=method, rounds=rounds, batch_size=8, optimizer="adamw", lr=0.01, progress=False, **settings)
    cls = get_algorithm(method)
    algo = cls(fed)
    sigma = cfg.dp_noise_multiplier if cfg.dp == "client" else None
    attach_server_update(algo, cfg, sigma)
    return Simulation(algo, backbone, clients, tiny_data(50, seed=99), cfg,
                      client_sampling_stream(3, 0.67, rounds, seed=5), seed=5)


def outcome(sim: Simulation) -> list[tuple]:
    return [(r.accuracy, r.loss, r.train_loss, r.uplink_bytes) for r in sim.run()]


STATEFUL = [m for m in available_algorithms()
            if get_algorithm(m).server_state_problem(get_algorithm(m).Config()) is None]
WEIGHTED_SUM = [m for m in STATEFUL if get_algorithm(m).aggregation(get_algorithm(m).Config())[0] == "weighted_sum"]


def test_the_methods_with_a_global_tensor_state_are_the_expected_ones():
    assert set(STATEFUL) == {"fedit", "lora_fair", "ffa_lora", "hetlora", "rolora", "fedsa_lora", "fed_sb"}
    assert set(WEIGHTED_SUM) == {"fedit", "ffa_lora", "rolora", "fedsa_lora", "fed_sb"}


@pytest.mark.parametrize("method", STATEFUL)
def test_fedavgm_without_momentum_at_lr_one_is_fedavg_bit_for_bit(method: str):
    plain = make_sim(method)
    expected = outcome(plain)
    sim = make_sim(method, server_optimizer="fedavgm", server_momentum=0.0, server_lr=1.0)
    assert outcome(sim) == expected
    for key, t in plain.algorithm.server_state().items():
        assert torch.equal(sim.algorithm.server_state()[key], t), key


@pytest.mark.parametrize("method", WEIGHTED_SUM)
def test_client_dp_without_noise_and_an_unreached_clip_is_the_plain_run(method: str):
    expected = outcome(make_sim(method))
    assert outcome(make_sim(method, dp="client", dp_clip=1e12, dp_noise_multiplier=0.0)) == expected


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_a_server_optimiser_changes_the_run_and_resumes_exactly(kind: str, tmp_path: Path):
    settings = {"server_optimizer": kind, "server_lr": 0.5 if kind == "fedavgm" else 0.05}
    full = outcome(make_sim("fedit", **settings))
    assert full != outcome(make_sim("fedit"))

    first, done = make_sim("fedit", **settings), []

    def stop_after_two(record):
        done.append({"round": record.round})
        save_checkpoint(tmp_path, first.algorithm, done, "h")
        if record.round == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.run(on_round=stop_after_two)
    second = make_sim("fedit", **settings)
    assert len(load_checkpoint(tmp_path, second.algorithm, "h")) == 2
    assert second.algorithm.server_optimizer.m  # the moments came back from the checkpoint
    assert [(r.accuracy, r.loss, r.train_loss, r.uplink_bytes) for r in second.run(start_round=2)] == full[2:]


# ------------------------------------------------------------------------------ the optimisers, by hand
def test_each_optimiser_step_matches_the_papers_formulas():
    base = [torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([0.7, -2.5, 0.5], dtype=torch.float64)]
    agg = [torch.tensor([1.5, -2.0, 0.0], dtype=torch.float64), torch.tensor([0.2, -2.0, 0.9], dtype=torch.float64)]
    lr, beta, b1, b2, tau = 0.3, 0.8, 0.9, 0.99, 1e-3
    for kind in ("fedavgm", "fedadagrad", "fedadam", "fedyogi"):
        opt = ServerOptimizer(kind, lr, beta, b1, b2, tau)
        m = [0.0, 0.0, 0.0]
        v = [tau**2] * 3
        for x, a in zip(base, agg):
            got = opt.step("w", x, a)
            for j in range(3):
                d = float(a[j] - x[j])
                if kind == "fedavgm":
                    m[j] = beta * m[j] + d
                    want = float(x[j]) + lr * m[j]
                else:
                    m[j] = b1 * m[j] + (1 - b1) * d
                    if kind == "fedadagrad":
                        v[j] = v[j] + d * d
                    elif kind == "fedadam":
                        v[j] = b2 * v[j] + (1 - b2) * d * d
                    else:
                        v[j] = v[j] - (1 - b2) * d * d * math.copysign(1.0, v[j] - d * d) * (v[j] != d * d)
                    want = float(x[j]) + lr * m[j] / (math.sqrt(v[j]) + tau)
                assert float(got[j]) == pytest.approx(want, rel=1e-12, abs=1e-15), (kind, j)


def test_the_pseudo_gradient_leaves_out_the_zero_padding_of_entries_a_client_never_held():
    """FedIT's zero-padded average shrinks rows only the rank-6 client trains; untrained, that shrink is the
    method's own and not a step: with every client returning exactly what it received, FedAdam gives FedIT's
    aggregate, and a change by one client moves its entries by its weight times the change (through Adam)."""
    backbone = tiny_backbone(seed=0)
    fed = tiny_federation(backbone, [2, 4, 6], SIZES, seed=5)
    plain, adam = get_algorithm("fedit")(fed), get_algorithm("fedit")(fed)
    adam.server_optimizer = ServerOptimizer("fedadam", lr=0.1)
    plain.B = {n: torch.randn_like(b) for n, b in plain.B.items()}
    adam.B = {n: b.clone() for n, b in plain.B.items()}
    weights = {c: n / sum(SIZES) for c, n in enumerate(SIZES)}
    uploads = {c: plain.download(c)[1].flat() for c in range(3)}
    plain.aggregate(uploads, weights)
    aggregate_round(adam, uploads, weights, 0)
    for key, t in plain.server_state().items():
        assert torch.allclose(adam.server_state()[key], t, atol=1e-12), key
    # rows 4, 5 of A: only client 2 held them; FedIT shrank them to p_2 times their value, Adam took no step
    name = next(iter(fed.layers))
    assert torch.allclose(adam.A[name][4:], weights[2] * uploads[2][f"lora_A/{name}"][4:], atol=1e-12)


def test_tensors_a_method_does_not_send_keep_their_values_and_moments():
    backbone = tiny_backbone(seed=0)
    fed = tiny_federation(backbone, [2, 4, 6], SIZES, seed=5)
    algo = get_algorithm("ffa_lora")(fed)
    algo.server_optimizer = ServerOptimizer("fedadam", lr=0.1)
    A_before = {n: a.clone() for n, a in algo.A.items()}
    uploads = {c: algo.upload(c, algo.download(c)[1]) for c in range(3)}
    uploads = {c: {k: t + 0.01 if k.startswith("lora_B/") else t for k, t in u.items()} for c, u in uploads.items()}
    aggregate_round(algo, uploads, {0: 0.2, 1: 0.3, 2: 0.5}, 0)
    assert all(torch.equal(algo.A[n], A_before[n]) for n in A_before)
    assert not any(k.startswith("lora_A/") for k in algo.server_optimizer.m)


# ------------------------------------------------------------------------------ client-level DP
def test_clipping_scales_the_whole_update_to_the_clip_and_leaves_small_ones_alone():
    backbone = tiny_backbone(seed=0)
    fed = tiny_federation(backbone, [2, 4, 6], SIZES, seed=5)
    algo = get_algorithm("fedit")(fed)
    _, start = algo.download(1)
    origin = start.flat()
    upload = {k: t + 0.5 for k, t in origin.items()}
    norm = math.sqrt(sum(0.25 * t.numel() for t in origin.values()))
    clipped = clip_update(upload, start, clip=1.0)
    moved = math.sqrt(sum(float(((clipped[k] - origin[k]) ** 2).sum()) for k in origin))
    assert moved == pytest.approx(1.0, rel=1e-9)
    ratio = {k: (clipped[k] - origin[k]) / 0.5 for k in origin}
    assert all(torch.allclose(r, torch.full_like(r, 1.0 / norm)) for r in ratio.values())  # one factor for all
    assert clip_update(upload, start, clip=10 * norm) == upload


def test_the_noise_has_the_stated_spread_and_is_the_same_for_the_same_seed_and_round():
    privacy = ClientPrivacy(clip=2.0, noise_multiplier=1.5, seed=7)
    backbone = tiny_backbone(seed=0)
    fed = tiny_federation(backbone, [2, 4, 6], SIZES, seed=5)
    algo = get_algorithm("fedit")(fed)
    weights = {0: 0.2, 1: 0.3, 2: 0.5}
    std = privacy.noise_std(algo, weights)
    assert std == pytest.approx(1.5 * 2.0 * 0.5)
    zeros = {"w": torch.zeros(200_000, dtype=torch.float64)}
    noisy = privacy.add_noise(zeros, std, round_index=3)["w"]
    assert float(noisy.std()) == pytest.approx(std, rel=0.01)
    assert torch.equal(noisy, privacy.add_noise(zeros, std, round_index=3)["w"])
    assert not torch.equal(noisy, privacy.add_noise(zeros, std, round_index=4)["w"])


def test_client_dp_noise_changes_the_run_the_same_way_every_time():
    noisy = outcome(make_sim("fedit", dp="client", dp_clip=0.5, dp_noise_multiplier=1.0))
    assert noisy == outcome(make_sim("fedit", dp="client", dp_clip=0.5, dp_noise_multiplier=1.0))
    assert noisy != outcome(make_sim("fedit"))


def test_client_level_epsilon_is_below_the_classic_bound_and_a_solved_sigma_meets_its_budget():
    # q = 1: each round is a Gaussian mechanism, RDP alpha / (2 sigma^2); the classic conversion bounds epsilon
    sigma, rounds, delta = 2.0, 5, 1e-5
    orders = [1 + x / 10 for x in range(1, 2000)]
    classic = min(rounds * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1) for a in orders)
    eps = _epsilon(sigma, 1.0, rounds, delta)
    assert 0 < eps <= classic
    assert _epsilon(2 * sigma, 1.0, rounds, delta) < eps
    cfg = RunConfig(dp="client", dp_epsilon=8.0, num_clients=3, rounds=5)
    solved = noise_multiplier(cfg, SIZES, [[0, 1, 2]] * 5)
    assert _epsilon(solved, 1.0, 5, 1e-5) == pytest.approx(8.0, abs=0.05)


# ------------------------------------------------------------------------------ refusals, one line each
@pytest.mark.parametrize("method", sorted(set(available_algorithms()) - set(STATEFUL)))
def test_methods_without_a_tensor_state_refuse_a_server_optimiser_with_the_reason(method: str):
    with pytest.raises(ConfigError) as err:
        resolve_config([f"method={method}", "server_optimizer=fedadam"])
    message = str(err.value)
    assert "\n" not in message and f"not defined for method {method}" in message and "valid: fedavg" in message


@pytest.mark.parametrize("method", sorted(set(available_algorithms()) - set(WEIGHTED_SUM)))
def test_methods_whose_aggregate_is_not_a_fixed_weighted_sum_refuse_client_dp(method: str):
    with pytest.raises(ConfigError, match=f"dp=client is not defined for method {method}"):
        resolve_config([f"method={method}", "dp=client", "dp_epsilon=8"])


@pytest.mark.parametrize("overrides, field", [
    (["server_optimizer=adam"], "server_optimizer"),
    (["server_lr=0"], "server_lr"),
    (["server_momentum=1"], "server_momentum"),
    (["server_beta2=-0.1"], "server_beta2"),
    (["server_tau=0"], "server_tau"),
    (["dp=local"], "dp"),
    (["dp=client"], "dp=client needs exactly one"),
    (["dp=client", "dp_epsilon=1", "dp_noise_multiplier=1"], "dp=client needs exactly one"),
    (["dp_epsilon=1"], "dp_noise_multiplier and dp_epsilon need"),
    (["dp=client", "dp_epsilon=8", "dp_delta=1"], "dp_delta"),
    (["dp=sample", "dp_epsilon=8", "dp_clip=0"], "dp_clip"),
    (["method=ilora_s", "dp=client", "dp_epsilon=8", "method_args.aggregate=fedavg"], "control variates"),
    (["method=fed_sb", "dp=sample", "dp_epsilon=8"], "initialisation reads the clients' data"),
])
def test_bad_optimiser_and_privacy_settings_fail_in_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        resolve_config(overrides)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_ilora_with_fedavg_aggregation_takes_a_server_optimiser_and_client_dp():
    cfg = resolve_config(["method=ilora", "method_args.aggregate=fedavg", "server_optimizer=fedyogi", "dp=client",
                          "dp_noise_multiplier=0.1"])
    assert cfg.server_optimizer == "fedyogi"


def test_new_keys_at_their_defaults_leave_run_ids_unchanged():
    from ilora.config import config_hash

    plain = resolve_config(["method=fedit"])
    same = resolve_config(["method=fedit", "server_optimizer=fedavg", "dp=none", "fedprox_mu=0", "server_tau=1e-3"])
    assert config_hash(plain) == config_hash(same)
    assert config_hash(plain) != config_hash(resolve_config(["method=fedit", "server_optimizer=fedadam"]))


# ------------------------------------------------------------------------------ both engines, one record
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("flwr") is None, reason="needs the flower extra")
def test_flower_gives_the_in_process_records_with_a_server_optimiser_and_client_dp(tmp_path: Path):
    from ilora.flower.simulation import run_on_flower
    from ilora.runner import run_experiment

    overrides = ["preset=smoke", "method=fedit", "rounds=3", "participation=0.67", "threads=1",
                 "server_optimizer=fedadam", "dp=client", "dp_clip=0.5", "dp_noise_multiplier=0.3"]
    local = run_experiment(resolve_config([*overrides, f"out_dir={tmp_path / 'local'}"]))
    flower = run_on_flower(resolve_config([*overrides, f"out_dir={tmp_path / 'flower'}", "engine=flower"]))
    assert local["status"] == flower["status"] == "ok"
    keys = ("round", "clients", "accuracy", "loss", "train_loss", "uplink_bytes")
    assert [{k: r[k] for k in keys} for r in local["rounds"]] == [{k: r[k] for k in keys} for r in flower["rounds"]]
    assert local["privacy"] == flower["privacy"] and local["privacy"]["epsilon"] > 0


def test_the_docs_table_says_what_ilora_list_says():
    from ilora.cli import federated_option_rows

    text = (Path(__file__).resolve().parent.parent / "docs" / "privacy.md").read_text()
    documented = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 6:
            documented[cells[0].strip("`")] = cells[1:5]
    assert documented == {row[0]: row[1:5] for row in federated_option_rows()}


def test_a_budget_no_noise_reaches_fails_in_one_line_before_the_model_and_writes_nothing(tmp_path: Path):
    from ilora.runner import run_experiment

    cfg = resolve_config(["preset=smoke", "dp=client", "dp_epsilon=0.01", f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="dp_epsilon 0.01 is too small"):
        run_experiment(cfg)
    assert not (tmp_path / "out").exists()
