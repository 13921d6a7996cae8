"""ILoRA: QR init, concatenated-QR aggregation, rank-aware control variates, ablation switches.

Exactness identities are checked in float64 on random factors; the simulator tests use a tiny
two-layer network with our LoRA layer injected.
"""

from __future__ import annotations

import copy

import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from baselines.fedit import FedIT
from ilora.algorithm import ClientModel, Federation, LayerSpec, get_algorithm
from ilora.config import RunConfig, method_options, resolve_config
from ilora.errors import ConfigError
from ilora.lora import inject_lora
from ilora.lowrank import concat_factors, concat_qr, low_rank_factors
from ilora.method import ILoRA, ILoRAConfig, ILoRAS, ILoRASConfig, mean_column_norm, split_factors
from ilora.models import Backbone, FrozenBackboneModule, head_parameters
from ilora.simulation import Simulation, load_client_model

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def random_factors(d: int, k: int, ranks: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d, r, generator=g, dtype=F64) for r in ranks]
    As = [torch.randn(r, k, generator=g, dtype=F64) for r in ranks]
    w = torch.rand(len(ranks), generator=g, dtype=F64)
    return Bs, As, (w / w.sum()).tolist()


# ---------------------------------------------------------------------------------------------
# Thin-factor aggregation
# ---------------------------------------------------------------------------------------------


def test_concatenation_is_the_weighted_sum_of_products():
    Bs, As, w = random_factors(23, 17, [2, 4, 6])
    B_c, A_c = concat_factors(Bs, As, w)
    assert B_c.shape == (23, 12) and A_c.shape == (12, 17)
    ideal = sum(p * B @ A for B, A, p in zip(Bs, As, w))
    assert rel(B_c @ A_c, ideal) < 1e-13


def _dense_truncation(dW: torch.Tensor, mode: str):
    """Dense reference (tests only): per rank r, the product of the truncated factorisation of dW."""
    if mode == "householder":
        Q, R = torch.linalg.qr(dW)
        return lambda r: Q[:, :r] @ R[:r]
    if mode == "pivoted":
        Q, R, perm = scipy.linalg.qr(dW.numpy(), mode="economic", pivoting=True)
        Q, R = torch.from_numpy(Q), torch.from_numpy(R)
        inv = torch.from_numpy(perm).argsort()
        return lambda r: (Q[:, :r] @ R[:r])[:, inv]
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return lambda r: U[:, :r] @ (S[:r, None] * Vh[:r])


@pytest.mark.parametrize("mode", ["householder", "pivoted", "svd"])
@pytest.mark.parametrize("d,k", [(40, 25), (19, 33)])
def test_thin_factor_qr_matches_dense_for_every_rank(mode, d, k):
    ranks = [2, 5, 3, 7]
    Bs, As, w = random_factors(d, k, ranks, seed=d)
    B_c, A_c = concat_factors(Bs, As, w)
    dense = _dense_truncation(B_c @ A_c, mode)
    for r in range(1, sum(ranks) + 1):  # includes every client rank and r_max
        B_r, A_r = low_rank_factors(B_c, A_c, r, mode)
        assert B_r.shape == (d, r) and A_r.shape == (r, k)
        assert rel(B_r @ A_r, dense(r)) < 1e-10, (mode, r)
        assert torch.allclose(B_r.T @ B_r, torch.eye(r, dtype=F64), atol=1e-12)  # orthonormal B


def test_concat_qr_casts_to_float64_and_pads_when_fewer_directions():
    Bs, As, _ = random_factors(12, 9, [2])
    B, A = concat_qr([Bs[0].float()], [As[0].float()], [1.0], rank=6)
    assert B.dtype == F64 and B.shape == (12, 6) and A.shape == (6, 9)
    assert torch.count_nonzero(B[:, 2:]) == 0 and torch.count_nonzero(A[2:]) == 0
    assert rel(B @ A, Bs[0].float().double() @ As[0].float().double()) < 1e-12


