"""The `registry` parameters as RegistryConfig (registry/config.py): what it accepts and refuses."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from kedro.config import OmegaConfigLoader
from kedro.framework.cli.utils import _split_params

from muco_flow import settings
from muco_flow.pipelines.promote.nodes import promote_challenger_if_better, stop_unless_promoted
from muco_flow.pipelines.register.nodes import register_trained_model
from muco_flow.registry.config import PromotionSettings, RegistryConfig, RegistryConfigError
from muco_flow.registry.promotion import PromotionPolicy
from tests.conftest import DELETE, PROJECT_ROOT, load_params, with_value


def base_registry() -> dict:
    return load_params()["registry"]


def test_conf_base_validates_with_the_values_its_yaml_writes():
    config = RegistryConfig.from_dict(base_registry())
    assert config == RegistryConfig(
        model_name="muco-embedder",
        primary_metric="mmeb/average",
        allow_older_challenger=False,
        promotion=PromotionSettings(margin=0.005, promote_first=False),
        serving={
            "max_records": 64,
            "max_text_tokens": 4096,
            "max_image_pixels": 4096 * 4096,
            "max_request_pixels": 4 * 4096 * 4096,
            "max_batch_size": 64,
            "read_uris": False,
        },
    )
    assert config.promotion_policy() == PromotionPolicy("mmeb/average", 0.005, False)
    assert RegistryConfig.from_dict(load_params("cluster")["registry"]) == config  # conf/cluster names no registry key


def test_every_field_is_in_conf_base_and_none_has_a_code_default():
    yaml_values = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_registry.yml").read_text())["registry"]
    for cls, values, key in [
        (RegistryConfig, yaml_values, "registry"),
        (PromotionSettings, yaml_values["promotion"], "registry.promotion"),
    ]:
        names = [spec.name for spec in dataclasses.fields(cls)]
        assert sorted(names) == sorted(values), key  # no field the YAML lacks, no YAML key without a field
        for spec in dataclasses.fields(cls):
            assert spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING, spec.name
    for spec in dataclasses.fields(PromotionPolicy):  # a default there could contradict conf/base
        assert spec.default is dataclasses.MISSING, spec.name


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("promotion.margin", "x", "registry.promotion.margin must be a number, got 'x'"),
        ("promotion.margin", True, "registry.promotion.margin must be a number, got True"),
        ("promotion.promote_first", "yes", "registry.promotion.promote_first must be true or false, got 'yes'"),
        ("promotion.promote_first", 1, "registry.promotion.promote_first must be true or false, got 1"),
        ("allow_older_challenger", "false", "registry.allow_older_challenger must be true or false, got 'false'"),
        ("model_name", None, "registry.model_name must be a string, got None"),
        ("primary_metric", 3, "registry.primary_metric must be a string, got 3"),
        ("promotion", 0.005, "registry.promotion must be a mapping of settings, got 0.005"),
        ("promotion.margni", 0.01, "registry.promotion.margni is not a registry setting"),
        ("model_nmae", "m", "registry.model_nmae is not a registry setting (conf/base/parameters_registry.yml)"),
        ("serving", [64], "registry.serving must be a mapping with string keys, got [64]"),
        ("promotion.margin", DELETE, "registry.promotion.margin is missing"),
        ("allow_older_challenger", DELETE, "registry.allow_older_challenger is missing"),
    ],
)
def test_a_bad_setting_is_named_by_its_dotted_key(dotted, value, message):
    with pytest.raises(RegistryConfigError) as raised:
        RegistryConfig.from_dict(with_value(base_registry(), dotted, value))
    assert str(raised.value).startswith(message)


def test_an_integer_margin_is_a_number():
    config = RegistryConfig.from_dict(with_value(base_registry(), "promotion.margin", 0))
    assert config.promotion.margin == 0.0 and isinstance(config.promotion.margin, float)


def test_a_bad_serving_limit_is_refused_by_serving_limits_naming_its_key():
    refused = r"^registry\.serving\.max_records must be a whole number of at least 1, got 0"
    with pytest.raises(ValueError, match=refused):
        RegistryConfig.from_dict(with_value(base_registry(), "serving.max_records", 0))
    with pytest.raises(ValueError, match=r"^unknown serving limits \['max_recrods'\]"):
        RegistryConfig.from_dict(with_value(base_registry(), "serving.max_recrods", 8))


def test_the_serving_limits_are_checked_without_the_environment(monkeypatch):
    """MUCO_SERVE_* overrides where the model is served, not what is registered."""
    monkeypatch.setenv("MUCO_SERVE_MAX_RECORDS", "0")
    assert RegistryConfig.from_dict(base_registry()).serving["max_records"] == 64


def test_the_nodes_refuse_bad_settings_before_reaching_mlflow():
    # empty train_run/mlflow: anything read before the check would fail with a KeyError instead
    bad = with_value(base_registry(), "allow_older_challenger", "yes")
    with pytest.raises(RegistryConfigError, match=r"^registry\.allow_older_challenger must be true or false"):
        register_trained_model({}, {}, "no-such-shards", bad)
    bad = with_value(base_registry(), "promotion.margin", "x")
    with pytest.raises(RegistryConfigError, match=r"^registry\.promotion\.margin must be a number, got 'x'"):
        promote_challenger_if_better(bad, {})


def test_promote_ends_non_zero_with_one_line_when_it_refuses():
    refused = {"name": "muco-embedder", "challenger": 2, "champion": 1, "promoted": False, "reason": "gain -0.3000"}
    with pytest.raises(SystemExit) as stopped:  # Kedro's CLI prints the message alone and exits 1
        stop_unless_promoted(refused)
    assert stopped.value.code == "promotion refused for muco-embedder version 2: gain -0.3000"
    assert stop_unless_promoted({**refused, "promoted": True}) is None


def test_the_documented_params_overrides_validate():
    """`kedro run --params=...` as docs/registry.md and tests write them, as Kedro's CLI and loader read them."""
    documented = (
        "registry.promotion.promote_first=true,registry.promotion.margin=0.01,registry.allow_older_challenger=true"
    )
    args = {**settings.CONFIG_LOADER_ARGS, "default_run_env": "cluster"}
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), runtime_params=_split_params(None, None, documented), **args)
    config = RegistryConfig.from_dict(loader["parameters"]["registry"])
    assert config.promotion == PromotionSettings(margin=0.01, promote_first=True)
    assert config.allow_older_challenger is True and config.model_name == "muco-embedder"
