"""FLoRA, LoRA-FAIR, FFA-LoRA (and FedIT's zero-padding): exactness identities in float64,
heterogeneous-rank padding and cutting, and option validation."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_backbone, tiny_data, tiny_federation

from baselines.flora import stack_modules
from baselines.lora_fair import LoRAFAIRConfig, closed_form_correction, cosine_correction
from ilora.algorithm import ClientModel, build_config, get_algorithm
from ilora.config import RunConfig, method_options, resolve_config
from ilora.errors import ConfigError
from ilora.lowrank import pad_A, pad_B
from ilora.simulation import Simulation, load_client_model

RANKS = [2, 4, 6]
WEIGHTS = {0: 0.2, 1: 0.3, 2: 0.5}


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def make_algo(method: str, ranks=RANKS, **options):
    backbone = tiny_backbone()
    fed = tiny_federation(backbone, ranks=ranks, sizes=[20, 30, 50][: len(ranks)])
    cls = get_algorithm(method)
    return cls(fed, build_config(cls, options)), fed


def random_uploads(algo, fed, seed: int = 0, factors=("A", "B")):
    """Each client's downloaded model with its trainable factors replaced by random ones."""
    uploads = {}
    for cid in range(fed.num_clients):
        _, model = algo.download(cid)
        A = {n: rand(*a.shape, seed=seed + 100 * cid + i) for i, (n, a) in enumerate(model.A.items())}
        B = {n: rand(*b.shape, seed=seed + 100 * cid + 50 + i) for i, (n, b) in enumerate(model.B.items())}
        if "A" not in factors:
            A = model.A
        head = {n: h + 1.0 for n, h in model.head.items()}
        trained = ClientModel(A, B, head, model.scale, train_A="A" in factors)
        uploads[cid] = algo.upload(cid, trained)
    return uploads


def parts(uploads, name):
    cids = sorted(uploads)
    return [uploads[c][f"lora_A/{name}"] for c in cids], [uploads[c][f"lora_B/{name}"] for c in cids], cids


# ------------------------------------------------------------------------------------------- FedIT
def test_fedit_heterogeneous_path_and_error_identity():
    """FedIT's aggregate is the zero-padded average; its error is sum p (B - B_bar)(A - A_bar)."""
    algo, fed = make_algo("fedit")
    uploads = random_uploads(algo, fed)
    algo.aggregate(uploads, WEIGHTS)
    for name in fed.layers:
        As, Bs, cids = parts(uploads, name)
        p = [WEIGHTS[c] for c in cids]
        A_pad, B_pad = [pad_A(a, 6) for a in As], [pad_B(b, 6) for b in Bs]
        torch.testing.assert_close(algo.A[name], sum(w * a for w, a in zip(p, A_pad)), rtol=0, atol=1e-12)
        torch.testing.assert_close(algo.B[name], sum(w * b for w, b in zip(p, B_pad)), rtol=0, atol=1e-12)
        ideal = sum(w * b @ a for w, a, b in zip(p, A_pad, B_pad))
        error = ideal - algo.B[name] @ algo.A[name]
        rhs = sum(w * (b - algo.B[name]) @ (a - algo.A[name]) for w, a, b in zip(p, A_pad, B_pad))
        torch.testing.assert_close(error, rhs, rtol=0, atol=1e-10)
    for cid, r in enumerate(RANKS):
        msg, model = algo.download(cid)
        for name in fed.layers:
            assert torch.equal(model.A[name], algo.A[name][:r])
            assert torch.equal(model.B[name], algo.B[name][:, :r])
            assert msg[f"lora_A/{name}"].shape[0] == r and msg[f"lora_B/{name}"].shape[1] == r