def test_svd_mode_keeps_dominant_directions_householder_keeps_first_columns():
    # dW's first column is tiny; its dominant direction lives in the last column.
    d, k = 10, 8
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=F64))[0]
    B = torch.cat([1e-3 * u[:, :1], 10 * u[:, 1:]], dim=1)
    A = torch.zeros(2, k, dtype=F64)
    A[0, 0], A[1, k - 1] = 1.0, 1.0
    dW = B @ A
    errors = {m: rel(torch.mm(*low_rank_factors(B, A, 1, m)), dW) for m in ("householder", "pivoted", "svd")}
    assert errors["householder"] > 0.99  # keeps the tiny first column
    assert errors["pivoted"] < 1e-3 and errors["svd"] < 1e-3


# ---------------------------------------------------------------------------------------------
# A tiny model with LoRA injected, and the federation built from it
# ---------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(12, 10)  # d=10, k=12
        self.l2 = nn.Linear(10, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, batch):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(batch["x"])))))


def tiny(ranks: list[int], dropout: float = 0.0, seed: int = 0, sizes: list[int] | None = None):
    """(pretrained module copy, backbone, federation, client data, test data), all float64."""
    torch.manual_seed(seed)
    module = Tiny().double()
    pretrained = copy.deepcopy(module)
    layers = inject_lora(module, ["l1", "l2"], rank=max(ranks), alpha=4.0, dropout=dropout)
    head = head_parameters(module, "head")
    backbone = Backbone("tiny", module, layers, head, encode=lambda split: {})
    sizes = sizes or [20 + 5 * i for i in range(len(ranks))]
    g = torch.Generator().manual_seed(seed + 1)
    draw = lambda n: {"x": torch.randn(n, 12, generator=g, dtype=F64),  # noqa: E731
                      "labels": torch.randint(0, 3, (n,), generator=g)}
    data, test = [draw(n) for n in sizes], draw(30)
    fed = Federation(
        layers={n: LayerSpec(l.out_features, l.in_features) for n, l in layers.items()},
        ranks=list(ranks),
        num_examples=sizes,
        head_init={n: p.detach().clone() for n, p in head.items()},
        pretrained_weights=lambda: {n: l.pretrained_weight.detach() for n, l in layers.items()},
        lora_alpha=4.0,
        seed=seed,
        dtype=F64,
    )
    return pretrained, backbone, fed, data, test


def outputs(backbone: Backbone, model: ClientModel, x: torch.Tensor, train: bool = False) -> torch.Tensor:
    load_client_model(backbone, model)
    backbone.module.train(train)
    torch.manual_seed(7)  # same dropout masks for every call
    with torch.no_grad():
        return backbone({"x": x})


# ---------------------------------------------------------------------------------------------
# QR initialisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
def test_model_at_qr_init_equals_pretrained(train):
    ranks = [2, 3, 5]
    pretrained, backbone, fed, _, _ = tiny(ranks, dropout=0.5 if train else 0.0)
    algo = ILoRA(fed, ILoRAConfig(offset="exact"))
    x = torch.randn(16, 12, dtype=F64)
    with torch.no_grad():
        ref = pretrained({"x": x})
    for cid, r in enumerate(ranks):
        _, model = algo.download(cid)
        assert model.rank == r and model.offsets and model.scale == 4.0 / r
        assert torch.allclose(outputs(backbone, model, x, train), ref, rtol=0, atol=1e-12)
    assert torch.allclose(outputs(backbone, algo.eval_model(), x), ref, rtol=0, atol=1e-12)


def test_qr_init_factors_are_nested_scaled_and_offset():
    pretrained, backbone, fed, _, _ = tiny([2, 4])
    algo = ILoRA(fed, ILoRAConfig(offset="exact"))
    (_, m2), (_, m4) = algo.download(0), algo.download(1)
    for name, spec in fed.layers.items():
        W0 = pretrained.get_submodule(name).weight.detach()
        for m in (m2, m4):
            r = m.rank
            Q, R = torch.linalg.qr(W0)
            BA = m.B[name] @ m.A[name]
            # B A is a positive multiple of Q_r R_r with ||B A||_F = 1e-4 sqrt(d k)
            target = 1e-4 * (spec.out_features * spec.in_features) ** 0.5
            assert abs(float(torch.linalg.matrix_norm(BA)) - target) < 1e-15
            ratio = float(torch.linalg.matrix_norm(BA) / torch.linalg.matrix_norm(Q[:, :r] @ R[:r]).detach())
            assert rel(BA, ratio * Q[:, :r] @ R[:r]) < 1e-12
            A0, B0, s0 = m.offsets[name]
            assert torch.equal(A0, m.A[name]) and torch.equal(B0, m.B[name]) and s0 == fed.scale(r)
        # nested subspaces: the rank-2 columns are the rank-4 client's first two directions
        B2 = m2.B[name] / m2.B[name].norm(dim=0)
        B4 = m4.B[name] / m4.B[name].norm(dim=0)
        assert torch.allclose(B2, B4[:, :2], atol=1e-12)


