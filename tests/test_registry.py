"""Model registry: pyfunc inputs, registration and promotion against a real `mlflow server`, serving, the UI."""

from __future__ import annotations

import base64
import io
import os
import re
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
import yaml
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag
from mlflow.tracking import MlflowClient
from PIL import Image

from muco_flow.modeling.backbone import load_backbone
from muco_flow.modeling.embedder import load_embedder
from muco_flow.registry import CHALLENGER, CHAMPION, RegistryError
from muco_flow.registry.config import RegistryConfig
from muco_flow.registry.gate import signature_is_valid
from muco_flow.registry.promotion import (
    GATE_LINE_PREFIX,
    PromotionPolicy,
    decide_promotion,
    judge_versions,
    promote_challenger,
    show_eligibility,
    with_gate_paragraphs,
)
from muco_flow.registry.registration import fluent_tracking_uri, register_model_version
from muco_flow.registry.serving import (
    ModelInputError,
    MuCoEmbeddingModel,
    ServingLimits,
    parse_batch_size,
    parse_dimensions,
    parse_records,
)
from tests.conftest import PROJECT_ROOT, load_params
from tests.servers import ARTIFACTS, background_server, free_port, headless_chromium


def encoded(image: Image.Image, fmt: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


RED = Image.new("RGB", (56, 84), (220, 40, 40))


# ---------------------------------------------------------------- inputs (no server)


def test_records_accept_base64_png_and_jpeg_data_uris_and_file_uris(tmp_path):
    path = tmp_path / "red.png"
    RED.save(path)
    frame = pd.DataFrame(
        [
            {"text": "a caption", "image": None},
            {"text": "", "image": encoded(RED, "PNG")},
            {"text": "q", "image": "data:image/jpeg;base64," + encoded(RED, "JPEG")},
            {"text": "q", "image": path.as_uri()},
        ]
    )
    items = parse_records(frame, ServingLimits(read_uris=True))
    assert [text for text, _ in items] == ["a caption", "", "q", "q"]
    assert items[0][1] is None
    for _, image in items[1:]:
        assert image.size == (56, 84)
        assert image.getpixel((10, 10))[0] > 200  # red survived the round trip, JPEG included


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"text": "x", "image": "not base64 !!"}, "record 1: 'image' is neither base64"),
        ({"text": "x", "image": encoded(RED, "GIF")}, "record 1: image is GIF"),
        ({"text": "x", "image": encoded(Image.new("RGB", (8, 8)), "GIF")}, "record 1: image is GIF"),  # upscaled
        ({"text": "x", "image": base64.b64encode(b"plain text").decode()}, "record 1: image cannot be decoded"),
        ({"text": "x", "image": "file:///etc/passwd"}, "record 1: 'image' is a file:// URI, which this server"),
        ({"text": "x", "image": "http://127.0.0.1:5000/x.png"}, "record 1: 'image' is a http:// URI"),
        ({"text": "", "image": None}, "record 1: neither 'text' nor 'image'"),
        ({"text": 3, "image": None}, "record 1: 'text' must be a string"),
    ],
)
def test_bad_records_are_named_with_the_problem(record, message):
    with pytest.raises(ModelInputError, match=message.replace("(", r"\(")):
        parse_records(pd.DataFrame([{"text": "fine", "image": None}, record]))


def test_a_missing_file_is_named_when_the_operator_allows_uris():
    with pytest.raises(ModelInputError, match=re.escape("record 0: image file /nonexistent/cat.png does not exist")):
        parse_records(pd.DataFrame([{"image": "file:///nonexistent/cat.png"}]), ServingLimits(read_uris=True))


@pytest.mark.parametrize("columns", [{"caption": "x"}, {"text": "x", "colour": "red"}])
def test_unknown_columns_are_refused_naming_the_expected_and_the_given_columns(columns):
    given = re.escape(str(sorted(columns)))
    with pytest.raises(ModelInputError, match=rf"columns 'text' and/or 'image'; got columns {given}"):
        parse_records(pd.DataFrame([columns]))


def words(text: str) -> int:
    """A stand-in tokenizer: one token per word."""
    return len(text.split())


