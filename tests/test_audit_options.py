"""The ILoRA authors' ways of running the baselines, as audit options (off by default), in float64."""

from __future__ import annotations

import pytest
import torch
from test_baselines import RANKS, WEIGHTS, make_algo, random_uploads

from ilora.algorithm import unflatten
from ilora.global_adapter import local_random_head
from ilora.lowrank import pad_A


def effective_delta(model, name):
    """The dense update the evaluated/trained model adds to W0 for one layer."""
    delta = model.scale * (model.B[name] @ model.A[name])
    if model.base_delta is not None:
        delta = delta + model.base_delta[name]
    return delta


@pytest.mark.parametrize("method", ["fedit", "lora_fair", "ffa_lora"])
def test_defaults_are_the_faithful_methods(method):
    algo, fed = make_algo(method)
    assert not algo.config.authors_merged_base and not algo.config.authors_local_head
    algo.aggregate(random_uploads(algo, fed, factors=("B",) if method == "ffa_lora" else ("A", "B")), WEIGHTS)
    assert algo.eval_model().base_delta is None and algo.download(0)[1].base_delta is None
    assert any(k.startswith("head/") for k in algo.download(0)[0])


@pytest.mark.parametrize("method", ["fedit", "lora_fair", "ffa_lora"])
def test_authors_merged_base_applies_the_global_adapter_twice(method):
    algo, fed = make_algo(method, authors_merged_base=True)
    assert algo.download(1)[1].base_delta is None  # round 1: nothing merged yet
    algo.aggregate(random_uploads(algo, fed, factors=("B",) if method == "ffa_lora" else ("A", "B")), WEIGHTS)
    s = fed.scale(fed.max_rank)
    evaluated = algo.eval_model()
    for name in fed.layers:
        once = s * (algo.B[name] @ algo.A[name])
        assert torch.allclose(effective_delta(evaluated, name), 2 * once, atol=1e-12)
        _, client = algo.download(0)  # next round starts from the merged base plus the global adapter
        assert torch.allclose(client.base_delta[name], once, atol=1e-12)


@pytest.mark.parametrize("method", ["fedit", "lora_fair", "ffa_lora"])
def test_authors_local_head_never_sends_the_aggregated_head(method):
    algo, fed = make_algo(method, authors_local_head=True)
    factors = ("B",) if method == "ffa_lora" else ("A", "B")
    first = {c: algo.download(c)[1].head for c in range(3)}
    uploads = random_uploads(algo, fed, factors=factors)
    algo.aggregate(uploads, WEIGHTS)
    expected = {n: sum(WEIGHTS[c] * unflatten(uploads[c])[2][n] for c in uploads) for n in algo.head}
    assert all(torch.allclose(algo.eval_model().head[n], expected[n], atol=1e-12) for n in expected)
    for cid in range(3):
        message, model = algo.download(cid)
        assert not any(k.startswith("head/") for k in message)
        for n, h in model.head.items():  # the same fresh head every round, different per client
            assert torch.equal(h, first[cid][n]) and torch.equal(h, local_random_head(fed, fed.head_init, cid)[n])
    assert not torch.equal(first[0]["head.weight"], first[1]["head.weight"])


def test_ffa_lora_authors_trained_A_keeps_the_first_clients_A():
    algo, fed = make_algo("ffa_lora", authors_trained_A=True)
    message, model = algo.download(2)
    assert model.train_A and any(k.startswith("lora_A/") for k in message)
    uploads = random_uploads(algo, fed, factors=("A", "B"))
    algo.aggregate(uploads, WEIGHTS)
    for name in fed.layers:
        first_A = uploads[0][f"lora_A/{name}"]
        assert first_A.shape[0] == RANKS[0]
        assert torch.equal(algo.A[name], pad_A(first_A, fed.max_rank))  # rows 3..6 zero: effective rank 2
        assert torch.count_nonzero(algo.A[name][RANKS[0]:]) == 0


def test_flora_authors_merge_keeps_only_the_latest_stack_and_applies_it_twice():
    faithful, fed = make_algo("flora")
    audit, _ = make_algo("flora", authors_merge=True)
    for rnd in range(2):
        faithful.aggregate(random_uploads(faithful, fed, seed=10 * rnd), WEIGHTS)
        uploads = random_uploads(audit, fed, seed=10 * rnd)
        audit.aggregate(uploads, WEIGHTS)
    s_stack = fed.scale(sum(RANKS))  # one PEFT scale for the stacked adapter: alpha / sum r_i
    for name in fed.layers:
        A1, B1 = audit.stacks[-1][0][name], audit.stacks[-1][1][name]
        expected_A = torch.cat([WEIGHTS[c] * s_stack * uploads[c][f"lora_A/{name}"] for c in range(3)])
        assert torch.allclose(A1, expected_A, atol=1e-12)
        assert torch.allclose(audit.merged[name], B1 @ A1, atol=1e-12)  # round 1's stack dropped
        assert torch.allclose(effective_delta(audit.eval_model(), name), 2 * B1 @ A1, atol=1e-12)
        faithful_last = faithful.stacks[-1][1][name] @ faithful.stacks[-1][0][name]
        assert not torch.allclose(faithful.merged[name], faithful_last)  # the faithful merge accumulates