def test_code_offset_leaves_scale_minus_one_times_BA():
    ranks = [2, 4]
    pretrained, backbone, fed, _, _ = tiny(ranks)
    algo = ILoRA(fed, ILoRAConfig(offset="code", init_norm=None))
    x = torch.randn(5, 12, dtype=F64)
    _, model = algo.download(0)
    assert all(s0 == 1.0 for _, _, s0 in model.offsets.values())
    expected = copy.deepcopy(pretrained)
    with torch.no_grad():
        for name in fed.layers:
            expected.get_submodule(name).weight += (model.scale - 1.0) * model.B[name] @ model.A[name]
        ref, moved = pretrained({"x": x}), expected({"x": x})
    out = outputs(backbone, model, x)
    assert torch.allclose(out, moved, atol=1e-12)
    assert (out - ref).abs().max() > 1e-3  # unscaled init + code offset: not the pretrained model


def test_standard_init_has_no_offset():
    _, _, fed, _, _ = tiny([2, 4])
    _, model = ILoRA(fed, ILoRAConfig(init="standard")).download(1)
    assert model.offsets == {} and all(torch.count_nonzero(b) == 0 for b in model.B.values())


# ---------------------------------------------------------------------------------------------
# Aggregation inside the algorithm
# ---------------------------------------------------------------------------------------------


def fake_train(message, model: ClientModel, seed: int) -> ClientModel:
    g = torch.Generator().manual_seed(seed)
    bump = lambda d: {n: t + 0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in d.items()}  # noqa: E731
    return ClientModel(bump(model.A), bump(model.B), bump(model.head), model.scale, model.offsets)


def test_concat_qr_aggregation_gives_each_client_its_rank_and_server_r_max():
    ranks = [2, 3, 5]
    _, _, fed, _, _ = tiny(ranks)
    algo = ILoRA(fed)
    trained = {c: fake_train(*algo.download(c), seed=c) for c in range(3)}
    uploads = {c: algo.upload(c, trained[c]) for c in range(3)}
    weights = {0: 0.2, 1: 0.3, 2: 0.5}
    algo.aggregate(uploads, weights)
    for name in fed.layers:
        dW = sum(weights[c] * trained[c].B[name] @ trained[c].A[name] for c in range(3))
        Q, R = torch.linalg.qr(dW)
        assert algo.A[name].shape[0] == 5 and algo.B[name].shape[1] == 5
        assert rel(algo.B[name] @ algo.A[name], Q[:, :5] @ R[:5]) < 1e-10
        for c, r in enumerate(ranks):
            model = algo.download(c)[1]
            assert model.rank == r
            assert rel(model.B[name] @ model.A[name], Q[:, :r] @ R[:r]) < 1e-10
    heads = sum(weights[c] * trained[c].head["head.weight"] for c in range(3))
    assert torch.allclose(algo.head["head.weight"], heads, atol=1e-14)
    ev = algo.eval_model()
    assert ev.rank == 5 and ev.scale == fed.scale(5) and ev.offsets == algo.offsets(5)


def test_switches_reproduce_fedit_exactly():
    ranks = [2, 3, 5]
    _, _, fed, _, _ = tiny(ranks)
    fedit = FedIT(fed)
    ablation = ILoRA(fed, ILoRAConfig(init="standard", aggregate="fedavg", control_variates=False))
    weights = {0: 0.5, 1: 0.2, 2: 0.3}
    for t in range(2):
        ups = []
        for algo in (fedit, ablation):
            msgs = {c: algo.download(c) for c in range(3)}
            ups.append({c: algo.upload(c, fake_train(*msgs[c], seed=10 * t + c)) for c in range(3)})
        for c in range(3):
            assert ups[0][c].keys() == ups[1][c].keys()
            assert all(torch.equal(ups[0][c][k], ups[1][c][k]) for k in ups[0][c])
        fedit.aggregate(ups[0], weights)
        ablation.aggregate(ups[1], weights)
    a, b = fedit.eval_model(), ablation.eval_model()
    assert a.scale == b.scale and b.offsets == {}
    for part in ("A", "B", "head"):
        assert all(torch.equal(getattr(a, part)[n], getattr(b, part)[n]) for n in getattr(a, part))