def test_a_request_is_bounded_in_records_tokens_and_pixels():
    limits = ServingLimits(max_records=3, max_text_tokens=4, max_image_pixels=5000, max_request_pixels=10_000)
    red = encoded(RED, "PNG")  # 56 x 84 = 4704 pixels
    assert len(parse_records(pd.DataFrame([{"text": "a b c d", "image": red}] * 2), limits, words)) == 2
    with pytest.raises(ModelInputError, match="a request holds at most 3 records, this one 4: split it"):
        parse_records(pd.DataFrame([{"text": "x"}] * 4), limits, words)
    with pytest.raises(ModelInputError, match="record 1: 'text' has 5 tokens, at most 4 are served"):
        parse_records(pd.DataFrame([{"text": "a"}, {"text": "a b c d e"}]), limits, words)
    big = encoded(Image.new("RGB", (71, 71)), "PNG")  # 5041 pixels
    with pytest.raises(ModelInputError, match="record 0: image exceeds the decompression-bomb limit of 5000 pixels"):
        parse_records(pd.DataFrame([{"image": big}]), limits, words)
    with pytest.raises(ModelInputError, match="record 2: the request's images hold 14112 pixels up to this one, at "
                       "most 10000 are served per request"):  # fmt: skip
        parse_records(pd.DataFrame([{"image": red}] * 3), limits, words)


@pytest.mark.parametrize("value", [-1, 0, 65, "8", 2.0, True, None])
def test_a_bad_batch_size_is_refused(value):
    message = re.escape(f"batch_size must be a whole number from 1 to 64, got {value!r}")
    with pytest.raises(ModelInputError, match=message):
        parse_batch_size({"batch_size": value}, ServingLimits())


def test_batch_size_defaults_to_16_and_takes_whole_numbers_in_range():
    limits = ServingLimits()
    assert parse_batch_size(None, limits) == 16
    assert [parse_batch_size({"batch_size": v}, limits) for v in (1, 64, np.int64(8))] == [1, 64, 8]


@pytest.mark.parametrize("value", [0, -4, 129, 2.5, "32", True, [16]])
def test_bad_dimensions_are_refused_naming_the_field(value):
    message = re.escape(f"dimensions must be a whole number from 1 to 128 (the model's embedding width), got {value!r}")
    with pytest.raises(ModelInputError, match=message) as raised:
        parse_dimensions({"dimensions": value}, 128)
    assert raised.value.get_http_status_code() == 400


def test_dimensions_default_to_the_whole_width_and_take_whole_numbers_up_to_it():
    assert parse_dimensions(None, 128) is None and parse_dimensions({"batch_size": 4}, 128) is None
    assert [parse_dimensions({"dimensions": v}, 128) for v in (1, 64, 128, np.int64(32))] == [1, 64, 128, 32]


class FixedEmbedder:
    """Gives every record the vector (3, 4, 12) / 13, whatever it holds."""

    hidden_size = 3

    def encode(self, items, **_):
        return torch.tensor([[3.0, 4.0, 12.0]] * len(items)) / 13


def test_the_served_vectors_are_cut_to_the_requested_dimensions_and_renormalised():
    model = MuCoEmbeddingModel()
    model.embedder, model.template, model.limits = FixedEmbedder(), "", ServingLimits()
    records = pd.DataFrame([{"text": "a"}, {"text": "b"}])
    np.testing.assert_allclose(model.predict(None, records, {"dimensions": 2}), [[0.6, 0.8]] * 2, rtol=1e-6)
    np.testing.assert_allclose(model.predict(None, records, {"dimensions": 1}), [[1.0]] * 2)
    np.testing.assert_allclose(model.predict(None, records, None), [[3 / 13, 4 / 13, 12 / 13]] * 2, rtol=1e-6)
    with pytest.raises(ModelInputError, match="dimensions must be a whole number from 1 to 3"):
        model.predict(None, records, {"dimensions": 4})


def test_serving_limits_come_from_the_model_config_then_the_environment():
    limits = ServingLimits.from_config({"max_records": 8, "read_uris": False}, {"MUCO_SERVE_READ_URIS": "1"})
    assert limits == ServingLimits(max_records=8, read_uris=True)
    assert ServingLimits.from_config(None, {"MUCO_SERVE_MAX_TEXT_TOKENS": "128"}).max_text_tokens == 128
    with pytest.raises(ValueError, match="MUCO_SERVE_MAX_RECORDS must be a whole number of at least 1, got '0'"):
        ServingLimits.from_config({}, {"MUCO_SERVE_MAX_RECORDS": "0"})
    with pytest.raises(ValueError, match=r"registry.serving.read_uris must be true or false \(1/0\), got 'maybe'"):
        ServingLimits.from_config({"read_uris": "maybe"})
    with pytest.raises(ValueError, match=r"unknown serving limits \['max_pixels'\]"):
        ServingLimits.from_config({"max_pixels": 5})


