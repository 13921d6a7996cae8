"""FlexLoRA, HetLoRA, FedSA-LoRA, FedEx-LoRA, RoLoRA and Fed-SB: each method's rule checked in float64
against a dense reference built from the clients' own models (heterogeneous ranks 2, 4, 6)."""

from __future__ import annotations

import pytest
import torch
from test_baselines import RANKS, WEIGHTS, make_algo, rand

from ilora.algorithm import ClientModel
from ilora.lowrank import pad_A, pad_B


def dense(model: ClientModel, name: str) -> torch.Tensor:
    """The dense update a model adds to ``W0`` in one layer: base delta + ``s B (R) A`` - offsets."""
    A = model.A[name] if model.R is None else model.R[name] @ model.A[name]
    delta = model.scale * model.B[name] @ A
    if name in model.offsets:
        A0, B0, s0 = model.offsets[name]
        delta = delta - s0 * B0 @ A0
    if model.base_delta is not None:
        delta = delta + model.base_delta[name]
    return delta


def train_randomly(algo, fed, seed: int, clients=None):
    """Every client downloads, 'trains' (its trained factors replaced by random ones) and uploads.

    Returns the uploads and each client's trained model (what its own dense update is)."""
    uploads, trained = {}, {}
    for cid in clients if clients is not None else range(fed.num_clients):
        _, model = algo.download(cid)
        new = {}
        for which in model.trained_factors:
            new[which] = {n: rand(*t.shape, seed=seed + 100 * cid + 10 * i + len(which))
                          for i, (n, t) in enumerate(getattr(model, which).items())}
        head = {n: h + 0.1 * (cid + 1) for n, h in model.head.items()}
        trained[cid] = ClientModel(
            A=new.get("A", model.A), B=new.get("B", model.B), head=head, scale=model.scale, offsets=model.offsets,
            base_delta=model.base_delta, train_A=model.train_A, train_B=model.train_B,
            R=new.get("R", model.R), train_R=model.train_R,
        )
        uploads[cid] = algo.upload(cid, trained[cid])
    return uploads, trained


def average_update(trained, weights, name):
    total = sum(weights[c] for c in trained)
    return sum(weights[c] / total * dense(m, name) for c, m in trained.items())


# ------------------------------------------------------------------------------------------- FedEx-LoRA
def test_fedex_lora_global_model_is_exactly_the_average_of_the_clients_models():
    algo, fed = make_algo("fedex_lora")
    for round_seed in (0, 1000):  # two rounds: the residual accumulates in the base
        uploads, trained = train_randomly(algo, fed, round_seed)
        algo.aggregate(uploads, WEIGHTS)
        ev = algo.eval_model()
        for name in fed.layers:
            torch.testing.assert_close(dense(ev, name), average_update(trained, WEIGHTS, name), rtol=0, atol=1e-10)
            assert torch.equal(ev.A[name], sum(WEIGHTS[c] * pad_A(uploads[c][f"lora_A/{name}"], 6) for c in range(3)))


def test_fedex_lora_sends_the_dense_base_only_when_it_changed():
    algo, fed = make_algo("fedex_lora")
    msg, _ = algo.download(0)
    assert not any(k.startswith("base/") for k in msg)
    uploads, _ = train_randomly(algo, fed, 0)
    algo.aggregate(uploads, WEIGHTS)
    msg, _ = algo.download(0)
    spec = fed.layers["proj"]
    assert msg["base/proj"].shape == (spec.out_features, spec.in_features)
    again, _ = algo.download(0)  # already has this base
    assert not any(k.startswith("base/") for k in again)