# ---------------------------------------------------------------------------------------------
# Control variates
# ---------------------------------------------------------------------------------------------


def fake_gradients(model: ClientModel, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in model.flat().items()}


def cv_round(algo: ILoRA, cids: list[int], seed: int):
    """One round through the algorithm's client/server hooks with random 'full gradients'."""
    uploads, grads, corrections = {}, {}, {}
    for c in cids:
        msg, model = algo.download(c)
        grads[c] = fake_gradients(model, seed + c)
        algo.on_local_start(c, lambda g=grads[c], **how: g)
        corrections[c] = algo.gradient_correction(c)
        uploads[c] = algo.upload(c, fake_train(msg, model, seed + 100 + c))
    total = sum(algo.fed.num_examples[c] for c in cids)
    algo.aggregate(uploads, {c: algo.fed.num_examples[c] / total for c in cids})
    return uploads, grads, corrections


def test_control_variate_shapes_padding_and_cutting():
    ranks = [2, 3, 5]
    _, _, fed, _, _ = tiny(ranks)
    algo = ILoRAS(fed)
    msg, _ = algo.download(0)
    assert msg["cv/lora_A/l1"].shape == (2, 12) and msg["cv/lora_B/l1"].shape == (10, 2)
    _, grads, corr = cv_round(algo, [0, 1, 2], seed=0)
    cv = algo.control_variates
    assert all(float(t.abs().max()) == 0.0 for c in corr.values() for t in c.values())  # c = c_i = 0
    # server c = (1/N) sum of zero-padded dc_i = (1/N) sum pad(g_i) in round 1
    assert cv.c["lora_A/l1"].shape == (5, 12) and cv.c["lora_B/l2"].shape == (8, 5)
    zeros = lambda r: torch.zeros(5 - r, 12, dtype=F64)  # noqa: E731
    expected = sum(torch.cat([grads[c]["lora_A/l1"], zeros(r)]) for c, r in enumerate(ranks))
    assert torch.allclose(cv.c["lora_A/l1"], expected / 3, atol=1e-15)
    assert torch.allclose(cv.c["lora_A/l1"][3:], grads[2]["lora_A/l1"][3:] / 3, atol=1e-15)  # rank-5 only
    assert torch.allclose(cv.c["head/head.bias"], sum(grads[c]["head/head.bias"] for c in range(3)) / 3)
    # round 2: each client's correction is c cut to its rank minus its own c_i (= its round-1 gradient)
    c_hand = {k: sum(hand_pad(k, grads[c][k], 5) for c in range(3)) / 3 for k in grads[0]}
    _, _, corr = cv_round(algo, [0, 1, 2], seed=50)
    for c, r in enumerate(ranks):
        assert corr[c]["lora_A/l1"].shape == (r, 12) and corr[c]["lora_B/l1"].shape == (10, r)
        assert corr[c]["head/head.weight"].shape == (3, 8)
        for k, t in corr[c].items():
            torch.testing.assert_close(t, hand_cut(k, c_hand[k], r) - grads[c][k], rtol=0, atol=1e-14)
        assert float(corr[c]["lora_B/l2"].abs().max()) > 0


def test_server_control_variate_divides_by_all_clients_under_partial_participation():
    _, _, fed, _, _ = tiny([2, 3, 5])
    algo = ILoRAS(fed)
    uploads, grads, _ = cv_round(algo, [1], seed=4)
    cv = algo.control_variates
    assert torch.allclose(cv.c["lora_B/l1"][:, :3], grads[1]["lora_B/l1"] / 3, atol=1e-15)
    assert torch.count_nonzero(cv.c["lora_B/l1"][:, 3:]) == 0
    assert torch.equal(uploads[1]["cv/lora_B/l1"], grads[1]["lora_B/l1"])  # dc_i = c_i_new - 0