# ------------------------------------------------------------------------------------------- FLoRA
def test_flora_stacking_is_exact_float64():
    As = [rand(r, 7, seed=r) for r in RANKS]
    Bs = [rand(9, r, seed=10 + r) for r in RANKS]
    p, s = [0.2, 0.3, 0.5], [8.0 / r for r in RANKS]
    A_stack, B_stack = stack_modules(As, Bs, p, s)
    assert A_stack.shape == (sum(RANKS), 7) and B_stack.shape == (9, sum(RANKS))
    expected = sum(w * sc * b @ a for a, b, w, sc in zip(As, Bs, p, s))
    torch.testing.assert_close(B_stack @ A_stack, expected, rtol=0, atol=1e-12)


def test_flora_merges_into_base_and_downloads_the_stack():
    algo, fed = make_algo("flora")
    head_bytes = sum(h.numel() * h.element_size() for h in algo.head.values())
    msg, model = algo.download(0)
    assert set(msg) == {f"head/{n}" for n in algo.head}  # round 1: nothing stacked yet
    assert model.base_delta is None and model.rank == 2 and model.scale == fed.scale(2)
    assert all(torch.equal(b, torch.zeros_like(b)) for b in model.B.values())  # fresh standard init
    uploads = random_uploads(algo, fed)
    algo.aggregate(uploads, WEIGHTS)
    for name in fed.layers:
        As, Bs, cids = parts(uploads, name)
        expected = sum(WEIGHTS[c] * fed.scale(fed.ranks[c]) * b @ a for a, b, c in zip(As, Bs, cids))
        torch.testing.assert_close(algo.merged[name], expected, rtol=0, atol=1e-12)
    # round 2: every client starts from a fresh LoRA on the merged base and downloads the whole stack
    for cid, r in enumerate(RANKS):
        msg, model = algo.download(cid)
        assert model.rank == r and model.base_delta is algo.merged
        assert all(torch.equal(b, torch.zeros_like(b)) for b in model.B.values())
        stacked = sum(RANKS) * sum(spec.out_features + spec.in_features for spec in fed.layers.values())
        assert sum(t.numel() * t.element_size() for t in msg.values()) == stacked * 8 + head_bytes
    # evaluation: the merged base alone
    ev = algo.eval_model()
    assert ev.scale == 0.0 and ev.base_delta is algo.merged


def test_flora_fresh_init_differs_per_round_and_eval_adds_nothing():
    backbone = tiny_backbone()
    fed = tiny_federation(backbone, RANKS, [20, 30, 50])
    algo = get_algorithm("flora")(fed)
    _, first = algo.download(2)
    algo.aggregate(random_uploads(algo, fed), WEIGHTS)
    _, second = algo.download(2)
    name = next(iter(fed.layers))
    assert not torch.equal(first.A[name], second.A[name])
    # the evaluated model is exactly W0 + merged delta
    load_client_model(backbone, algo.eval_model())
    layer = backbone.lora_layers[name]
    x = rand(5, layer.in_features, seed=3)
    expected = x @ (layer.pretrained_weight + algo.merged[name]).T + layer.base.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------- FFA-LoRA
