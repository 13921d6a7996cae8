"""Every registered method split as it runs on Flower, against the in-process object, bit for bit.

In-process, one object plays server and clients. Split, the server object only downloads and
aggregates; each client is served by a replica that has nothing but the message, the run's static
facts and its own state, which is serialised between rounds (as a ClientApp keeps it in Flower's
context). Over four rounds with partial participation, the rebuilt models, the training hooks'
values, the uploads and the evaluated models must be identical.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_backbone, tiny_federation

from ilora.algorithm import ClientModel, available_algorithms, build_config, get_algorithm
from ilora.checkpoint import from_tensors, to_tensors

RANKS = [2, 4, 6]
SAMPLING = [[0, 1, 2], [0, 2], [1, 2], [0, 1]]  # client 1 misses round 2, client 0 round 3
WEIGHTS = [20, 30, 50]


def rand_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=t.dtype)


def assert_same_dict(a, b, what):
    assert (a is None) == (b is None), what
    if a is not None:
        assert a.keys() == b.keys(), what
        for k in a:
            if isinstance(a[k], tuple):
                assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) and a[k][2] == b[k][2], what
            else:
                assert torch.equal(a[k], b[k]), f"{what}: {k}"


def assert_same_model(a: ClientModel, b: ClientModel, what: str) -> None:
    for part in ("A", "B", "head", "offsets", "base_delta", "R"):
        assert_same_dict(getattr(a, part), getattr(b, part), f"{what} {part}")
    assert (a.scale, a.train_A, a.train_B, a.train_R) == (b.scale, b.train_A, b.train_B, b.train_R), what


def train(algo, cid: int, t: int, model: ClientModel) -> tuple[ClientModel, dict]:
    """A stand-in for local training that goes through every client-side hook."""
    params = {k: v.clone() for k, v in model.flat(model.trained_factors).items()}
    algo.on_local_start(cid, lambda **how: {k: rand_like(v, 7 + t * 10 + cid) + v for k, v in params.items()})
    hooks = {"correction": algo.gradient_correction(cid), "penalty": algo.local_loss(cid, params)}
    shrink = 0.1 ** (t + 1)  # smaller every round: HetLoRA's clients prune
    new = {which: {n: shrink * rand_like(x, 1000 * t + 100 * cid + i)
                   for i, (n, x) in enumerate(getattr(model, which).items())}
           for which in model.trained_factors}
    trained = ClientModel(
        A=new.get("A", model.A), B=new.get("B", model.B), head={n: h + 0.1 * (cid + 1) for n, h in model.head.items()},
        scale=model.scale, offsets=model.offsets, base_delta=model.base_delta, train_A=model.train_A,
        train_B=model.train_B, R=new.get("R", model.R), train_R=model.train_R,
    )
    return trained, hooks


def over_the_wire(message):
    return {k: v.detach().clone() for k, v in message.items()}


@pytest.mark.parametrize("method", available_algorithms())
def test_split_client_replica_matches_in_process(method):
    backbone = tiny_backbone()
    fed = tiny_federation(backbone, ranks=RANKS, sizes=WEIGHTS)
    fed.sampling = SAMPLING
    cls = get_algorithm(method)
    options = {"control_variates": True} if "control_variates" in cls.Config.__dataclass_fields__ else {}
    if method == "hetlora":
        options = {"gamma": 0.5}  # clients prune (their tails shrink in ``train``), the server must follow
    in_process, server, replica = (cls(fed, build_config(cls, options)) for _ in range(3))
    gradient = {n: rand_like(torch.zeros(s.out_features, s.in_features, dtype=fed.dtype), 3)
                for n, s in fed.layers.items()}
    for algo in (in_process, server):
        algo.initialize(lambda n: gradient)
    stored: dict[int, tuple] = {}  # each client's state between rounds, serialised
    ranks_seen: set[int] = set()

    for t, sampled in enumerate(SAMPLING):
        uploads_p, uploads_s = {}, {}
        for cid in sampled:
            _, model = in_process.download(cid)
            trained, hooks = train(in_process, cid, t, model)
            uploads_p[cid] = in_process.upload(cid, trained)

            message, _ = server.download(cid)
            replica.load_client_side_state(cid, from_tensors(*stored[cid]) if cid in stored else {})
            rebuilt = replica.receive(cid, over_the_wire(message), t)
            assert_same_model(rebuilt, model, f"{method} round {t} client {cid}")
            trained_r, hooks_r = train(replica, cid, t, rebuilt)
            assert_same_dict(hooks_r["correction"], hooks["correction"], "gradient correction")
            assert (hooks_r["penalty"] is None) == (hooks["penalty"] is None)
            if hooks["penalty"] is not None:
                assert torch.equal(hooks_r["penalty"], hooks["penalty"])
            uploads_s[cid] = over_the_wire(replica.upload(cid, trained_r))
            stored[cid] = to_tensors(replica.client_side_state(cid))
            ranks_seen.add(next(iter(rebuilt.A.values())).shape[0])
            replica.load_client_side_state(cid, {})  # nothing survives in the object itself

        for cid in sampled:
            assert_same_dict(uploads_s[cid], uploads_p[cid], f"{method} upload round {t} client {cid}")
        total = sum(WEIGHTS[c] for c in sampled)
        weights = {c: WEIGHTS[c] / total for c in sampled}
        in_process.aggregate(uploads_p, weights)
        server.aggregate(uploads_s, weights)

        personal = in_process.client_eval_models()
        if personal is None:
            assert_same_model(server.eval_model(), in_process.eval_model(), f"{method} global model round {t}")
        else:  # evaluated on the clients: the replica's model from the evaluation message
            for cid, model in personal.items():
                message, _ = server.download(cid)
                replica.load_client_side_state(cid, from_tensors(*stored[cid]) if cid in stored else {})
                assert_same_model(replica.receive(cid, over_the_wire(message), t + 1), model, f"{method} personal")
                replica.load_client_side_state(cid, {})
    if method == "hetlora":
        assert ranks_seen - set(RANKS), "no client pruned: the test does not exercise the server following the ranks"