def test_a_bad_record_is_an_mlflow_invalid_parameter_error():
    """So that `mlflow models serve` answers 400 with the message, not a generic error."""
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as raised:
        parse_records(pd.DataFrame([{"text": 3}]))
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE" and raised.value.get_http_status_code() == 400


# ---------------------------------------------------------------- promotion rule (no server)


@pytest.mark.parametrize(
    ("challenger", "champion", "promote_first", "expected", "why"),
    [
        (0.30, None, False, False, "no champion yet and promote_first is not set"),
        (0.30, None, True, True, "no champion yet and promote_first is set"),
        (0.50, 0.40, False, True, "gain +0.1000"),
        (0.402, 0.40, False, False, "does not beat the champion by the margin"),  # better, but by less than 0.005
        (0.40, 0.40 + 0.005, False, False, "gain -0.0050"),
        (0.405, 0.40, False, True, "beats the champion"),  # exactly the margin
    ],
)
def test_promotion_rule(challenger, champion, promote_first, expected, why):
    policy = PromotionPolicy(primary_metric="mmeb/average", margin=0.005, promote_first=promote_first)
    promote, reason = decide_promotion(challenger, champion, policy)
    assert promote is expected
    assert why in reason


def tagged_version(number: str, score: float | None, metric: str = "mmeb/average") -> ModelVersion:
    tags = {} if score is None else {"primary_metric": metric, "primary_metric_value": repr(score)}
    return ModelVersion("m", number, creation_timestamp=0, tags=[ModelVersionTag(k, v) for k, v in tags.items()])


@pytest.mark.parametrize(
    ("candidate", "champion", "allowed", "why"),
    [
        (tagged_version("2", 0.18), tagged_version("1", 0.48), False, "gain -0.3000"),
        (tagged_version("3", 0.49), tagged_version("1", 0.48), True, "gain +0.0100"),
        (tagged_version("1", 0.48), tagged_version("1", 0.48), False, "version 1 is already the champion"),
        (tagged_version("2", None), tagged_version("1", 0.48), False, "version 2 of 'm' has no mmeb/average tag"),
        (tagged_version("2", 0.9, "mbeir/average"), None, False, "tagged with mbeir/average"),
        (tagged_version("2", 0.3), None, True, "no champion yet"),
    ],
)
def test_the_policy_on_two_registry_versions(candidate, champion, allowed, why):
    policy = PromotionPolicy(primary_metric="mmeb/average", margin=0.005, promote_first=True)
    verdict, reason = judge_versions(candidate, champion, policy)
    assert verdict is allowed
    assert why in reason


def test_the_gate_line_stays_first_and_the_newest_decision_comes_next():
    registered = "From run `r`.\n\n| metric | trained |\n| --- | ---: |\n| a | 0.5000 |"
    shown = with_gate_paragraphs(registered, gate_line=f"{GATE_LINE_PREFIX} eligible: x.")
    assert shown == f"{GATE_LINE_PREFIX} eligible: x.\n\n{registered}"
    decided = with_gate_paragraphs(shown, record="**Gate** refused: y")
    assert decided == f"{GATE_LINE_PREFIX} eligible: x.\n\n**Gate** refused: y\n\n{registered}"
    again = with_gate_paragraphs(decided, gate_line=f"{GATE_LINE_PREFIX} not eligible: z.")
    assert again == f"{GATE_LINE_PREFIX} not eligible: z.\n\n**Gate** refused: y\n\n{registered}"
    assert with_gate_paragraphs(None, record="**Promotion** r") == "**Promotion** r"


def test_a_delivery_is_accepted_only_with_mlflows_signature_of_its_own_body():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = b'{"entity": "model_version_alias", "action": "created", "data": {"alias": "champion"}}'
    now = 1_800_000_000
    signature = _generate_hmac_signature("s3cret", "d-1", str(now), body.decode())  # as MLflow signs a delivery
    assert signature_is_valid("s3cret", "d-1", str(now), body, signature, now=now + 10)
    assert signature_is_valid("s3cret", "d-1", str(now), body, f"v1,bm90LWl0 {signature}", now=now)  # key rotation
    assert not signature_is_valid("other", "d-1", str(now), body, signature, now=now)
    assert not signature_is_valid("s3cret", "d-1", str(now), body.replace(b"champion", b"x"), signature, now=now)
    assert not signature_is_valid("s3cret", "d-2", str(now), body, signature, now=now)
    assert not signature_is_valid("s3cret", "d-1", str(now), body, signature, now=now + 301)  # a replay
    assert not signature_is_valid("s3cret", "d-1", str(now), body, "", now=now)
    assert not signature_is_valid("s3cret", "d-1", "soon", body, signature, now=now)