def test_ffa_lora_exactness_float64():
    """FFA-LoRA's own aggregate of known B's: B_g = sum p_i pad(B_i) with A untouched, and the evaluated
    layer computes x (W0 + s_max sum p_i B_i A[:r_i])^T + b exactly."""
    backbone = tiny_backbone()
    fed = tiny_federation(backbone, RANKS, [20, 30, 50])
    algo = get_algorithm("ffa_lora")(fed)
    A_sent, B_sent, uploads = {}, {}, {}
    for cid, r in enumerate(RANKS):
        _, model = algo.download(cid)
        A_sent[cid] = {n: a.clone() for n, a in model.A.items()}
        B_sent[cid] = {n: rand(spec.out_features, r, seed=10 * cid + i)
                       for i, (n, spec) in enumerate(fed.layers.items())}
        uploads[cid] = algo.upload(cid, ClientModel(model.A, B_sent[cid], model.head, model.scale, train_A=False))
    algo.aggregate(uploads, WEIGHTS)
    s_max = 8.0 / max(RANKS)
    load_client_model(backbone, algo.eval_model())
    for name, spec in fed.layers.items():
        assert all(torch.equal(A_sent[c][name], A_sent[2][name][: RANKS[c]]) for c in range(3))  # one shared A
        B_g = sum(WEIGHTS[c] * torch.nn.functional.pad(B_sent[c][name], (0, 6 - RANKS[c])) for c in range(3))
        torch.testing.assert_close(algo.B[name], B_g, rtol=0, atol=1e-12)
        torch.testing.assert_close(algo.A[name], A_sent[2][name], rtol=0, atol=0)
        products = [B_sent[c][name] @ A_sent[c][name] for c in range(3)]
        assert min(float((products[0] - p).abs().max()) for p in products[1:]) > 1e-2  # the clients disagree
        ideal = sum(WEIGHTS[c] * products[c] for c in range(3))
        layer = backbone.lora_layers[name]
        x = rand(5, spec.in_features, seed=7)
        expected = x @ (layer.pretrained_weight + s_max * ideal).T + layer.base.bias
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_ffa_lora_shared_frozen_A_and_B_only_messages():
    algo, fed = make_algo("ffa_lora")
    A0 = {n: a.clone() for n, a in algo.A.items()}
    for _ in range(2):  # two rounds: A never changes, every client uses the first r_i rows
        for cid, r in enumerate(RANKS):
            msg, model = algo.download(cid)
            assert model.train_A is False
            assert all(k.startswith(("lora_B/", "head/")) for k in msg)
            for n in fed.layers:
                assert torch.equal(model.A[n], A0[n][:r])  # bit-identical
                assert model.B[n].shape == (fed.layers[n].out_features, r)
        uploads = random_uploads(algo, fed, factors=("B",))
        assert all(k.startswith(("lora_B/", "head/")) for u in uploads.values() for k in u)
        algo.aggregate(uploads, WEIGHTS)
        for n in fed.layers:
            Bs, cids = parts_B(uploads, n)
            expected = sum(WEIGHTS[c] * pad_B(b, 6) for b, c in zip(Bs, cids))
            torch.testing.assert_close(algo.B[n], expected, rtol=0, atol=1e-12)
            # exact aggregation: the server's product is the average of the clients' products
            ideal = sum(WEIGHTS[c] * b @ A0[n][: b.shape[1]] for b, c in zip(Bs, cids))
            torch.testing.assert_close(algo.B[n] @ algo.A[n], ideal, rtol=0, atol=1e-12)
    assert all(torch.equal(algo.A[n], A0[n]) for n in fed.layers)


def parts_B(uploads, name):
    cids = sorted(uploads)
    return [uploads[c][f"lora_B/{name}"] for c in cids], cids


def test_ffa_lora_frozen_A_through_the_simulator():
    """A is not trained by the simulator (train_A=False) and identical on every client."""
    backbone = tiny_backbone()
    fed = tiny_federation(backbone, RANKS, [20, 30, 40])
    algo = get_algorithm("ffa_lora")(fed)
    A0 = {n: a.clone() for n, a in algo.A.items()}
    clients = [tiny_data(n, seed=10 + i) for i, n in enumerate([20, 30, 40])]
    cfg = RunConfig(rounds=2, batch_size=8, optimizer="sgd", lr=0.1, progress=False)
    sim = Simulation(algo, backbone, clients, tiny_data(30, seed=99), cfg, [[0, 1, 2], [0, 1, 2]], seed=0)
    sim.run()
    assert all(torch.equal(algo.A[n], A0[n]) for n in fed.layers)
    assert any(algo.B[n].abs().max() > 0 for n in fed.layers)  # B did train
    trained, _, _, _ = sim.train_client(2, 1, algo.download(1)[1])
    assert all(torch.equal(trained.A[n], A0[n][:4]) for n in fed.layers)