# ------------------------------------------------------------------------------------------- RoLoRA
@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_rolora_alternates_and_its_average_is_exact(rounds):
    algo, fed = make_algo("rolora")
    for t in range(rounds):
        msg, _ = algo.download(1)
        assert {k.split("/")[0] for k in msg} == {"lora_A", "lora_B", "head"}
        uploads, trained = train_randomly(algo, fed, 10 * t)
        sent = {k.split("/")[0] for k in uploads[1]}
        assert sent == ({"lora_B", "head"} if t % 2 == 0 else {"lora_A", "head"}), t
        algo.aggregate(uploads, WEIGHTS)
        ev = algo.eval_model()
        for name in fed.layers:
            torch.testing.assert_close(dense(ev, name), average_update(trained, WEIGHTS, name), rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------- FedSA-LoRA
def test_fedsa_lora_shares_only_A_and_keeps_B_and_head_on_the_client():
    algo, fed = make_algo("fedsa_lora")
    msg, _ = algo.download(2)
    assert {k.split("/")[0] for k in msg} == {"lora_A"} and msg["lora_A/proj"].shape[0] == 6
    uploads, trained = train_randomly(algo, fed, 3)
    assert all({k.split("/")[0] for k in up} == {"lora_A"} for up in uploads.values())
    algo.aggregate(uploads, WEIGHTS)
    models = algo.client_eval_models()
    for cid, r in enumerate(RANKS):
        for name in fed.layers:
            A_bar = sum(WEIGHTS[c] * pad_A(uploads[c][f"lora_A/{name}"], 6) for c in range(3))
            assert torch.equal(models[cid].A[name], A_bar[:r])
            assert torch.equal(models[cid].B[name], trained[cid].B[name])  # its own B, never averaged
        assert all(torch.equal(models[cid].head[n], trained[cid].head[n]) for n in trained[cid].head)
        _, start = algo.download(cid)  # next round starts from the shared A and its own B
        assert torch.equal(start.B["proj"], trained[cid].B["proj"])


# ------------------------------------------------------------------------------------------- FlexLoRA
def test_flexlora_global_model_is_the_average_update_and_clients_get_its_best_truncation():
    algo, fed = make_algo("flexlora")
    uploads, trained = train_randomly(algo, fed, 7)
    algo.aggregate(uploads, WEIGHTS)
    ev = algo.eval_model()
    for name in fed.layers:
        W = average_update(trained, WEIGHTS, name)
        torch.testing.assert_close(dense(ev, name), W, rtol=0, atol=1e-10)
        U, S, Vh = torch.linalg.svd(W)
        for cid, r in enumerate(RANKS):
            _, model = algo.download(cid)
            best = U[:, :r] * S[:r] @ Vh[:r]  # Eckart-Young: the best rank-r approximation
            torch.testing.assert_close(dense(model, name), best, rtol=0, atol=1e-10)
            # the singular values sit in B: A has orthonormal rows
            torch.testing.assert_close(model.A[name] @ model.A[name].T, torch.eye(r, dtype=torch.float64),
                                       rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------- HetLoRA
def test_hetlora_weights_by_the_norm_of_each_product():
    algo, fed = make_algo("hetlora", prune=False)
    uploads, _ = train_randomly(algo, fed, 11)
    algo.aggregate(uploads, WEIGHTS)
    for name in fed.layers:
        As = [uploads[c][f"lora_A/{name}"] for c in range(3)]
        Bs = [uploads[c][f"lora_B/{name}"] for c in range(3)]
        norms = [float(torch.linalg.matrix_norm(b @ a)) for a, b in zip(As, Bs)]
        w = [x / sum(norms) for x in norms]
        torch.testing.assert_close(algo.A[name], sum(wi * pad_A(a, 6) for wi, a in zip(w, As)), rtol=0, atol=1e-12)
        torch.testing.assert_close(algo.B[name], sum(wi * pad_B(b, 6) for wi, b in zip(w, Bs)), rtol=0, atol=1e-12)


def test_hetlora_prunes_when_the_tail_shrinks_and_then_sends_the_smaller_rank():
    algo, fed = make_algo("hetlora")
    algo.B = {n: rand(*b.shape, seed=9) for n, b in algo.B.items()}  # a trained global pair (B = 0 has no tail)
    _, model = algo.download(2)  # rank 6: the tail is component 6 (k = floor(0.99 * 6) = 5)
    shrunk = ClientModel(A={n: a.clone() for n, a in model.A.items()}, B=model.B,
                         head=model.head, scale=model.scale)
    for n in shrunk.A:
        shrunk.A[n][5:] = 0.0  # the tail score falls to zero
    up = algo.upload(2, shrunk)
    assert up["lora_A/proj"].shape[0] == 5 and up["lora_B/proj"].shape[1] == 5
    assert algo.rank_of(2) == 5
    msg, again = algo.download(2)
    assert again.rank == 5 and again.scale == fed.scale(6)  # the scale of its initial rank is kept
    spec = fed.layers["proj"]
    assert msg["lora_A/proj"].numel() + msg["lora_B/proj"].numel() == 5 * (spec.in_features + spec.out_features)
    # a tail that grows does not prune
    _, model = algo.download(0)
    grown = ClientModel(A={n: a * 3.0 for n, a in model.A.items()}, B={n: b + 1.0 for n, b in model.B.items()},
                        head=model.head, scale=model.scale)
    algo.upload(0, grown)
    assert algo.rank_of(0) == 2


def test_hetlora_regulariser_is_the_tail_product():
    algo, fed = make_algo("hetlora", lam=0.5)
    _, model = algo.download(1)
    params = {f"lora_A/{n}": rand(*a.shape, seed=3) for n, a in model.A.items()}
    params |= {f"lora_B/{n}": rand(*b.shape, seed=4) for n, b in model.B.items()}
    expected = sum(0.5 * torch.linalg.vector_norm(params[f"lora_A/{n}"][3:])
                   * torch.linalg.vector_norm(params[f"lora_B/{n}"][:, 3:]) for n in fed.layers)
    torch.testing.assert_close(algo.local_loss(1, params), expected)


# ------------------------------------------------------------------------------------------- Fed-SB
def test_fed_sb_averages_R_exactly_and_sends_r_squared():
    algo, fed = make_algo("fed_sb")
    g = {n: rand(s.out_features, s.in_features, seed=i) for i, (n, s) in enumerate(fed.layers.items())}
    algo.initialize(lambda n: g)
    for name in fed.layers:  # LoRA-SB's init: B R0 A is the rank-r_max SVD truncation of -step * sign(grad)
        U, S, Vh = torch.linalg.svd(-algo.config.init_step * torch.sign(g[name]))
        torch.testing.assert_close(algo.B[name] @ algo.R[name] @ algo.A[name], U[:, :6] * S[:6] @ Vh[:6],
                                   rtol=0, atol=1e-12)
    msg, _ = algo.download(1)
    assert {k.split("/")[0] for k in msg} == {"lora_A", "lora_B", "lora_R", "head"}  # first download: B, A once
    again, _ = algo.download(1)
    assert again["lora_R/proj"].shape == (4, 4) and "lora_A/proj" not in again
    uploads, trained = train_randomly(algo, fed, 5)
    assert all(set(k.split("/")[0] for k in up) == {"lora_R", "head"} for up in uploads.values())
    algo.aggregate(uploads, WEIGHTS)
    ev = algo.eval_model()
    for name in fed.layers:
        torch.testing.assert_close(dense(ev, name), average_update(trained, WEIGHTS, name), rtol=0, atol=1e-10)


def test_fed_sb_initialises_from_the_simulators_weight_gradient(tiny):
    """The gradient the simulator hands over is dL/dW of the mean loss (checked against autograd on W)."""
    from conftest import tiny_data

    from ilora.config import RunConfig
    from ilora.simulation import Simulation

    data = [tiny_data(8, seed=1), tiny_data(8, seed=2)]
    sim = Simulation(make_algo("fedit")[0], tiny, data, tiny_data(4, seed=3), RunConfig(progress=False), [[0, 1]])
    grads = sim.weight_gradient(6)  # 3 examples from each client
    layer = tiny.lora_layers["proj"]
    W = layer.pretrained_weight.detach().clone().requires_grad_(True)
    x = torch.cat([data[0]["x"][:3], data[1]["x"][:3]])
    y = torch.cat([data[0]["labels"][:3], data[1]["labels"][:3]])
    net = tiny.module
    h = torch.tanh(x @ W.T + layer.base.bias)
    logits = net.head(torch.tanh(net.mix.base(h)))
    torch.nn.functional.cross_entropy(logits, y).backward()
    torch.testing.assert_close(grads["proj"], W.grad, rtol=1e-6, atol=1e-8)  # the loss is taken in float32


# ------------------------------------------------------------------------------------------- options and evaluation
@pytest.mark.parametrize(
    "override,message",
    [
        ("method_args.lam=abc", "lam must be a finite number"),
        ("method_args.prune=1", "prune must be true or false"),
        ("method_args.min_rank=0", "min_rank must be at least 1"),
        ("method_args.gamma=1.5", "gamma must be in"),
    ],
)
def test_options_are_checked_against_their_types(override, message):
    from ilora.config import resolve_config
    from ilora.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        resolve_config(["method=hetlora", override])


def test_control_variates_only_where_a_method_offers_them():
    from ilora.config import resolve_config
    from ilora.errors import ConfigError

    assert resolve_config(["method=fedit", "method_args.control_variates=true"]).method_args["control_variates"]
    with pytest.raises(ConfigError, match="no option 'control_variates'"):
        resolve_config(["method=flora", "method_args.control_variates=true"])


def test_scaffold_fedit_server_variate_is_the_mean_of_the_clients_gradients():
    """SCAFFOLD on FedIT: the component ILoRA-S uses, with the true mean gradient (``scaffold``)."""
    algo, fed = make_algo("fedit", control_variates=True)
    assert algo.control_variates.estimator == "scaffold"

    def one_round(seed):
        grads, corrections, uploads = {}, {}, {}
        for cid in range(3):
            msg, model = algo.download(cid)
            assert msg["cv/lora_A/proj"].shape[0] == RANKS[cid]
            grads[cid] = {k: rand(*v.shape, seed=seed + 7 * cid + i) for i, (k, v) in enumerate(model.flat().items())}
            algo.on_local_start(cid, lambda g=grads[cid], **how: g)
            corrections[cid] = algo.gradient_correction(cid)
            uploads[cid] = algo.upload(cid, model)
        algo.aggregate(uploads, WEIGHTS)
        return grads, corrections

    grads, corrections = one_round(0)
    assert all(float(t.abs().max()) == 0 for c in corrections.values() for t in c.values())
    expected = sum(pad_A(grads[c]["lora_A/proj"], 6) for c in range(3)) / 3
    torch.testing.assert_close(algo.control_variates.c["lora_A/proj"], expected, rtol=0, atol=1e-14)
    _, corrections = one_round(100)
    for cid, r in enumerate(RANKS):  # round 2: c (the mean of the round-1 gradients) cut to r_i, minus c_i
        c_B = sum(pad_B(grads[c]["lora_B/mix"], 6) for c in range(3)) / 3
        torch.testing.assert_close(corrections[cid]["lora_A/proj"], expected[:r] - grads[cid]["lora_A/proj"],
                                   rtol=0, atol=1e-14)
        torch.testing.assert_close(corrections[cid]["lora_B/mix"], c_B[:, :r] - grads[cid]["lora_B/mix"],
                                   rtol=0, atol=1e-14)
        assert float(corrections[cid]["lora_B/mix"].abs().max()) > 0


def test_personalised_method_is_evaluated_per_client(tiny):
    from conftest import tiny_data, tiny_federation

    from ilora.algorithm import get_algorithm
    from ilora.config import RunConfig
    from ilora.simulation import Simulation

    fed = tiny_federation(tiny, [2, 4, 6], [12, 16, 20])
    algo = get_algorithm("fedsa_lora")(fed)
    data = [tiny_data(n, seed=10 + i) for i, n in enumerate([12, 16, 20])]
    cfg = RunConfig(rounds=2, local_steps=2, batch_size=8, optimizer="sgd", lr=0.05, progress=False)
    records = Simulation(algo, tiny, data, tiny_data(16, seed=99), cfg, [[0, 1, 2]] * 2, seed=0).run()
    for r in records:
        assert len(r.client_accuracy) == 3
        assert r.accuracy == pytest.approx(sum(r.client_accuracy) / 3)
