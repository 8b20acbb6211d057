"""DeepSpeed configuration: a JSON template from conf/, completed by parameters.

The JSON files hold what a DeepSpeed user expects to tune there (ZeRO stage,
bucket sizes); precision, offload and batch sizes come from the parameters,
so one switch in conf/ changes them for every stage.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from muco_flow.modeling.backbone import PRECISIONS
from muco_flow.training.config import TrainingConfig


def load_deepspeed_template(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config '{path}' does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config '{path}' is not valid JSON: {err}") from err


def resolve_deepspeed_config(
    template: dict[str, Any],
    *,
    precision: str,
    learning_rate: float,
    offload_optimizer: bool,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    gradient_clipping: float,
    on_cpu: bool,
) -> dict[str, Any]:
    """The complete DeepSpeed config for one run."""
    if precision not in PRECISIONS:
        # fp16 is left out on purpose: DeepSpeed's CPU accelerator has no fp16
        # loss scaling, and bf16 needs none.
        raise ValueError(f"training precision must be one of {PRECISIONS}, got '{precision}'")
    config = copy.deepcopy(template)
    zero = config.setdefault("zero_optimization", {})
    if "stage" not in zero:
        raise ValueError("DeepSpeed config has no zero_optimization.stage")
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = gradient_accumulation_steps
    config["gradient_clipping"] = gradient_clipping
    config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    config["optimizer"].setdefault("params", {})["lr"] = learning_rate
    config["bf16"] = {"enabled": precision == "bf16"}
    config.pop("fp16", None)
    if offload_optimizer:
        if zero["stage"] == 0:
            raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3, the config has stage 0")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    else:
        zero.pop("offload_optimizer", None)
    if on_cpu:
        # DeepSpeed's fused and CPU Adam are C++ extensions compiled at first
        # use; torch's own Adam needs no compiler.
        config["optimizer"]["params"]["torch_adam"] = True
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def training_deepspeed_config(
    training: TrainingConfig, *, on_cpu: bool, template: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The DeepSpeed config of a run with the `training` settings.

    ``template`` replaces the file named by `training.deepspeed.config`.
    """
    return resolve_deepspeed_config(
        load_deepspeed_template(training.deepspeed.config) if template is None else template,
        precision=training.precision,
        learning_rate=training.learning_rate,
        offload_optimizer=training.deepspeed.offload_optimizer,
        micro_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        gradient_clipping=training.gradient_clipping,
        on_cpu=on_cpu,
    )


def validate_deepspeed_config(config: dict[str, Any]) -> None:
    """Raises ValueError naming the problem if DeepSpeed would reject ``config``."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(copy.deepcopy(config))
    except Exception as err:  # DeepSpeed raises assertion, pydantic and value errors alike
        raise ValueError(f"invalid DeepSpeed config: {err}") from err