def test_ffa_lora_fold_scales_makes_the_server_model_the_average_update():
    algo, fed = make_algo("ffa_lora", fold_scales=True)
    uploads = random_uploads(algo, fed, factors=("B",))
    algo.aggregate(uploads, WEIGHTS)
    s_max = fed.scale(6)
    for n in fed.layers:
        Bs, cids = parts_B(uploads, n)
        s = [fed.scale(fed.ranks[c]) for c in cids]
        ideal = sum(WEIGHTS[c] * sc * b @ algo.A[n][: b.shape[1]] for b, c, sc in zip(Bs, cids, s))
        torch.testing.assert_close(s_max * algo.B[n] @ algo.A[n], ideal, rtol=0, atol=1e-12)
    # the client of rank 2 starts from the server's model truncated to its rank
    _, model = algo.download(0)
    for n in fed.layers:
        torch.testing.assert_close(model.scale * model.B[n], s_max * algo.B[n][:, :2], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------- LoRA-FAIR
def dense_ridge(As, Bs, p, A_bar, B_bar, lam):
    dW = sum(w * pad_B(b, A_bar.shape[0]) @ pad_A(a, A_bar.shape[0]) for a, b, w in zip(As, Bs, p))
    G = A_bar @ A_bar.T
    eye = torch.eye(G.shape[0], dtype=G.dtype)
    return (dW - B_bar @ A_bar) @ A_bar.T @ torch.linalg.inv(G + lam * eye), dW


@pytest.mark.parametrize("correction", ["closed_form", "cosine"])
def test_lora_fair_correction_reduces_the_residual(correction):
    algo, fed = make_algo("lora_fair", correction=correction)
    uploads = random_uploads(algo, fed)
    plain, _ = make_algo("fedit")
    plain.aggregate(uploads, WEIGHTS)
    algo.aggregate(uploads, WEIGHTS)
    for name in fed.layers:
        As, Bs, cids = parts(uploads, name)
        p = [WEIGHTS[c] for c in cids]
        A_bar, B_bar = plain.A[name], plain.B[name]
        torch.testing.assert_close(algo.A[name], A_bar, rtol=0, atol=0)  # A is never corrected
        dB_dense, dW = dense_ridge(As, Bs, p, A_bar, B_bar, 0.01)
        corrected = algo.B[name] @ A_bar
        cos = torch.nn.functional.cosine_similarity
        if correction == "closed_form":
            torch.testing.assert_close(algo.B[name], B_bar + dB_dense, rtol=1e-9, atol=1e-10)
            assert torch.linalg.norm(dW - corrected) < 0.9 * torch.linalg.norm(dW - B_bar @ A_bar)
        else:
            plain_cos = cos((B_bar @ A_bar).flatten(), dW.flatten(), dim=0)
            assert cos(corrected.flatten(), dW.flatten(), dim=0) > plain_cos
    for cid, r in enumerate(RANKS):  # clients start from the corrected pair, cut to their rank
        _, model = algo.download(cid)
        for name in fed.layers:
            assert torch.equal(model.A[name], algo.A[name][:r])
            assert torch.equal(model.B[name], algo.B[name][:, :r])


def test_lora_fair_closed_form_is_the_ridge_optimum():
    """Never forms dW, yet equals the dense ridge fit; the gradient of the ridge objective vanishes."""
    As = [rand(r, 11, seed=r) for r in RANKS]
    Bs = [rand(13, r, seed=20 + r) for r in RANKS]
    p = [0.5, 0.25, 0.25]
    A_bar = sum(w * pad_A(a, 6) for a, w in zip(As, p))
    B_bar = sum(w * pad_B(b, 6) for b, w in zip(Bs, p))
    dB = closed_form_correction(As, Bs, p, A_bar, B_bar, 0.01)
    dB_dense, dW = dense_ridge(As, Bs, p, A_bar, B_bar, 0.01)
    torch.testing.assert_close(dB, dB_dense, rtol=1e-10, atol=1e-10)
    X = dB.clone().requires_grad_(True)
    loss = ((dW - (B_bar + X) @ A_bar) ** 2).sum() + 0.01 * (X**2).sum()
    (grad,) = torch.autograd.grad(loss, X)
    assert grad.abs().max() < 1e-9
    # the cosine objective also improves on plain averaging (and never gets worse than dB = 0)
    dBc = cosine_correction(As, Bs, p, A_bar, B_bar, 0.01, steps=200, lr=0.01)
    cos = torch.nn.functional.cosine_similarity
    before = cos((B_bar @ A_bar).flatten(), dW.flatten(), dim=0)
    after = cos(((B_bar + dBc) @ A_bar).flatten(), dW.flatten(), dim=0)
    assert after > before


def test_lora_fair_never_merges_into_the_base():
    algo, fed = make_algo("lora_fair")
    algo.aggregate(random_uploads(algo, fed), WEIGHTS)
    _, model = algo.download(1)
    assert model.base_delta is None and not model.offsets
    assert algo.eval_model().scale == fed.scale(6)


# ------------------------------------------------------------------------------------------- options
def test_option_validation_names_field_and_choices():
    with pytest.raises(ValueError, match=r"correction 'qr'.*closed_form, cosine"):
        LoRAFAIRConfig(correction="qr")
    with pytest.raises(ValueError, match="lam"):
        LoRAFAIRConfig(lam=-1.0)
    with pytest.raises(ValueError, match="no option 'lam'.*fold_scales"):
        build_config(get_algorithm("ffa_lora"), {"lam": 0.1})
    with pytest.raises(ConfigError, match="correction"):
        resolve_config(["method=lora_fair", "method_args.correction=bogus"])


# Each method's documented defaults (ALGORITHMS.md: LoRA-FAIR's closed-form ridge fit with lambda = 0.01;
# FFA-LoRA averages raw B; FLoRA merges every stack into the base; the authors' variants off), and one option.
DEFAULTS = {
    "flora": ({"authors_merge": False}, ("authors_merge", True)),
    "lora_fair": ({"correction": "closed_form", "lam": 0.01, "fold_scales": False, "control_variates": False,
                   "authors_merged_base": False, "authors_local_head": False}, ("lam", 0.5)),
    "ffa_lora": ({"fold_scales": False, "authors_trained_A": False, "control_variates": False}, ("fold_scales", True)),
}


@pytest.mark.parametrize("method", ["flora", "lora_fair", "ffa_lora"])
def test_method_configs_resolve(method: str):
    """The smoke preset with each method: the registered method's options hold its documented defaults, and an
    option given on the command line reaches the built algorithm and changes what it aggregates."""
    defaults, (key, value) = DEFAULTS[method]
    options = method_options(resolve_config([f"method={method}", "preset=smoke"]))
    cls = get_algorithm(method)
    assert type(options) is cls.Config
    assert {k: getattr(options, k) for k in defaults} == defaults
    overridden = method_options(resolve_config([f"method={method}", "preset=smoke", f"method_args.{key}={value}"]))
    assert getattr(overridden, key) == value
    assert {k: getattr(overridden, k) for k in defaults if k != key} == {k: v for k, v in defaults.items() if k != key}
    backbone = tiny_backbone()
    fed = tiny_federation(backbone, ranks=RANKS, sizes=[20, 30, 50])
    plain, changed = cls(fed, options), cls(fed, overridden)
    assert getattr(changed.config, key) == value
    factors = ("B",) if method == "ffa_lora" else ("A", "B")
    for algo in (plain, changed):
        algo.aggregate(random_uploads(algo, fed, seed=3, factors=factors), WEIGHTS)
    name = next(iter(fed.layers))

    def dense(m: ClientModel) -> torch.Tensor:  # the evaluated update of one layer
        return m.scale * m.B[name] @ m.A[name] + (0 if m.base_delta is None else m.base_delta[name])

    assert float((dense(plain.eval_model()) - dense(changed.eval_model())).abs().max()) > 1e-6
