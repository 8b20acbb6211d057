"""The `training` parameters as TrainingConfig (training/config.py): what it accepts, refuses and fingerprints."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from muco_flow.pipelines.finetune.nodes import finetuning_settings
from muco_flow.training.config import TrainingConfig, TrainingConfigError
from tests.conftest import DELETE, load_params, with_value

# The settings that did not enter the resume fingerprint when launch.py kept their list by hand
# (deepspeed: its config path only; offload_optimizer did enter)
HAND_KEPT_EXCLUSIONS = (
    "save_every",
    "keep_last",
    "log_every",
    "progress_every_s",
    "launcher",
    "run_name",
    "output_dir",
    "data_workers",
)


def base_training() -> dict:
    return load_params()["training"]


def test_every_environment_and_the_finetune_stage_validate():
    base = TrainingConfig.from_dict(base_training())
    assert (base.micro_batch_size, base.data_workers, base.launcher.processes_per_node) == (8, 1, 2)
    assert base.embedder.lora.r == 16 and base.grad_cache.chunk_size is None and base.max_steps is None
    cluster = TrainingConfig.from_dict(load_params("cluster")["training"])
    assert (cluster.precision, cluster.data_workers, cluster.launcher.processes_per_node) == ("bf16", 4, 8)
    assert cluster.embedder.gradient_checkpointing and cluster.deepspeed.offload_optimizer
    assert cluster.temperature == base.temperature  # what conf/cluster does not name comes from conf/base
    params = load_params()
    finetune = TrainingConfig.from_dict(finetuning_settings(params["training"], params["finetune"]["training"]))
    assert (finetune.output_dir, finetune.warmup_steps) == ("data/06_models/muco_finetune", 5)


def test_the_run_config_round_trips_through_json():
    training = base_training()
    config = TrainingConfig.from_dict(training)
    assert config.to_dict() == training  # exactly the parameters: the MLflow params and the run name read it
    written = json.loads(json.dumps(config.to_dict()))  # run_config.json, as each rank reads it
    assert TrainingConfig.from_dict(written) == config


def test_every_setting_is_in_conf_base_and_no_code_default_disagrees_with_it():
    def walk(cls: type, values: dict, key: str) -> list[str]:
        checked = []
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            dotted = f"{key}.{spec.name}"
            assert spec.name in values, f"{dotted} is not in conf/base/parameters_train.yml"
            if spec.default is not dataclasses.MISSING:
                assert spec.default == values[spec.name], f"{dotted}: code default {spec.default!r}"
            if spec.default_factory is not dataclasses.MISSING:
                assert dataclasses.asdict(spec.default_factory()) == values[spec.name], f"{dotted}: code default"
            if dataclasses.is_dataclass(hints[spec.name]):
                checked += walk(hints[spec.name], values[spec.name], dotted)
            checked.append(dotted)
        return checked

    checked = walk(TrainingConfig, base_training(), "training")
    # the embedder's settings are the model's, with MuCo's reference values as defaults: checked too
    assert {"training.embedder.lora.r", "training.embedder.lora.dropout", "training.embedder.bidirectional"} <= set(
        checked
    )


def test_the_fingerprint_leaves_out_what_the_hand_kept_list_left_out():
    training = base_training()
    # preemption and select came after the hand list, and are not part of the fingerprint either
    later = ("preemption", "select")
    by_hand = {k: v for k, v in training.items() if k not in (*HAND_KEPT_EXCLUSIONS, *later) and k != "deepspeed"}
    by_hand["deepspeed"] = {k: v for k, v in training["deepspeed"].items() if k != "config"}
    # of evaluation during training, only the held-out slice changes what is trained on
    by_hand["during_training"] = {"heldout_conversations": training["during_training"]["heldout_conversations"]}
    assert TrainingConfig.from_dict(training).fingerprinted() == by_hand


@pytest.mark.parametrize(
    ("dotted", "value", "enters"),
    [
        ("save_every", 7, False),
        ("keep_last", 5, False),
        ("log_every", 3, False),
        ("launcher.processes_per_node", 1, False),
        ("preemption.grace_s", 5, False),
        ("run_name", "another", False),
        ("output_dir", "elsewhere", False),
        ("deepspeed.config", "conf/base/deepspeed/zero3.json", False),  # its content enters, resolved
        ("data_workers", 0, False),
        ("seed", 1, True),
        ("init_from", "data/06_models/cocoa/model", True),
        ("learning_rate", 1.0e-4, True),
        ("deepspeed.offload_optimizer", True, True),
        ("embedder.lora.r", 8, True),
        ("grad_cache.chunk_size", 2, True),
        ("data_mix.weights", {"MiniShapes-VQA": 0.5}, True),
        ("data_mix.homogeneous_batches", True, True),
        ("during_training.heldout_conversations", 16, True),  # the training data loses those records
        ("during_training.every", 5, False),  # eval mode draws no random number: the weights stay the same
        ("during_training.batch_size", 4, False),
        ("select", "best", False),  # the checkpoints are the same; only which one becomes the model differs
    ],
)
def test_a_setting_enters_the_fingerprint_or_not_as_declared(dotted, value, enters):
    # select: best and every need a held-out slice; the base has evaluation during training off
    evaluating = with_value(
        with_value(base_training(), "during_training.heldout_conversations", 8), "during_training.every", 10
    )
    before = TrainingConfig.from_dict(evaluating).fingerprinted()
    after = TrainingConfig.from_dict(with_value(evaluating, dotted, value)).fingerprinted()
    assert (after != before) == enters


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("micro_batch_size", "x", "training.micro_batch_size must be a positive integer, got 'x'"),
        ("micro_batch_size", 0, "training.micro_batch_size must be a positive integer, got 0"),
        ("micro_batch_size", 2.0, "training.micro_batch_size must be a positive integer, got 2.0"),
        ("warmup_steps", -1, "training.warmup_steps must be a non-negative integer, got -1"),
        ("learning_rate", 0, "training.learning_rate must be a positive number, got 0"),
        ("temperature", "0.02", "training.temperature must be a positive number, got '0.02'"),
        ("precision", "fp16", "training.precision must be one of 'fp32', 'bf16', got 'fp16'"),
        ("hard_negatives", "yes", "training.hard_negatives must be true or false, got 'yes'"),
        ("max_steps", 0, "training.max_steps must be a positive integer or null, got 0"),
        ("grad_cache.chunk_size", True, "training.grad_cache.chunk_size must be a positive integer or null, got True"),
        ("embedder.lora.r", "16", "training.embedder.lora.r must be an integer, got '16'"),
        ("launcher.master_port", 70000, "training.launcher.master_port must be an integer from 1 to 65535 or null"),
        ("launcher", 2, "training.launcher must be a mapping of settings, got 2"),
        ("launcher.node_rank", 1, "training.launcher.node_rank must be below training.launcher.nodes (1), got 1"),
        ("learning_rat", 1.0, "training.learning_rat is not a training setting"),
        ("embedder.lora.rank", 8, "training.embedder.lora.rank is not a training setting"),
        (
            "data_mix.weights",
            {"MiniShapes-VQA": -1},
            "training.data_mix.weights.MiniShapes-VQA must be a non-negative number",
        ),
        (
            "data_mix.caps",
            {"MiniShapes-VQA": 0},
            "training.data_mix.caps.MiniShapes-VQA must be a positive integer, got 0",
        ),
        ("seed", DELETE, "training.seed is missing"),
        ("deepspeed.offload_optimizer", DELETE, "training.deepspeed.offload_optimizer is missing"),
        ("select", "first", "training.select must be one of 'last', 'best', got 'first'"),
        ("select", "best", "training.select: best needs evaluation during training"),
        ("during_training.every", 10, "training.during_training.every needs a held-out slice"),
        ("during_training.heldout_conversations", -1, "training.during_training.heldout_conversations must be a"),
    ],
)
def test_a_bad_setting_is_named_by_its_dotted_key(dotted, value, message):
    with pytest.raises(TrainingConfigError) as raised:
        TrainingConfig.from_dict(with_value(base_training(), dotted, value))
    assert str(raised.value).startswith(message)


def test_an_integer_is_a_number_and_a_missing_optional_embedder_setting_is_the_models_default():
    training = with_value(base_training(), "learning_rate", 1)
    assert TrainingConfig.from_dict(training).learning_rate == 1.0
    assert type(TrainingConfig.from_dict(training).learning_rate) is float
    without = with_value(base_training(), "embedder.lora.target_modules", DELETE)
    assert TrainingConfig.from_dict(without) == TrainingConfig.from_dict(base_training())