# ---------------------------------------------------------------- against a real `mlflow server`


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    # webhooks to a receiver on this machine (docs/registry.md, "The gate in the UI"), seen 1 s after they change
    env = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_WEBHOOK_CACHE_TTL": "1"}  # fmt: skip
    with background_server(command, f"{uri}/health", timeout_s=120, env=env, log=root / "server.log"):
        yield uri


def new_run(uri: str) -> str:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("registry-tests") or client.get_experiment(
        client.create_experiment("registry-tests")
    )
    run = client.create_run(experiment.experiment_id)
    client.log_param(run.info.run_id, "training.learning_rate", "0.001")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def tags_with_score(run_id: str, score: float) -> dict[str, str]:
    return {
        "run_id": run_id,
        "git_commit": "abc123",
        "primary_metric": "mmeb/average",
        "primary_metric_value": repr(score),
    }


def versions_of(uri: str, name: str) -> list:
    return MlflowClient(uri).search_model_versions(f"name = '{name}'")


@pytest.mark.slow
def test_registration_leaves_no_process_wide_tracking_uri_behind(tracking_server, model_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_id = new_run(tracking_server)
    tags = tags_with_score(run_id, 0.3)
    register_model_version(tracking_server, name="no-leak", run_id=run_id, model_dir=str(model_dir), tags=tags)
    # later subprocesses (kedro runs) would otherwise inherit this server
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert not mlflow.tracking.is_tracking_uri_set()


@pytest.mark.slow
def test_registration_is_idempotent_and_a_retry_after_a_failure_makes_one_version(
    tracking_server, model_dir, monkeypatch
):
    name, run_id = "idempotent", new_run(tracking_server)
    tags = tags_with_score(run_id, 0.3)
    # the first attempt dies after the version exists, before the alias is set
    original = MlflowClient.set_registered_model_alias
    calls = []

    def failing_once(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionError("tracking server went away")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", failing_once)
    with pytest.raises(ConnectionError):
        register_model_version(tracking_server, name=name, run_id=run_id, model_dir=str(model_dir), tags=tags)
    first = register_model_version(tracking_server, name=name, run_id=run_id, model_dir=str(model_dir), tags=tags)
    again = register_model_version(tracking_server, name=name, run_id=run_id, model_dir=str(model_dir), tags=tags)

    assert len(versions_of(tracking_server, name)) == 1
    assert first["version"] == again["version"] == 1
    version = MlflowClient(tracking_server).get_model_version_by_alias(name, CHALLENGER)
    assert version.version == "1" and version.run_id == run_id
    assert version.tags["primary_metric_value"] == "0.3" and version.tags["git_commit"] == "abc123"


@pytest.mark.slow
def test_promotion_with_no_champion_a_better_and_a_worse_challenger(tracking_server, model_dir):
    name = "promotion"
    client = MlflowClient(tracking_server)
    cautious = PromotionPolicy(primary_metric="mmeb/average", margin=0.005, promote_first=False)

    def register(score: float) -> int:
        run_id = new_run(tracking_server)
        return register_model_version(
            tracking_server, name=name, run_id=run_id, model_dir=str(model_dir), tags=tags_with_score(run_id, score)
        )["version"]

    first = register(0.30)
    decision = promote_challenger(tracking_server, name, cautious)
    assert decision == {**decision, "promoted": False, "champion": None}
    assert client.get_model_version(name, str(first)).tags["promotion"] == "not_promoted"
    assert CHAMPION not in client.get_registered_model(name).aliases

    decision = promote_challenger(tracking_server, name, PromotionPolicy("mmeb/average", 0.005, promote_first=True))
    assert decision["promoted"] and client.get_model_version_by_alias(name, CHAMPION).version == str(first)

    better = register(0.40)
    assert promote_challenger(tracking_server, name, cautious)["promoted"]
    assert client.get_model_version_by_alias(name, CHAMPION).version == str(better)
    promoted = client.get_model_version(name, str(better))
    assert promoted.tags["promotion"] == "promoted" and f"compared with version {first}" in promoted.description

    worse = register(0.402)  # higher, but not by the margin
    decision = promote_challenger(tracking_server, name, cautious)
    assert not decision["promoted"] and decision["champion"] == better
    assert client.get_model_version_by_alias(name, CHAMPION).version == str(better)
    assert client.get_model_version_by_alias(name, CHALLENGER).version == str(worse)
    assert "does not beat the champion by the margin" in client.get_model_version(name, str(worse)).description


def probe_records() -> list[dict[str, str]]:
    """Text only, image and question, image only: what a client sends."""
    return [
        {"text": "A large red square on a white background."},
        {"text": "What is the main object in the image?", "image": encoded(RED, "PNG")},
        {"image": encoded(Image.new("RGB", (112, 112), (40, 80, 220)), "JPEG")},
    ]


@pytest.fixture(scope="module")
def champion(tracking_server, model_dir) -> str:
    name, run_id = "served", new_run(tracking_server)
    register_model_version(
        tracking_server, name=name, run_id=run_id, model_dir=str(model_dir), tags=tags_with_score(run_id, 0.5)
    )
    promote_challenger(tracking_server, name, PromotionPolicy("mmeb/average", 0.0, promote_first=True))
    return name


@pytest.mark.slow
def test_loading_by_alias_gives_the_in_process_embedders_vectors(tracking_server, champion, model_dir):
    with fluent_tracking_uri(tracking_server):
        loaded = mlflow.pyfunc.load_model(f"models:/{champion}@{CHAMPION}")
    vectors = loaded.predict(pd.DataFrame(probe_records()))

    embedder, template = load_embedder(str(model_dir), default_template="")
    expected = embedder.encode(parse_records(pd.DataFrame(probe_records())), template=template, progress=False).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # no input schema (MLflow would drop unknown columns before the model could refuse them); batch_size is a param
    assert loaded.metadata.get_input_schema() is None
    assert [param.name for param in loaded.metadata.get_params_schema().params] == ["batch_size", "dimensions"]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_unit_vectors(tracking_server, champion, model_dir, tmp_path):
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{champion}@{CHALLENGER}",
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    # as in an activated virtual environment: the server execs `uvicorn` from PATH
    env = {
        "MLFLOW_TRACKING_URI": tracking_server,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MUCO_SERVE_MAX_RECORDS": "4",  # the operator's limit, over the registered one
    }
    with background_server(command, f"{url}/ping", timeout_s=240, env=env, log=tmp_path / "serve.log"):
        body = {"dataframe_records": probe_records()}
        response = requests.post(f"{url}/invocations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        vectors = np.array(response.json()["predictions"])
        hidden = load_backbone(str(model_dir)).model.config.text_config.hidden_size
        assert vectors.shape == (3, hidden)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        cut = {"dataframe_records": probe_records(), "params": {"dimensions": 16}}
        response = requests.post(f"{url}/invocations", json=cut, timeout=120)
        assert response.status_code == 200, response.text
        prefixes = np.array(response.json()["predictions"])
        expected = vectors[:, :16] / np.linalg.norm(vectors[:, :16], axis=1, keepdims=True)
        np.testing.assert_allclose(prefixes, expected, atol=1e-5)

        bad = {"dataframe_records": [{"text": "x"}, {"text": "x", "image": "not base64 !!"}]}
        response = requests.post(f"{url}/invocations", json=bad, timeout=60)
        assert response.status_code == 400
        assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "record 1: 'image' is neither base64" in response.json()["message"]

        misspelt = {"dataframe_records": [{"txt": "a red circle"}]}
        response = requests.post(f"{url}/invocations", json=misspelt, timeout=60)
        assert response.status_code == 400
        message = response.json()["message"]
        assert "expected records with columns 'text' and/or 'image'" in message and "txt" in message

        refused = {
            "an unknown column beside 'text'": ({"dataframe_records": [{"text": "x", "colour": "red"}]}, "'colour'"),
            "batch_size -1": (
                {"dataframe_records": [{"text": "x"}], "params": {"batch_size": -1}},
                "batch_size must be a whole number from 1 to 64, got -1",
            ),
            "batch_size 0": (
                {"dataframe_records": [{"text": "x"}], "params": {"batch_size": 0}},
                "batch_size must be a whole number from 1 to 64, got 0",
            ),
            "dimensions wider than the model": (
                {"dataframe_records": [{"text": "x"}], "params": {"dimensions": 100000}},
                "dimensions must be a whole number from 1 to",
            ),
            "dimensions not an integer": (
                {"dataframe_records": [{"text": "x"}], "params": {"dimensions": 2.5}},
                "dimensions",
            ),
            "a file the server would read": (
                {"dataframe_records": [{"image": (tmp_path / "serve.log").as_uri()}]},
                "record 0: 'image' is a file:// URI, which this server does not read",
            ),
            "a URL the server would fetch": (
                {"dataframe_records": [{"image": f"{url}/ping"}]},
                "record 0: 'image' is a http:// URI",
            ),
            "more records than MUCO_SERVE_MAX_RECORDS": (
                {"dataframe_records": [{"text": "x"}] * 5},
                "a request holds at most 4 records, this one 5",
            ),
            "a text over 4096 tokens": (
                {"dataframe_records": [{"text": "red circle " * 5000}]},
                "tokens, at most 4096",
            ),
        }
        for case, (body, expected) in refused.items():
            response = requests.post(f"{url}/invocations", json=body, timeout=120)
            assert response.status_code == 400, (case, response.text)
            assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE", case
            assert expected in response.json()["message"], (case, response.json()["message"])


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_registered_model_with_its_version_and_alias(tracking_server, champion):

    with headless_chromium() as page:
        page.goto(f"{tracking_server}/#/models/{champion}", wait_until="domcontentloaded")  # the UI keeps polling
        page.get_by_text("Version 1").first.wait_for(timeout=60_000)
        page.get_by_text(f"@ {CHAMPION}").first.wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow_registered_model.png"), full_page=True)
        text = page.inner_text("body")
    assert champion in text and CHAMPION in text and CHALLENGER in text


# ---------------------------------------------------------------- the gate receiver (real webhook deliveries)

GATED_MODEL = "muco-embedder"  # the model conf/base's registry.model_name names: the one the receiver gates
GATE_SECRET = "gate-test-secret"


def gated_version(client: MlflowClient, score: float) -> str:
    """A version of GATED_MODEL tagged with ``score`` as registration tags it (no model files: the gate reads tags)."""
    run_id = new_run(client.tracking_uri)
    version = client.create_model_version(
        GATED_MODEL, source=f"runs:/{run_id}/model", run_id=run_id, tags=tags_with_score(run_id, score),
        description="MuCo embedder from training run.\n\n| metric | trained |\n| --- | ---: |",
    )  # fmt: skip
    show_eligibility(client, GATED_MODEL, RegistryConfig.from_dict(load_params()["registry"]).promotion_policy())
    return version.version  # shown as registration shows it: eligibility on every version


def gate_decision(client: MlflowClient, version: str) -> str | None:
    """The gate's last decision on ``version`` (tag ``promotion.gate``, the last thing the gate writes)."""
    return client.get_model_version(GATED_MODEL, version).tags.get("promotion.gate")


def wait_until(condition, timeout_s: float = 60, what: str = "the gate"):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.5)
    return value


@pytest.fixture(scope="module")
def gate(tracking_server, tmp_path_factory) -> dict[str, str]:
    """The receiver serving, its webhook registered (with the documented command), champion 0.48 set through it.

    Versions: "champion" (0.48), "worse" (0.18), "better" (0.60); "champion" holds `champion`.
    """
    from muco_flow.registry import gate_server

    client = MlflowClient(tracking_server)
    client.create_registered_model(GATED_MODEL)
    versions = {"champion": gated_version(client, 0.48), "worse": gated_version(client, 0.18)}
    versions["better"] = gated_version(client, 0.60)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"MUCO_GATE_SECRET": GATE_SECRET, "MLFLOW_TRACKING_URI": tracking_server}
    command = [sys.executable, "-m", "muco_flow.registry.gate_server", "--conf-source", str(PROJECT_ROOT / "conf"),
               "serve", "--port", str(port)]  # fmt: skip
    log = tmp_path_factory.mktemp("gate") / "gate.log"
    with background_server(command, f"{url}/health", timeout_s=180, env=env, log=log):
        register = ["--conf-source", str(PROJECT_ROOT / "conf"), "register-webhook", "--url", f"{url}/webhook"]
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            gate_server.main(register)
            gate_server.main(register)  # idempotent: the same webhook, updated in place
        client.set_registered_model_alias(GATED_MODEL, CHAMPION, versions["champion"])
        wait_until(lambda: gate_decision(client, versions["champion"]))  # the gate's last write
        yield {"url": url, **versions}


@pytest.mark.slow
def test_the_gate_moves_champion_back_from_a_worse_version_and_says_why_on_both(tracking_server, gate):
    client = MlflowClient(tracking_server)
    assert [hook.name for hook in client.list_webhooks()] == [f"{GATED_MODEL}-promotion-gate"]
    model = client.get_registered_model(GATED_MODEL)
    assert "beats the current champion's by at least 0.005" in model.description

    client.set_registered_model_alias(GATED_MODEL, CHAMPION, gate["worse"])  # as the UI does: straight to MLflow
    refused = wait_until(lambda: gate_decision(client, gate["worse"]))
    assert client.get_model_version_by_alias(GATED_MODEL, CHAMPION).version == gate["champion"]
    assert refused.startswith(f"refused: `champion` set on version {gate['worse']} was moved back to version "
                              f"{gate['champion']}") and "0.1800 vs champion's 0.4800" in refused  # fmt: skip
    wait_until(lambda: gate_decision(client, gate["champion"]) == refused)  # the kept version's comes next
    kept = client.get_model_version(GATED_MODEL, gate["champion"])
    assert refused.split(": ", 1)[1] in kept.description
    worse = client.get_model_version(GATED_MODEL, gate["worse"])
    assert worse.tags["promotion.eligible"] == "false"
    first, second, *_ = worse.description.split("\n\n")
    assert first.startswith("**Promotion gate:** not eligible for champion") and second.startswith("**Gate** refused")
    assert worse.description.endswith("| metric | trained |\n| --- | ---: |")  # the registration text stays below

    assert client.get_model_version(GATED_MODEL, gate["better"]).tags["promotion.eligible"] == "true"
    unsigned = requests.post(f"{gate['url']}/webhook", json={"entity": "model_version_alias", "action": "created",
        "data": {"name": GATED_MODEL, "alias": CHAMPION, "version": gate["worse"]}}, timeout=30)  # fmt: skip
    assert unsigned.status_code == 401
    assert client.get_model_version_by_alias(GATED_MODEL, CHAMPION).version == gate["champion"]


@pytest.mark.slow
def test_champion_set_on_a_worse_version_in_the_mlflow_ui_is_moved_back_with_the_reason_shown(tracking_server, gate):
    """Headless Chromium: a person adds alias `champion` to version 0.18 in the MLflow UI; the gate undoes it."""

    client = MlflowClient(tracking_server)
    worse = gated_version(client, 0.17)  # its own version: the test does not depend on the one above
    assert client.get_model_version(GATED_MODEL, worse).tags["promotion.eligible"] == "false"  # shown beforehand
    with headless_chromium() as page:
        page.goto(f"{tracking_server}/#/models/{GATED_MODEL}/versions/{worse}", wait_until="domcontentloaded")
        page.get_by_text("not eligible for champion").first.wait_for(timeout=60_000)
        page.get_by_role("button", name="Add", exact=True).first.click()  # Aliases: Add
        dialog = page.get_by_role("dialog")
        dialog.get_by_role("combobox").fill(CHAMPION)
        dialog.get_by_role("combobox").press("Enter")
        dialog.get_by_role("button", name="Save aliases").click()
        dialog.wait_for(state="hidden", timeout=30_000)
        wait_until(lambda: gate_decision(client, worse))
        page.reload(wait_until="domcontentloaded")
        page.get_by_text("Gate refused").first.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow_gate_refused.png"), full_page=True)
        text = page.inner_text("body")
    assert client.get_model_version_by_alias(GATED_MODEL, CHAMPION).version == gate["champion"]
    assert f"champion set on version {worse} was moved back to version {gate['champion']}" in text
    assert "does not beat the champion by the margin: mmeb/average 0.1700 vs champion's 0.4800" in text
    assert CHAMPION not in text.split("Aliases", 1)[1].split("Stage", 1)[0]  # the version's header shows no alias


@pytest.mark.slow
def test_moving_challenger_back_to_an_older_version_needs_an_explicit_setting(tracking_server, model_dir):
    """`register` with an older train_run.json would silently make an older version the challenger."""
    name = "no-downgrade"
    runs = [new_run(tracking_server), new_run(tracking_server)]

    def register(run_id: str, **options):
        return register_model_version(tracking_server, name=name, run_id=run_id, model_dir=str(model_dir),
                                      tags=tags_with_score(run_id, 0.3), **options)  # fmt: skip

    assert [register(run_id)["version"] for run_id in runs] == [1, 2]
    message = (
        f"'{name}' challenger is version 2; run {runs[0]} is the older version 1, and moving challenger back "
        "needs registry.allow_older_challenger: true"
    )
    with pytest.raises(RegistryError, match=re.escape(message)):
        register(runs[0])
    client = MlflowClient(tracking_server)
    assert client.get_model_version_by_alias(name, CHALLENGER).version == "2"
    assert register(runs[1])["version"] == 2  # the current challenger again: idempotent, allowed
    assert register(runs[0], allow_older_challenger=True)["version"] == 1
    assert client.get_model_version_by_alias(name, CHALLENGER).version == "1"


def test_the_configured_serving_limits_are_valid_and_the_documented_defaults():
    from tests.conftest import load_params

    assert ServingLimits.from_config(load_params()["registry"]["serving"]) == ServingLimits()


# ---------------------------------------------------------------- a project's own SQLite store


def project_run(project: Path, name: str) -> tuple[str, str]:
    """A training run in ``project``'s own SQLite store, as `kedro run` makes them: (tracking URI, run id)."""
    project.mkdir()
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment(name, artifact_location=str(project / "mlruns" / name))
    return uri, client.create_run(experiment).info.run_id


@pytest.mark.slow
def test_no_file_of_a_registered_model_names_a_path_of_the_registering_machine(model_dir, tmp_path):
    import muco_flow

    project = tmp_path / "project"
    uri, run_id = project_run(project, "portable")
    tags = tags_with_score(run_id, 0.3)
    version = register_model_version(uri, name="portable", run_id=run_id, model_dir=str(model_dir), tags=tags)
    downloaded = tmp_path / "downloaded"
    with fluent_tracking_uri(uri):
        mlflow.artifacts.download_artifacts(version["model_uri"], dst_path=str(downloaded))
    machine_paths = {
        str(project),  # the store and its artifacts
        str(model_dir.parent),  # the trained model's folder
        str(Path(muco_flow.__file__).parents[1]),  # the source the model's code was copied from
        str(PROJECT_ROOT),
        sys.prefix,  # the environment
    }
    texts = {}
    for path in sorted(downloaded.rglob("*")):
        if path.is_file():
            try:
                texts[path.relative_to(downloaded).as_posix()] = path.read_text()
            except UnicodeDecodeError:
                continue  # weights
    assert {"MLmodel", "requirements.txt", "python_env.yaml", "pyfunc_model.py"} <= texts.keys()
    assert len(texts) > 50  # the muco_flow package, the model's config and tokenizer files
    found = {(name, p) for name, text in texts.items() for p in machine_paths if p in text}
    assert not found, found
    pyfunc = yaml.safe_load(texts["MLmodel"])["flavors"]["python_function"]
    assert pyfunc["model_code_path"] == "pyfunc_model.py"
    assert pyfunc["artifacts"] == {"model_dir": {"path": "artifacts/model"}}

    # ...and MLflow loads it from the store, as from any copy of it
    with fluent_tracking_uri(uri):
        loaded = mlflow.pyfunc.load_model(f"models:/portable@{CHALLENGER}")
    vectors = loaded.predict(pd.DataFrame(probe_records()))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_registration_waits_out_a_store_another_writer_holds_past_mlflows_own_wait(model_dir, tmp_path, caplog):
    """MLflow's SQL store waits 20 s for a lock (SQLite's busy timeout); the registry retries beyond that."""
    import sqlite3
    import threading

    project = tmp_path / "project"
    uri, run_id = project_run(project, "locked")
    holder = sqlite3.connect(project / "mlflow.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another writer: reads go on, writes wait
    release = threading.Timer(24.0, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        version = register_model_version(
            uri, name="locked", run_id=run_id, model_dir=str(model_dir), tags=tags_with_score(run_id, 0.3)
        )
    finally:
        release.join()
    assert version["version"] == 1
    assert str(MlflowClient(uri).get_model_version_by_alias("locked", CHALLENGER).version) == "1"
    assert "the MLflow store is locked by another writer; trying again" in caplog.text
