"""The `evaluate` parameters as EvaluationConfig (evaluation/config.py): what it accepts and refuses."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
import yaml
from kedro.config import OmegaConfigLoader
from kedro.framework.cli.utils import _split_params

from muco_flow import settings
from muco_flow.evaluation.config import EvaluationConfig, EvaluationConfigError
from muco_flow.pipelines.evaluate.nodes import evaluate_baseline, select_headline_metrics
from tests.conftest import DELETE, PROJECT_ROOT, load_params, with_value


def base_evaluate() -> dict:
    return load_params()["evaluate"]


def test_conf_base_and_conf_cluster_validate():
    base = EvaluationConfig.from_dict(base_evaluate())
    assert (base.batch_size, base.pool_cache_dir, base.pool_block_rows, base.processes) == (32, None, 65536, 1)
    assert base.mmeb is not None and base.mmeb.datasets["MiniShapes-Count"].meta_task == "vqa"
    assert base.mbeir is not None and base.mbeir.recall_ks["fashioniq_task7"] == [10, 20, 50]
    assert base.mbeir.average_k["default"] == 5 and base.model is None and base.baseline == "backbone"
    cluster = EvaluationConfig.from_dict(load_params("cluster")["evaluate"])
    assert (cluster.pool_cache_dir, cluster.processes) == ("data/07_model_output/pool_encodings", 8)
    assert cluster.mbeir == base.mbeir  # what conf/cluster does not name comes from conf/base


def test_the_settings_round_trip_through_json_as_the_ranks_read_them():
    evaluate = base_evaluate()
    config = EvaluationConfig.from_dict(evaluate)
    assert config.to_dict() == evaluate
    assert EvaluationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_every_field_is_in_conf_base_and_none_has_a_code_default():
    yaml_values = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_evaluate.yml").read_text())["evaluate"]

    def walk(cls: type, values: dict, key: str) -> list[str]:
        checked = []
        for spec in dataclasses.fields(cls):
            dotted = f"{key}.{spec.name}"
            assert spec.name in values, f"{dotted} is not in conf/base/parameters_evaluate.yml"
            assert spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING, dotted
            kind = typing.get_type_hints(cls)[spec.name]
            if typing.get_origin(kind) is dict and dataclasses.is_dataclass(typing.get_args(kind)[1]):
                for name, entry in values[spec.name].items():  # mmeb.datasets: each dataset's settings
                    checked += walk(typing.get_args(kind)[1], entry, f"{dotted}.{name}")
            elif nested := [arg for arg in typing.get_args(kind) if dataclasses.is_dataclass(arg)]:
                checked += walk(nested[0], values[spec.name], dotted)  # a set's settings (X | None)
            checked.append(dotted)
        return checked

    checked = walk(EvaluationConfig, yaml_values, "evaluate")
    assert {"evaluate.batch_size", "evaluate.mmeb.image_root", "evaluate.mbeir.average_k"} <= set(checked)
    assert {"evaluate.m3t_heldout.image_root", "evaluate.mmeb.datasets.VOC2007.parser"} <= set(checked)


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("batch_size", "x", "evaluate.batch_size must be a positive integer, got 'x'"),
        ("batch_size", 0, "evaluate.batch_size must be a positive integer, got 0"),
        ("processes", 1.5, "evaluate.processes must be a positive integer, got 1.5"),
        ("pool_block_rows", True, "evaluate.pool_block_rows must be a positive integer, got True"),
        ("pool_cache_dir", 3, "evaluate.pool_cache_dir must be a string or null, got 3"),
        ("baseline", None, "evaluate.baseline must be a string, got None"),
        ("mlflow_metrics", "mmeb/average", "evaluate.mlflow_metrics must be a list, got 'mmeb/average'"),
        ("dvc_metrics", ["mmeb/average", 1], "evaluate.dvc_metrics[1] must be a string, got 1"),
        ("mmeb.datasets.VOC2007.meta_task", "ranking", "evaluate.mmeb.datasets.VOC2007.meta_task must be one of"),
        ("mmeb.datasets.VOC2007.parser", "image_x", "evaluate.mmeb.datasets.VOC2007.parser must be one of"),
        ("mmeb.datasets.VOC2007.task", "vqa", "evaluate.mmeb.datasets.VOC2007.task is not an evaluate setting"),
        ("mmeb.datasets", ["VOC2007"], "evaluate.mmeb.datasets must be a mapping with string keys"),
        ("mbeir.pools", ["local", "union"], "evaluate.mbeir.pools[1] must be one of 'local', 'global', got 'union'"),
        ("mbeir.recall_ks.default", [1, 0], "evaluate.mbeir.recall_ks.default[1] must be a positive integer, got 0"),
        ("mbeir.average_k.default", "5", "evaluate.mbeir.average_k.default must be a positive integer, got '5'"),
        ("mbeir.instruction_seed", None, "evaluate.mbeir.instruction_seed must be an integer, got None"),
        ("m3t_heldout", "M3T.parquet", "evaluate.m3t_heldout must be a mapping of settings, got 'M3T.parquet'"),
        ("batch_sise", 8, "evaluate.batch_sise is not an evaluate setting (conf/base/parameters_evaluate.yml)"),
        ("m3t_heldout.image_root", DELETE, "evaluate.m3t_heldout.image_root is missing"),
        ("model", DELETE, "evaluate.model is missing"),
    ],
)
def test_a_bad_setting_is_named_by_its_dotted_key(dotted, value, message):
    with pytest.raises(EvaluationConfigError) as raised:
        EvaluationConfig.from_dict(with_value(base_evaluate(), dotted, value))
    assert str(raised.value).startswith(message)


def test_a_null_set_is_not_scored_and_a_v1_dataset_needs_no_parser():
    config = EvaluationConfig.from_dict({**base_evaluate(), "mbeir": None, "m3t_heldout": None})
    assert config.mbeir is None and config.m3t_heldout is None
    v1 = EvaluationConfig.from_dict(with_value(base_evaluate(), "mmeb.datasets.VOC2007.parser", None))
    assert v1.mmeb is not None and v1.mmeb.dataset_tasks()["VOC2007"] == {"meta_task": "classification", "parser": None}


def test_the_nodes_refuse_bad_settings_before_loading_anything():
    bad = with_value(base_evaluate(), "batch_size", "x")
    with pytest.raises(EvaluationConfigError, match=r"^evaluate\.batch_size must be a positive integer, got 'x'"):
        evaluate_baseline({}, "no-such-checkpoint", bad, {}, {})
    with pytest.raises(EvaluationConfigError, match=r"^evaluate\.dvc_metrics must be a list"):
        select_headline_metrics({"headline": {}}, with_value(base_evaluate(), "dvc_metrics", "mmeb/*"))


def test_a_documented_params_override_validates():
    """`kedro run --params=...` as docs/evaluation.md writes it, and a number, as Kedro's CLI and loader read them."""
    documented = "evaluate.model=/models/MuCo-2B,evaluate.baseline=/models/Qwen2-VL-2B-Instruct,evaluate.batch_size=8"
    args = {**settings.CONFIG_LOADER_ARGS, "default_run_env": "cluster"}
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), runtime_params=_split_params(None, None, documented), **args)
    config = EvaluationConfig.from_dict(loader["parameters"]["evaluate"])
    assert (config.model, config.baseline, config.batch_size) == ("/models/MuCo-2B", "/models/Qwen2-VL-2B-Instruct", 8)
    assert config.processes == 8  # conf/cluster's, beside the overrides