def test_one_client_full_participation_has_zero_correction():
    _, _, fed, _, _ = tiny([4])
    algo = ILoRAS(fed)
    for t in range(3):  # c = c_1 after every round: exactly zero in rounds 1-2, rounding later
        _, _, corr = cv_round(algo, [0], seed=10 * t)
        assert all(float(v.abs().max()) <= (0.0 if t < 2 else 1e-14) for v in corr[0].values()), t


# SCAFFOLD written out: every gradient from autograd on Tiny's forward spelled out below, every optimiser
# step by its formula, padding and cutting by hand; nothing here calls the suite's control variates.
Params = dict[str, torch.Tensor]


def hand_pad(name: str, t: torch.Tensor, rank: int) -> torch.Tensor:
    """Zero rows (``lora_A``) or columns (``lora_B``) up to ``rank``; the head unchanged."""
    if name.startswith("lora_A/"):
        return torch.cat([t, t.new_zeros(rank - t.shape[0], t.shape[1])])
    if name.startswith("lora_B/"):
        return torch.cat([t, t.new_zeros(t.shape[0], rank - t.shape[1])], dim=1)
    return t


def hand_cut(name: str, t: torch.Tensor, rank: int) -> torch.Tensor:
    """The first ``rank`` rows (``lora_A``) or columns (``lora_B``); the head unchanged."""
    return t[:rank] if name.startswith("lora_A/") else t[:, :rank] if name.startswith("lora_B/") else t


def hand_logits(pretrained: Tiny, params: Params, scale: float, x: torch.Tensor) -> torch.Tensor:
    """Tiny with LoRA: ``tanh(h (W + s B A)^T + b)`` for ``l1`` and ``l2``, then the head."""
    h = x
    for name in ("l1", "l2"):
        layer = pretrained.get_submodule(name)
        W = layer.weight.detach() + scale * params[f"lora_B/{name}"] @ params[f"lora_A/{name}"]
        h = torch.tanh(h @ W.T + layer.bias.detach())
    return h @ params["head/head.weight"].T + params["head/head.bias"]


