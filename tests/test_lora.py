"""Our LoRA layers against PEFT and against their own definitions (float64, tight tolerances)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ilora.lora import (
    LoRAConv1x1,
    LoRALinear,
    QKVLoRA,
    inject_conv1x1_lora,
    inject_lora,
    inject_qkv_lora,
    lora_scale,
    peft_state_dict,
    save_peft_adapter,
)

peft = pytest.importorskip("peft")
TOL = dict(rtol=1e-10, atol=1e-12)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 9)
        self.fc2 = nn.Linear(9, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().double()


def random_factors(layers: dict[str, LoRALinear], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in layers.items():
        r = layer.rank
        A = torch.randn(r, layer.in_features, generator=g, dtype=torch.float64)
        B = torch.randn(layer.out_features, r, generator=g, dtype=torch.float64)
        out[name] = (A, B)
    return out


def peft_layer(model: nn.Module, name: str) -> nn.Module:
    return model.base_model.model.get_submodule(name)


@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_and_gradients_match_peft(rslora: bool):
    from peft import LoraConfig, get_peft_model

    base = mlp()
    ours = copy.deepcopy(base)
    layers = inject_lora(ours, ["fc1", "fc2"], rank=3, alpha=5.0, dropout=0.0, rslora=rslora)
    config = LoraConfig(r=3, lora_alpha=5.0, target_modules=["fc1", "fc2"], lora_dropout=0.0, use_rslora=rslora)
    theirs = get_peft_model(copy.deepcopy(base), config)
    for name, (A, B) in random_factors(layers, 1).items():
        layers[name].set_factors(A, B)
        with torch.no_grad():
            peft_layer(theirs, name).lora_A["default"].weight.copy_(A)
            peft_layer(theirs, name).lora_B["default"].weight.copy_(B)
        assert layers[name].scaling == pytest.approx(peft_layer(theirs, name).scaling["default"])

    x = torch.randn(7, 6, dtype=torch.float64)
    target = torch.randn(7, 3, dtype=torch.float64)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, **TOL)
    F.mse_loss(out_ours, target).backward()
    F.mse_loss(out_theirs, target).backward()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.lora_A.grad, peft_layer(theirs, name).lora_A["default"].weight.grad, **TOL)
        torch.testing.assert_close(layer.lora_B.grad, peft_layer(theirs, name).lora_B["default"].weight.grad, **TOL)
        assert layer.base.weight.grad is None  # the base stays frozen


def test_offset_at_init_gives_the_base_output():
    base = mlp()
    ours = copy.deepcopy(base)
    layers = inject_lora(ours, ["fc1", "fc2"], rank=4, alpha=8.0)
    for name, (A, B) in random_factors(layers, 2).items():
        s = lora_scale(8.0, 4)
        layers[name].set_factors(A, B, scale=s, offset=(A, B, s))
        torch.testing.assert_close(layers[name].delta_weight(), torch.zeros_like(layers[name].base.weight), **TOL)
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(ours(x), base(x), **TOL)


def test_set_base_delta_and_merged_weight():
    torch.manual_seed(3)
    linear = nn.Linear(6, 4).double()
    w0 = linear.weight.detach().clone()
    layer = LoRALinear(linear, rank=2, alpha=4.0)
    A, B = torch.randn(2, 6, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    layer.set_factors(A, B)
    delta = torch.randn(4, 6, dtype=torch.float64)
    layer.set_base_delta(delta)
    x = torch.randn(3, 6, dtype=torch.float64)
    expected_w = w0 + delta + 2.0 * B @ A
    torch.testing.assert_close(layer.merged_weight(), expected_w, **TOL)
    torch.testing.assert_close(layer(x), F.linear(x, expected_w, linear.bias), **TOL)
    torch.testing.assert_close(layer.pretrained_weight, w0, **TOL)
    layer.set_base_delta(2 * delta)  # deltas replace, they do not accumulate
    torch.testing.assert_close(layer.base.weight, w0 + 2 * delta, **TOL)
    layer.set_base_delta(None)
    torch.testing.assert_close(layer.base.weight, w0, rtol=0, atol=0)


def test_saved_adapter_loads_into_peft_with_the_same_outputs(tmp_path):
    from peft import PeftModel

    base = mlp()
    torch.save(base.state_dict(), tmp_path / "base.pt")  # the "pretrained" tiny model, saved locally
    ours = copy.deepcopy(base)
    layers = inject_lora(ours, ["fc1", "fc2"], rank=4, alpha=6.0)
    ranks = {"fc1": 2, "fc2": 4}  # heterogeneous ranks go through PEFT's rank_pattern
    g = torch.Generator().manual_seed(4)
    A = {n: torch.randn(r, layers[n].in_features, generator=g, dtype=torch.float64) for n, r in ranks.items()}
    B = {n: torch.randn(layers[n].out_features, r, generator=g, dtype=torch.float64) for n, r in ranks.items()}
    for n in ranks:
        layers[n].set_factors(A[n], B[n])
    with torch.no_grad():  # a trained head travels as PEFT's modules_to_save
        ours.head.weight.add_(0.5)
        ours.head.bias.sub_(0.25)
    keys = set(peft_state_dict(A, B))
    assert keys == {f"base_model.model.{n}.lora_{f}.weight" for n in ranks for f in "AB"}
    head = {"head.weight": ours.head.weight, "head.bias": ours.head.bias}
    save_peft_adapter(tmp_path / "adapter", A, B, alpha=6.0, modules_to_save=["head"], extra_tensors=head)

    fresh = MLP().double()
    fresh.load_state_dict(torch.load(tmp_path / "base.pt"))
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    loaded.double()
    x = torch.randn(6, 6, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), ours(x), **TOL)
    assert not torch.allclose(loaded(x), base(x))


# ---------------------------------------------------------------------------------------------
# A fused qkv projection with q / v slice adapters equals separate q / v adapters
# ---------------------------------------------------------------------------------------------


def _qkv_pair(dim: int = 8, rank: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    fused = nn.Linear(dim, 3 * dim).double()
    q, k, v = (nn.Linear(dim, dim).double() for _ in range(3))
    with torch.no_grad():
        for i, lin in enumerate((q, k, v)):
            lin.weight.copy_(fused.weight[i * dim : (i + 1) * dim])
            lin.bias.copy_(fused.bias[i * dim : (i + 1) * dim])
    wrapped = QKVLoRA(copy.deepcopy(fused), rank, alpha=6.0)
    lq, lv = LoRALinear(q, rank, 6.0), LoRALinear(v, rank, 6.0)
    g = torch.Generator().manual_seed(seed + 1)
    for ours, ref in ((wrapped.q, lq), (wrapped.v, lv)):
        A = torch.randn(rank, dim, generator=g, dtype=torch.float64)
        B = torch.randn(dim, rank, generator=g, dtype=torch.float64)
        ours.set_factors(A, B)
        ref.set_factors(A, B)
    return wrapped, (lq, k, lv), fused


def test_qkv_slices_equal_separate_q_v_adapters():
    wrapped, (lq, k, lv), _ = _qkv_pair()
    assert (wrapped.q.out_features, wrapped.q.in_features) == (8, 8)
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    out = wrapped(x)
    ref = torch.cat([lq(x), k(x), lv(x)], dim=-1)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(wrapped.q(x), lq(x), **TOL)  # a slice's own forward is its projection
    target = torch.randn_like(out)
    F.mse_loss(out, target).backward()
    F.mse_loss(ref, target).backward()
    for ours, theirs in ((wrapped.q, lq), (wrapped.v, lv)):
        torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A.grad, **TOL)
        torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B.grad, **TOL)
    assert wrapped.qkv.weight.grad is None


def test_qkv_slice_offset_base_delta_and_pretrained_weight():
    wrapped, (lq, k, lv), fused = _qkv_pair(seed=5)
    dim = 8
    w0 = fused.weight.detach()
    torch.testing.assert_close(wrapped.q.pretrained_weight, w0[:dim], rtol=0, atol=0)
    torch.testing.assert_close(wrapped.v.pretrained_weight, w0[2 * dim :], rtol=0, atol=0)
    dq, dv = torch.randn(dim, dim, dtype=torch.float64), torch.randn(dim, dim, dtype=torch.float64)
    wrapped.q.set_base_delta(dq)
    wrapped.v.set_base_delta(dv)
    torch.testing.assert_close(wrapped.qkv.weight, torch.cat([w0[:dim] + dq, w0[dim : 2 * dim], w0[2 * dim :] + dv]))
    torch.testing.assert_close(wrapped.q.pretrained_weight, w0[:dim], rtol=0, atol=0)
    torch.testing.assert_close(wrapped.v.merged_weight(), w0[2 * dim :] + dv + wrapped.v.delta_weight(), **TOL)
    lq.set_base_delta(dq)
    lv.set_base_delta(dv)
    x = torch.randn(3, dim, dtype=torch.float64)
    torch.testing.assert_close(wrapped(x), torch.cat([lq(x), k(x), lv(x)], -1), **TOL)
    wrapped.q.set_base_delta(None)
    wrapped.v.set_base_delta(None)
    torch.testing.assert_close(wrapped.qkv.weight, w0, rtol=0, atol=0)
    # an offset equal to the factors cancels them: the fused layer's plain output
    for layer in (wrapped.q, wrapped.v):
        layer.set_factors(layer.lora_A, layer.lora_B, offset=(layer.lora_A, layer.lora_B, layer.scaling))
    torch.testing.assert_close(wrapped(x), fused(x), **TOL)


def test_qkv_lora_inside_timm_attention_equals_separate_adapters():
    from timm.layers import Attention

    torch.manual_seed(0)
    attn = Attention(dim=12, num_heads=3, qkv_bias=True).double().eval()
    ref = copy.deepcopy(attn)
    layers = inject_qkv_lora(attn, rank=2, alpha=4.0)
    assert sorted(layers) == ["qkv.q", "qkv.v"]
    g = torch.Generator().manual_seed(1)
    dim = 12
    w, b = ref.qkv.weight.detach(), ref.qkv.bias.detach()
    separate = []
    for i, name in enumerate(("qkv.q", None, "qkv.v")):
        lin = nn.Linear(dim, dim).double()
        with torch.no_grad():
            lin.weight.copy_(w[i * dim : (i + 1) * dim])
            lin.bias.copy_(b[i * dim : (i + 1) * dim])
        if name is not None:
            lin = LoRALinear(lin, 2, 4.0)
            A = torch.randn(2, dim, generator=g, dtype=torch.float64)
            B = torch.randn(dim, 2, generator=g, dtype=torch.float64)
            lin.set_factors(A, B)
            layers[name].set_factors(A, B)
        separate.append(lin)
    x = torch.randn(2, 5, dim, dtype=torch.float64)
    q, k, v = (lin(x).view(2, 5, 3, 4).transpose(1, 2) for lin in separate)
    att = ((q @ k.transpose(-2, -1)) / 2.0).softmax(-1) @ v
    expected = ref.proj(att.transpose(1, 2).reshape(2, 5, dim))
    torch.testing.assert_close(attn(x), expected, **TOL)


# ---------------------------------------------------------------------------------------------
# LoRA on a 1x1 convolution equals LoRA on the same d x k matrix applied per pixel
# ---------------------------------------------------------------------------------------------


def test_conv1x1_lora_equals_per_pixel_linear_lora():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, kernel_size=1, bias=True).double()
    linear = nn.Linear(6, 4).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight[:, :, 0, 0])
        linear.bias.copy_(conv.bias)
    ours, ref = LoRAConv1x1(conv, 3, 5.0), LoRALinear(linear, 3, 5.0)
    assert (ours.out_features, ours.in_features) == (4, 6)
    torch.testing.assert_close(ours.pretrained_weight, linear.weight, rtol=0, atol=0)
    A, B = torch.randn(3, 6, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    ours.set_factors(A, B)
    ref.set_factors(A, B)
    delta = torch.randn(4, 6, dtype=torch.float64)
    ours.set_base_delta(delta)
    ref.set_base_delta(delta)
    torch.testing.assert_close(ours.merged_weight(), ref.merged_weight(), **TOL)
    torch.testing.assert_close(conv.weight[:, :, 0, 0], linear.weight, **TOL)

    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    out = ours(x)
    expected = ref(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, expected, **TOL)
    target = torch.randn_like(out)
    F.mse_loss(out, target).backward()
    F.mse_loss(expected, target).backward()
    torch.testing.assert_close(ours.lora_A.grad, ref.lora_A.grad, **TOL)
    torch.testing.assert_close(ours.lora_B.grad, ref.lora_B.grad, **TOL)

    ours.set_factors(A, B, offset=(A, B, ours.scaling))
    ours.set_base_delta(None)
    torch.testing.assert_close(ours(x), F.conv2d(x, conv.weight, conv.bias), **TOL)


def test_inject_conv1x1_lora_only_wraps_targeted_pointwise_convs():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 1))
    layers = inject_conv1x1_lora(net, ["1"], rank=2, alpha=4.0)
    assert list(layers) == ["1"] and isinstance(net[1], LoRAConv1x1)
    assert isinstance(net[2], nn.Conv2d) and not any(p.requires_grad for p in net[0].parameters())
    with pytest.raises(ValueError):
        LoRAConv1x1(nn.Conv2d(3, 3, 3), 2, 4.0)
