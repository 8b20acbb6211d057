"""The `finetune` parameters as FinetuneConfig (training/finetune_config.py): what it accepts and refuses."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from muco_flow.pipelines.finetune.nodes import finetune_muco_model
from muco_flow.training.finetune_config import FinetuneConfig, FinetuneConfigError
from tests.conftest import PROJECT_ROOT, load_params


def test_conf_base_and_conf_cluster_validate_and_no_field_has_a_code_default():
    yaml_values = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_finetune.yml").read_text())["finetune"]
    base = FinetuneConfig.from_dict(load_params()["finetune"])
    assert dataclasses.asdict(base) == yaml_values
    assert base.init_from is None and base.training is not None and base.training["warmup_steps"] == 5
    assert all(spec.default is dataclasses.MISSING for spec in dataclasses.fields(FinetuneConfig))
    cluster = FinetuneConfig.from_dict(load_params("cluster")["finetune"])
    assert cluster.training is not None and cluster.training["learning_rate"] == 5.0e-5
    assert cluster.training["output_dir"] == "data/06_models/muco_finetune"  # conf/base's, under conf/cluster's


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"init_form": None, "training": {}}, "finetune.init_form is not a finetune setting"),
        ({"init_from": 3, "training": {}}, "finetune.init_from must be a string or null, got 3"),
        ({"init_from": None, "training": "lr=1"}, "finetune.training must be a mapping with string keys, got 'lr=1'"),
        ({"training": {}}, "finetune.init_from is missing (conf/base/parameters_finetune.yml sets every"),
    ],
)
def test_a_bad_setting_is_named_by_its_dotted_key(values, message):
    with pytest.raises(FinetuneConfigError) as raised:
        FinetuneConfig.from_dict(values)
    assert str(raised.value).startswith(message)


def test_the_node_refuses_a_bad_setting_before_fetching_a_model():
    bad = {**load_params()["finetune"], "init_from": ["models:/muco-embedder@champion"]}
    with pytest.raises(FinetuneConfigError, match=r"^finetune\.init_from must be a string or null"):
        finetune_muco_model("no-samples", "no-shards", {}, bad, load_params()["training"], {}, {}, {}, {})