def hand_gradient(pretrained: Tiny, params: Params, scale: float, data: dict, divide_by: int = 1) -> Params:
    """The gradient of the mean cross-entropy over all of ``data``, divided by ``divide_by`` (the loss in float32,
    as the simulator takes it)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss = F.cross_entropy(hand_logits(pretrained, leaves, scale, data["x"]).float(), data["labels"]) / divide_by
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def hand_local_training(pretrained: Tiny, start: Params, scale: float, data: dict, correction: Params,
                        optimizer: str, lr: float, steps: int) -> Params:
    """``steps`` full-batch steps on ``g + correction``: SGD (momentum 0.9) or AdamW (0.9, 0.999, 1e-8, no decay)."""
    x = {k: v.clone() for k, v in start.items()}
    m = {k: torch.zeros_like(v) for k, v in x.items()}
    v = {k: torch.zeros_like(t) for k, t in x.items()}
    for t in range(1, steps + 1):
        g = hand_gradient(pretrained, x, scale, data)
        for k in x:
            gk = g[k] + correction[k]
            if optimizer == "sgd":
                m[k] = 0.9 * m[k] + gk
                x[k] = x[k] - lr * m[k]
            else:
                m[k] = 0.9 * m[k] + 0.1 * gk
                v[k] = 0.999 * v[k] + 0.001 * gk**2
                x[k] = x[k] - lr * (m[k] / (1 - 0.9**t)) / ((v[k] / (1 - 0.999**t)).sqrt() + 1e-8)
    return x


def hand_scaffold(pretrained: Tiny, init: Params, ranks: list[int], data: list[dict], sampling: list[list[int]],
                  estimator: str, optimizer: str, lr: float, steps: int, alpha: float = 4.0, sign: float = 1.0):
    """SCAFFOLD option I on zero-padded FedAvg of ``A``, ``B`` and the head, rounds as ``sampling`` says.

    Returns the global tensors, the server's ``c`` and the last corrections ``sign * (c - c_i)`` per client.
    """
    n_all, r_max = len(ranks), max(ranks)
    model = dict(init)
    c = {k: torch.zeros_like(t) for k, t in init.items()}
    c_i: dict[int, Params] = {}
    corrections: dict[int, Params] = {}
    for clients in sampling:
        trained, dc = {}, {}
        for i in clients:
            r, n = ranks[i], len(data[i]["labels"])
            start = {k: hand_cut(k, t, r) for k, t in model.items()}
            old = c_i.get(i, {k: torch.zeros_like(t) for k, t in start.items()})
            new = hand_gradient(pretrained, start, alpha / r, data[i], divide_by=n if estimator == "code" else 1)
            corrections[i] = {k: sign * (hand_cut(k, c[k], r) - old[k]) for k in start}
            trained[i] = hand_local_training(pretrained, start, alpha / r, data[i], corrections[i], optimizer, lr,
                                             steps)
            dc[i], c_i[i] = {k: new[k] - old[k] for k in new}, new
        total = sum(len(data[i]["labels"]) for i in clients)
        p = {i: len(data[i]["labels"]) / total for i in clients}
        model = {k: sum(p[i] * hand_pad(k, trained[i][k], r_max) for i in clients) for k in model}
        c = {k: c[k] + sum(hand_pad(k, dc[i][k], r_max) for i in clients) / n_all for k in c}
    return model, c, corrections


class Recording(ILoRAS):
    """ILoRA-S that keeps the gradient correction it handed each client last."""

    def __init__(self, fed: Federation, config: ILoRASConfig | None = None):
        super().__init__(fed, config)
        self.corr: dict[int, Params] = {}

    def gradient_correction(self, cid: int) -> Params:
        self.corr[cid] = super().gradient_correction(cid)
        return self.corr[cid]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("estimator", ["scaffold", "code"])
def test_correction_enters_the_gradient_before_the_optimiser(optimizer: str, estimator: str):
    """Two rounds of ILoRA-S through the simulator against SCAFFOLD computed by hand (float64).

    FedAvg aggregation and the standard init are switched on, so every step has a closed form. Client 1
    misses round 1 (its ``c_i`` is still zero in round 2); ``c`` divides by all three clients; the
    correction ``c - c_i`` is added to the gradient before SGD's momentum or AdamW's moments.
    """
    ranks, sampling, lr, steps = [2, 3, 4], [[0, 2], [0, 1, 2]], 0.05, 3
    pretrained, backbone, fed, data, test = tiny(ranks)
    algo = Recording(fed, ILoRASConfig(init="standard", aggregate="fedavg", cv_estimator=estimator))
    init = {**{f"lora_A/{n}": a.clone() for n, a in algo.A.items()},
            **{f"lora_B/{n}": b.clone() for n, b in algo.B.items()},
            **{f"head/{n}": h.clone() for n, h in fed.head_init.items()}}
    cfg = RunConfig(rounds=2, local_steps=steps, batch_size=64, optimizer=optimizer, lr=lr, momentum=0.9,
                    weight_decay=0.0, progress=False)  # one batch per step: the whole client
    Simulation(algo, backbone, data, test, cfg, sampling=sampling, seed=0).run()

    model, c, corrections = hand_scaffold(pretrained, init, ranks, data, sampling, estimator, optimizer, lr, steps)
    got = {**{f"lora_A/{n}": a for n, a in algo.A.items()}, **{f"lora_B/{n}": b for n, b in algo.B.items()},
           **{f"head/{n}": h for n, h in algo.head.items()}}
    tol = dict(rtol=0, atol=1e-12)
    for k in model:
        torch.testing.assert_close(got[k], model[k], **tol, msg=lambda m, k=k: f"global {k}: {m}")
        torch.testing.assert_close(algo.control_variates.c[k], c[k], **tol, msg=lambda m, k=k: f"c {k}: {m}")
    for cid, correction in corrections.items():
        for k, t in correction.items():
            torch.testing.assert_close(algo.corr[cid][k], t, **tol, msg=lambda m, k=k, cid=cid: f"c - c_{cid} {k}: {m}")
    assert max(float(t.abs().max()) for t in corrections[1].values()) > 1e-4  # client 1: c - 0
    # the test has teeth: the correction with the other sign ends far outside the tolerance
    flipped, _, _ = hand_scaffold(pretrained, init, ranks, data, sampling, estimator, optimizer, lr, steps, sign=-1.0)
    assert max(float((flipped[k] - model[k]).abs().max()) for k in model) > 1e-5


@pytest.mark.parametrize("method", ["ilora", "ilora_s"])
def test_runs_in_the_simulator_and_counts_control_variates_on_the_wire(method):
    _, backbone, fed, data, test = tiny([2, 3, 5])
    algo = get_algorithm(method)(fed)
    cfg = RunConfig(rounds=3, local_steps=2, batch_size=8, optimizer="sgd", lr=0.05, progress=False)
    records = Simulation(algo, backbone, data, test, cfg, sampling=[[0, 1, 2]] * 3, seed=0).run()
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r.loss)) for r in records)
    lora = 8 * sum(r * (10 + 12) + r * (8 + 10) for r in (2, 3, 5))  # float64 factors, both layers
    head = 8 * 3 * (8 + 1) * 3
    factor = 2 if method == "ilora_s" else 1  # the control variates double both directions
    assert records[0].downlink_bytes == factor * (lora + head)
    assert records[0].uplink_bytes == factor * (lora + head)


# ---------------------------------------------------------------------------------------------
# Configuration: registry names, ablation switches, errors
# ---------------------------------------------------------------------------------------------


def test_registered_names_and_defaults():
    assert get_algorithm("ilora") is ILoRA and get_algorithm("ilora_s") is ILoRAS
    assert ILoRAConfig() == ILoRAConfig(
        init="qr", aggregate="concat_qr", control_variates=False, qr_mode="householder", offset="code",
        init_norm=1e-4, cv_estimator="code", factor_split="qr",
    )
    assert ILoRASConfig().control_variates is True


@pytest.mark.parametrize(
    "switches,expected",
    [
        (["method_args.init=standard", "method_args.aggregate=fedavg"], ("standard", "fedavg", False)),
        (["method_args.init=qr", "method_args.aggregate=fedavg"], ("qr", "fedavg", False)),
        ([], ("qr", "concat_qr", False)),
        (["method_args.control_variates=true"], ("qr", "concat_qr", True)),
    ],
)
def test_component_ablation_is_four_configs_of_one_method(switches, expected):
    cfg = method_options(resolve_config(["method=ilora", *switches]))
    assert isinstance(cfg, ILoRAConfig) and (cfg.init, cfg.aggregate, cfg.control_variates) == expected


def test_method_args_and_ilora_s_config():
    args = ["method_args.qr_mode=svd", "method_args.offset=exact", "method_args.factor_split=keepnorm"]
    cfg = method_options(resolve_config(["method=ilora", *args]))
    assert cfg.qr_mode == "svd" and cfg.offset == "exact" and cfg.factor_split == "keepnorm"
    assert method_options(resolve_config(["method=ilora_s"])).control_variates is True


@pytest.mark.parametrize(
    "override,message",
    [
        ("method_args.init=orthogonal", "valid: standard, qr"),
        ("method_args.aggregate=mean", "valid: fedavg, concat_qr"),
        ("method_args.control_variates=maybe", "control_variates must be true or false"),
        ("method_args.qr_mode=rrqr", "valid: householder, pivoted, svd"),
        ("method_args.offset=none", "valid: code, exact"),
        ("method_args.cv_estimator=exact", "valid: code, scaffold"),
        ("method_args.factor_split=svd", "valid: qr, balanced, keepnorm"),
        ("method_args.init_norm=-1", "init_norm"),
        ("method_args.rank_mode=x", "no option 'rank_mode'"),
    ],
)
def test_bad_options_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(["method=ilora", override])


# ---------------------------------------------------------------------------------------------
# The factor split after concatenated QR, and the authors' code's behaviours
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["householder", "svd"])
def test_every_factor_split_gives_the_same_product(mode):
    Bs, As, w = random_factors(30, 21, [2, 4, 6], seed=5)
    B, A = concat_qr(Bs, As, w, rank=6, mode=mode)
    kappa = mean_column_norm(Bs)
    assert kappa == pytest.approx(float(torch.cat([b.norm(dim=0) for b in Bs]).mean()))
    for r in (1, 2, 4, 6):
        reference = B[:, :r] @ A[:r]
        for how in ("qr", "balanced", "keepnorm"):
            B_r, A_r = split_factors(B, A, r, how, kappa)
            assert B_r.shape == (30, r) and A_r.shape == (r, 21)
            assert rel(B_r @ A_r, reference) < 1e-12, (how, r)
        B_b, A_b = split_factors(B, A, r, "balanced")
        assert torch.allclose(B_b.T @ B_b, A_b @ A_b.T, atol=1e-12)  # both carry sqrt(S): Gram = diag(S)
        B_k, _ = split_factors(B, A, r, "keepnorm", kappa)
        assert torch.allclose(B_k.norm(dim=0), torch.full((r,), kappa, dtype=F64), atol=1e-12)


@pytest.mark.parametrize("how", ["balanced", "keepnorm"])
def test_factor_split_changes_the_factors_not_the_models(how):
    ranks = [2, 3, 5]
    _, backbone, fed, data, _ = tiny(ranks)
    published, other = ILoRA(fed), ILoRA(fed, ILoRAConfig(factor_split=how))
    for algo in (published, other):
        cv_round(algo, [0, 1, 2], seed=3)
    x = data[0]["x"]
    for cid in range(3):
        m_qr, m_other = published.download(cid)[1], other.download(cid)[1]
        assert not torch.allclose(m_qr.B["l1"], m_other.B["l1"])
        assert torch.allclose(outputs(backbone, m_qr, x), outputs(backbone, m_other, x), atol=1e-12)
    assert torch.allclose(outputs(backbone, published.eval_model(), x), outputs(backbone, other.eval_model(), x),
                          atol=1e-12)


def test_code_cv_estimator_is_the_batch_mean_sum_over_n_in_eval_mode():
    """With equal batches, the authors' c_i is the mean gradient / batch size; dropout is off for it."""
    ranks = [3]
    _, backbone, fed, data, test = tiny(ranks, dropout=0.5, sizes=[24])
    cfg = RunConfig(rounds=1, local_steps=1, batch_size=8, progress=False)
    sim = Simulation(ILoRA(fed), backbone, data, test, cfg, sampling=[[0]], seed=0)
    params = load_client_model(backbone, ILoRA(fed).download(0)[1])
    backbone.module.eval()
    true_mean = sim.full_gradient(data[0], params)  # reference: eval mode too, so no dropout noise
    backbone.module.train()
    code = [sim.full_gradient(data[0], params, batch_means=True, eval_mode=True) for _ in range(2)]
    for k, g in true_mean.items():
        assert torch.allclose(code[0][k], g / 8, atol=1e-15), k
        assert torch.equal(code[0][k], code[1][k])  # deterministic: no dropout
    noisy = [sim.full_gradient(data[0], params) for _ in range(2)]  # scaffold: training mode, dropout on
    assert any(not torch.equal(noisy[0][k], noisy[1][k]) for k in noisy[0])
    assert backbone.module.training


