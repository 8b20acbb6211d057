"""conf/: every environment loads, and resolves to configurations DeepSpeed accepts."""

from __future__ import annotations

import pytest
from kedro.io import DataCatalog

from muco_flow.modeling.backbone import BackboneConfig
from muco_flow.training.deepspeed_config import (
    load_deepspeed_template,
    resolve_deepspeed_config,
    validate_deepspeed_config,
)
from tests.conftest import PROJECT_ROOT, config_loader, load_params


def resolved_deepspeed(training: dict, on_cpu: bool) -> dict:
    return resolve_deepspeed_config(
        load_deepspeed_template(PROJECT_ROOT / training["deepspeed"]["config"]),
        precision=training["precision"],
        learning_rate=training["learning_rate"],
        offload_optimizer=training["deepspeed"]["offload_optimizer"],
        micro_batch_size=training["micro_batch_size"],
        gradient_accumulation_steps=training["gradient_accumulation_steps"],
        gradient_clipping=training["gradient_clipping"],
        on_cpu=on_cpu,
    )


def test_cluster_environment_is_a_bf16_flash_attention_zero2_offload_run():
    loader = config_loader("cluster")
    checkpoint = DataCatalog.from_config(loader["catalog"], credentials=loader["credentials"])
    assert checkpoint.load("backbone_checkpoint") == "Qwen/Qwen2-VL-2B-Instruct"  # checked, not downloaded
    params = load_params("cluster")
    backbone = BackboneConfig.from_params(params["backbone"])
    assert backbone.precision == "bf16" and backbone.attn_implementation == "flash_attention_2"

    config = resolved_deepspeed(params["training"], on_cpu=False)
    validate_deepspeed_config(config)
    assert config["zero_optimization"]["stage"] == 2
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert config["bf16"] == {"enabled": True}
    assert "torch_adam" not in config["optimizer"]["params"]  # GPUs use DeepSpeed's fused optimizers


def test_base_environment_is_the_cpu_tiny_run():
    catalog = config_loader("base")["catalog"]
    assert catalog["backbone_checkpoint"]["path"] == "data/06_models/tiny-qwen2-vl"
    params = load_params("base")
    assert BackboneConfig.from_params(params["backbone"]).precision == "fp32"
    config = resolved_deepspeed(params["training"], on_cpu=True)
    validate_deepspeed_config(config)
    assert config["optimizer"]["params"]["torch_adam"] is True
    assert config["bf16"] == {"enabled": False} and "offload_optimizer" not in config["zero_optimization"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_zero_template_validates(stage):
    template = load_deepspeed_template(PROJECT_ROOT / f"conf/base/deepspeed/zero{stage}.json")
    config = resolve_deepspeed_config(
        template,
        precision="bf16",
        learning_rate=1e-4,
        offload_optimizer=True,
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        gradient_clipping=1.0,
        on_cpu=True,
    )
    validate_deepspeed_config(config)
    assert config["zero_optimization"]["stage"] == stage


def test_resolving_names_what_is_wrong(tmp_path):
    base = {"zero_optimization": {"stage": 0}}
    kwargs = dict(
        learning_rate=1e-4, micro_batch_size=1, gradient_accumulation_steps=1, gradient_clipping=1.0, on_cpu=True
    )
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_deepspeed_config(base, precision="fp16", offload_optimizer=False, **kwargs)
    with pytest.raises(ValueError, match="offload needs ZeRO stage 1, 2 or 3"):
        resolve_deepspeed_config(base, precision="fp32", offload_optimizer=True, **kwargs)
    with pytest.raises(ValueError, match=r"no zero_optimization\.stage"):
        resolve_deepspeed_config({}, precision="fp32", offload_optimizer=False, **kwargs)
    broken = tmp_path / "zero.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"zero\.json' is not valid JSON"):
        load_deepspeed_template(broken)
    with pytest.raises(ValueError, match="invalid DeepSpeed config"):
        validate_deepspeed_config({"zero_optimization": {"stage": 7}, "train_micro_batch_size_per_gpu": 1})


def test_credentials_template_is_not_loaded_as_configuration(project):
    # Kedro reads only .yml/.yaml/.json files; the template in conf/local must stay
    # inert, so the `local` environment sees the tracked "use the environment" entry.
    from kedro.config import OmegaConfigLoader

    from muco_flow import settings

    template = project / "conf/local/credentials.yml.template"
    assert template.is_file() and "YOUR_SECRET" in template.read_text()
    loader = OmegaConfigLoader(str(project / "conf"), **{**settings.CONFIG_LOADER_ARGS, "default_run_env": "local"})
    assert loader["credentials"]["m3t_s3"] == {}


def test_one_node_lets_torchrun_pick_the_port_and_several_nodes_must_agree_on_one():
    from pathlib import Path

    from muco_flow.torchrun import torchrun_command

    single = {"processes_per_node": 2, "nodes": 1, "master_port": None}
    standalone = torchrun_command(Path("c.json"), single, "muco_flow.training.train")
    assert standalone[-3:] == ["-m", "muco_flow.training.train", "c.json"]
    # torchrun binds (and keeps) a free port itself: nothing is chosen here
    assert "--standalone" in standalone and not any(a.startswith("--master_port") for a in standalone)
    fixed = torchrun_command(Path("c.json"), {**single, "nodes": 4, "node_rank": 1, "master_port": 29511}, "m")
    assert "--master_port=29511" in fixed and "--nnodes=4" in fixed and "--node_rank=1" in fixed
    assert "--standalone" not in fixed
    with pytest.raises(ValueError, match="master_port must be set when training on several nodes"):
        torchrun_command(Path("c.json"), {**single, "nodes": 2}, "m")
