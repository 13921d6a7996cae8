"""What a remote caller may set, names that stay names, and sizes checked against the backbones.

The command-line cases (one line, exit 2, nothing written) are in tests/test_drill.py; here: the Flower
app's allow-list through its run config, the model limits against the real layers, and a partition
that would leave a client without data.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest

from ilora.config import PUBLIC_KEYS, resolve_config
from ilora.data.partition import PartitionSpec, partition
from ilora.errors import ConfigError
from ilora.models import available_models, build_model, model_limits
from ilora.models.base import ModelOptions
from ilora.paths import is_plain_name

needs_flower = pytest.mark.skipif(importlib.util.find_spec("flwr") is None, reason="needs the flower extra")


@pytest.mark.parametrize("name", ["fedit-bbc_news-minilm-s42-0123abcd", "my.run+2=a", "A1"])
def test_plain_names_pass(name):
    assert is_plain_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b", "/abs", ".hidden", "-flag", "a..b",
                                  "x" * 129, "é", "a b", "a\nb", None, 3])
def test_anything_else_is_not_a_plain_name(name):
    assert not is_plain_name(name)


# ------------------------------------------------------------------------------------------- Flower
@needs_flower
def test_the_callers_keys_are_run_settings_and_no_path_device_or_account():
    from ilora.flower import CALLER_KEYS

    assert CALLER_KEYS <= set(PUBLIC_KEYS)
    operator_only = {"out_dir", "data_dir", "run_id", "device", "threads", "wandb", "wandb_project", "wandb_group",
                     "wandb_tags", "export", "engine", "progress", "flower_client_cpus", "flower_client_gpus",
                     "dp", "dp_clip", "dp_noise_multiplier", "dp_epsilon", "dp_delta"}
    assert not CALLER_KEYS & operator_only
    assert set(PUBLIC_KEYS) - CALLER_KEYS == operator_only  # a new key must be put on one side deliberately


@needs_flower
@pytest.mark.parametrize("overrides,fragment", [
    ("preset=smoke out_dir=/etc", "'out_dir' cannot be set by a flwr run caller"),
    ("preset=smoke run_id=../../escaped", "'run_id' cannot be set"),
    ("preset=smoke data_dir=/", "'data_dir' cannot be set"),
    ("preset=smoke wandb=online", "'wandb' cannot be set"),
    ("preset=smoke export=merged", "'export' cannot be set"),
    ("preset=smoke device=cuda", "'device' cannot be set"),
])
def test_a_flwr_run_caller_cannot_name_paths_devices_or_accounts(overrides, fragment, monkeypatch):
    from ilora.flower.app import config_from_context

    monkeypatch.delenv("ILORA_FLOWER_SERVER_OVERRIDES", raising=False)
    with pytest.raises(ConfigError, match="cannot be set by a flwr run caller") as caught:
        config_from_context(SimpleNamespace(run_config={"config": "", "overrides": overrides}))
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


@needs_flower
def test_a_callers_config_file_is_refused(monkeypatch):
    from ilora.flower.app import config_from_context

    with pytest.raises(ConfigError, match="may not name a file on the app's machine"):
        config_from_context(SimpleNamespace(run_config={"config": "/etc/passwd", "overrides": "preset=smoke"}))


@needs_flower
def test_the_operator_sets_the_paths_and_the_caller_the_experiment(tmp_path, monkeypatch):
    from ilora.flower import split_overrides
    from ilora.flower.app import config_from_context

    caller, operator = split_overrides(["preset=smoke", "method=ilora", "method_args.init=standard", "seed=7",
                                        f"out_dir={tmp_path}", "threads=1"])
    assert operator == [f"out_dir={tmp_path}", "threads=1"]
    monkeypatch.setenv("ILORA_FLOWER_SERVER_OVERRIDES", " ".join(operator))
    cfg = config_from_context(SimpleNamespace(run_config={"config": "", "overrides": " ".join(caller)}))
    assert (cfg.method, cfg.seed, cfg.method_args["init"]) == ("ilora", 7, "standard")
    assert (cfg.out_dir, cfg.threads) == (str(tmp_path.resolve()), "1")


# ------------------------------------------------------------------------------------------- sizes
def test_every_listed_model_states_its_limits():
    for name, (kind, _) in available_models().items():
        limits = model_limits(name)
        assert limits.max_rank is not None and limits.max_rank > 0, name
        if kind == "text":
            assert limits.max_length is not None, name


@pytest.mark.parametrize("model,options", [
    ("minilm", {}),
    ("efficientnet_lite0", {"lora_targets": "expand_project", "image_size": 32}),
    ("efficientnet_lite0", {"lora_targets": "project", "image_size": 32}),
    ("efficientnet_lite0", {"lora_targets": "all", "image_size": 32}),
])
def test_the_rank_limit_is_the_smallest_adapted_layer(model, options):
    backbone = build_model(model, ModelOptions(num_classes=3, **options))
    smallest = min(min(layer.in_features, layer.out_features) for layer in backbone.lora_layers.values())
    assert model_limits(model).max_rank == smallest


def test_the_text_limit_is_the_position_embeddings():
    backbone = build_model("minilm", ModelOptions(num_classes=3))
    embeddings = next(m for n, m in backbone.module.named_modules() if n.endswith("position_embeddings"))
    assert model_limits("minilm").max_length == embeddings.num_embeddings


@pytest.mark.slow
@pytest.mark.parametrize("model,arch", [("vit_base", "vit_base_patch16_224"),
                                        ("swin_base", "swin_base_patch4_window7_224")])
def test_the_timm_rank_limits_are_their_smallest_q_and_v(model, arch):
    import timm

    net = timm.create_model(arch, pretrained=False)
    smallest = min(m.in_features for n, m in net.named_modules() if n.endswith("qkv"))  # q, v: d x d
    assert model_limits(model).max_rank == smallest


def test_a_limit_ends_the_config_before_any_model_or_data():
    with pytest.raises(ConfigError, match=r"^max_length 513 exceeds minilm's 512"):
        resolve_config(["preset=smoke", "max_length=513"])
    assert resolve_config(["preset=smoke", "max_length=512"]).max_length == 512


def test_a_partition_that_leaves_a_client_without_data_is_a_config_error():
    labels = np.array([0, 1])  # two examples, three clients
    with pytest.raises(ConfigError, match="would get no training example"):
        partition(labels, PartitionSpec(scheme="iid", num_clients=3, seed=0))