class WithDropoutAndBatchNorm(FrozenBackboneModule):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.1)
        self.bn = nn.BatchNorm1d(4)


@pytest.mark.parametrize("backbone_dropout", [False, True])
def test_backbone_dropout_switch_keeps_batchnorm_frozen(backbone_dropout):
    module = WithDropoutAndBatchNorm()
    module.l1 = inject_lora(module, ["l1"], rank=2, alpha=4.0, dropout=0.1)["l1"]
    module.backbone_dropout = backbone_dropout
    module.train()
    assert module.training and module.l1.training  # LoRA dropout active either way
    assert module.drop.training is backbone_dropout
    assert not module.bn.training
    module.eval()
    assert not module.drop.training and not module.l1.training


def test_first_step_update_is_recorded_and_equals_the_dense_change():
    ranks = [2, 4]
    _, backbone, fed, data, test = tiny(ranks)
    cfg = RunConfig(rounds=2, local_steps=2, batch_size=8, optimizer="sgd", lr=0.1, progress=False)
    sim = Simulation(ILoRA(fed), backbone, data, test, cfg, sampling=[[0, 1], [0, 1]], seed=0)
    before = sim._factors()
    for layer in backbone.lora_layers.values():
        with torch.no_grad():
            layer.lora_A.add_(0.1)
    dense = sum(float((2.0 * (l.lora_B @ l.lora_A - before[n][1] @ before[n][0])).detach().norm() ** 2)
                for n, l in backbone.lora_layers.items()) ** 0.5
    assert sim._product_change(before, 2.0) == pytest.approx(dense, rel=1e-10)
    records = sim.run()
    assert all(r.first_step_update > 0 for r in records)
