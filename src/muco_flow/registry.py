"""The MLflow Model Registry side: a servable pyfunc embedder, versions with lineage, promotion by alias.

A registered version is the training run's merged Hugging Face directory wrapped
in `MuCoEmbeddingModel`. Its tags lead back to what made it (run, commit, data,
parameters, evaluation), and the `challenger` / `champion` aliases say what it
is for. People move `champion` in the MLflow UI; `promote_challenger` is the
automatic gate for pipelines.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

from muco_flow.tracking import canonical_hash

logger = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
MODEL_DIR_ARTIFACT = "model_dir"
IMAGE_FORMATS = ("PNG", "JPEG")
DEFAULT_BATCH_SIZE = 16
SERVING_ENV_PREFIX = "MUCO_SERVE_"
# What the pyfunc needs at load time, pinned to the versions that trained it.
RUNTIME_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "peft", "pillow", "numpy",
                    "pandas", "requests", "tqdm")  # fmt: skip


class ModelInputError(MlflowException, ValueError):
    """A record the embedding model cannot encode; the message names the record and the problem.

    An MlflowException with INVALID_PARAMETER_VALUE, so that `mlflow models serve`
    answers HTTP 400 with this message (other exceptions become a generic 400).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class RegistryError(RuntimeError):
    """The registry is not in the state an operation needs (no challenger, a tag missing)."""


# ---------------------------------------------------------------- limits


@dataclass(frozen=True)
class ServingLimits:
    """What one request to the served model may hold, so that no request can exhaust the server.

    Set when registering (`registry.serving`, stored as the model's
    model_config) and overridden where it is served by environment variables
    ``MUCO_SERVE_<FIELD>`` (``MUCO_SERVE_MAX_RECORDS=16``, ``MUCO_SERVE_READ_URIS=1``).
    """

    max_records: int = 64  # records per request
    max_text_tokens: int = 4096  # tokens of one record's text
    max_image_pixels: int = 16_777_216  # one image (4096 x 4096); ~50 MB decoded
    max_request_pixels: int = 67_108_864  # every image of a request together; ~200 MB decoded
    max_batch_size: int = 64  # the `batch_size` parameter's upper bound
    read_uris: bool = False  # read file:// and fetch http(s):// images a caller names: only on a trusted network

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None):
        """Defaults, then ``config`` (the model_config), then ``MUCO_SERVE_*`` in ``environ``; checks each value."""
        from dataclasses import fields

        names = {f.name for f in fields(cls)}
        config = dict(config or {})
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"unknown serving limits {unknown}; known: {sorted(names)}")
        values: dict[str, Any] = {}
        for name in names:
            variable = SERVING_ENV_PREFIX + name.upper()
            raw = (environ or {}).get(variable)
            source = variable if raw is not None else f"registry.serving.{name}"
            value = raw if raw is not None else config.get(name, getattr(cls, name))
            values[name] = _limit_value(name, value, source)
        return cls(**values)


def _limit_value(name: str, value: Any, source: str) -> int | bool:
    if name == "read_uris":
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{source} must be true or false (1/0), got {value!r}")
    try:
        number = int(value) if not isinstance(value, bool) and float(value) == int(value) else None
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or number < 1:
        raise ValueError(f"{source} must be a whole number of at least 1, got {value!r}")
    return number


def parse_batch_size(params: Mapping[str, Any] | None, limits: ServingLimits) -> int:
    """The request's `batch_size` parameter, from 1 to ``limits.max_batch_size``."""
    value = (params or {}).get("batch_size", DEFAULT_BATCH_SIZE)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 1 <= value <= limits.max_batch_size:
        raise ModelInputError(f"batch_size must be a whole number from 1 to {limits.max_batch_size}, got {value!r}")
    return int(value)


class _RequestPixels:
    """The pixels of a request's images so far, checked from each header before it is decoded."""

    def __init__(self, limits: ServingLimits) -> None:
        self.limits, self.total = limits, 0

    def add(self, width: int, height: int, record: int) -> None:
        self.total += width * height
        if self.total > self.limits.max_request_pixels:
            raise ModelInputError(
                f"record {record}: the request's images hold {self.total} pixels up to this one, at most "
                f"{self.limits.max_request_pixels} are served per request; send fewer or smaller images"
            )


# ---------------------------------------------------------------- inputs


def decode_image(
    value: Any,
    record: int,
    *,
    limits: ServingLimits | None = None,
    pixels: _RequestPixels | None = None,
    timeout_s: float = 10.0,
) -> Image.Image | None:
    """The image of one record: base64 PNG/JPEG (optionally a data: URI), a file:// or http(s):// URI, or none.

    URIs are read only when ``limits.read_uris`` is set: a public endpoint must not
    read its own files or fetch addresses a caller names.
    """
    limits = limits or ServingLimits()
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    if not isinstance(value, str):
        raise ModelInputError(f"record {record}: 'image' must be a string, got {type(value).__name__}")
    scheme = urlparse(value).scheme.lower()
    if scheme in ("file", "http", "https"):
        if not limits.read_uris:
            raise ModelInputError(
                f"record {record}: 'image' is a {scheme}:// URI, which this server does not read (send the image "
                f"as base64; its operator can allow URIs with {SERVING_ENV_PREFIX}READ_URIS=1)"
            )
        data = _read_uri(value, scheme, record, timeout_s)
    else:
        encoded = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ModelInputError(
                f"record {record}: 'image' is neither base64 nor a file://, http:// or https:// URI"
            ) from None
    return _open_image(data, record, limits, pixels or _RequestPixels(limits))


def _read_uri(uri: str, scheme: str, record: int, timeout_s: float) -> bytes:
    if scheme == "file":
        path = Path(unquote(urlparse(uri).path))
        if not path.is_file():
            raise ModelInputError(f"record {record}: image file {path} does not exist")
        return path.read_bytes()
    import requests

    from muco_flow.data.fetch import FetchConfig, FetchError, fetch_url

    try:
        with requests.Session() as session:
            return fetch_url(session, uri, FetchConfig(timeout_s=timeout_s, retries=1))
    except FetchError as err:
        raise ModelInputError(f"record {record}: image {uri} could not be fetched: {err}") from None


def _open_image(data: bytes, record: int, limits: ServingLimits, pixels: _RequestPixels) -> Image.Image:
    from muco_flow.data.images import ImageDecodeError, check_image

    # the format and size of what was sent, from its header (check_image re-encodes tiny images as PNG)
    try:
        with Image.open(io.BytesIO(data)) as sent:
            sent_format, (width, height) = sent.format, sent.size
    except Exception:  # check_image names what is wrong with these bytes
        sent_format, width, height = None, 0, 0
    if sent_format is not None and sent_format not in IMAGE_FORMATS:
        expected = ", ".join(IMAGE_FORMATS)
        raise ModelInputError(f"record {record}: image is {sent_format}, expected one of {expected}")
    if width * height <= limits.max_image_pixels:
        pixels.add(width, height, record)  # before it is decoded: a request's images are held together
    try:
        checked = check_image(data, limits.max_image_pixels)
    except ImageDecodeError as err:
        raise ModelInputError(f"record {record}: {err}") from None
    return Image.open(io.BytesIO(checked.data)).convert("RGB")


def parse_records(
    frame: pd.DataFrame, limits: ServingLimits | None = None, count_tokens: Callable[[str], int] | None = None
) -> list[tuple[str, Image.Image | None]]:
    """(text, image) per row of a frame with `text` and/or `image` columns, within ``limits``.

    ``count_tokens`` (the model's tokenizer) bounds each text; without it texts are not counted.
    """
    limits = limits or ServingLimits()
    unknown = set(frame.columns) - {"text", "image"}
    if unknown or frame.empty or not ({"text", "image"} & set(frame.columns)):
        raise ModelInputError(
            f"expected records with columns 'text' and/or 'image'; got columns {sorted(frame.columns)}"
            f" and {len(frame)} rows"
        )
    if len(frame) > limits.max_records:
        raise ModelInputError(f"a request holds at most {limits.max_records} records, this one {len(frame)}: split it")
    pixels = _RequestPixels(limits)
    items = []
    for record, row in enumerate(frame.to_dict("records")):
        text = row.get("text")
        text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else text
        if not isinstance(text, str):
            raise ModelInputError(f"record {record}: 'text' must be a string, got {type(text).__name__}")
        # byte-level BPE: never more tokens than UTF-8 bytes, so short texts need no tokenizing
        if count_tokens is not None and len(text.encode("utf-8", "surrogatepass")) > limits.max_text_tokens:
            tokens = count_tokens(text)
            if tokens > limits.max_text_tokens:
                raise ModelInputError(
                    f"record {record}: 'text' has {tokens} tokens, at most {limits.max_text_tokens} are served"
                )
        image = decode_image(row.get("image"), record, limits=limits, pixels=pixels)
        if not text and image is None:
            raise ModelInputError(f"record {record}: neither 'text' nor 'image' is given")
        items.append((text, image))
    return items


# ---------------------------------------------------------------- the pyfunc model


class MuCoEmbeddingModel(mlflow.pyfunc.PythonModel):
    """One L2-normalised embedding per record of `text` and optional `image`."""

    def load_context(self, context) -> None:
        from muco_flow.modeling.embedder import EMBEDDER_FILE, load_embedder

        model_dir = context.artifacts[MODEL_DIR_ARTIFACT]
        if not (Path(model_dir) / EMBEDDER_FILE).is_file():
            raise RegistryError(f"{model_dir} holds no {EMBEDDER_FILE}: not a model written by muco-flow training")
        self.limits = ServingLimits.from_config(getattr(context, "model_config", None), os.environ)
        self.embedder, self.template = load_embedder(model_dir, default_template="")

    def count_tokens(self, text: str) -> int:
        return len(self.embedder.tokenizer(text, add_special_tokens=False)["input_ids"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        batch_size = parse_batch_size(params, self.limits)
        items = parse_records(model_input, self.limits, self.count_tokens)
        vectors = self.embedder.encode(items, template=self.template, batch_size=batch_size, progress=False)
        return vectors.float().numpy()


def model_signature(hidden_size: int):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    # No input schema: MLflow drops columns a schema does not name before the model sees them, and the
    # model must answer a misspelt column with a 400 (the input example and description show the columns).
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, hidden_size))])
    params = ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)])
    return ModelSignature(inputs=None, outputs=outputs, params=params)


def input_example() -> pd.DataFrame:
    """A text-only and an image+text record (a small PNG), as a client would send them."""
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (220, 40, 40)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    return pd.DataFrame(
        [
            {"text": "A large red square on a white background.", "image": None},
            {"text": "What is the main object in the image?", "image": image},
        ]
    )


def pinned_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in RUNTIME_PACKAGES]


# ---------------------------------------------------------------- lineage


PRIMARY_METRIC_TAG = "primary_metric"
PRIMARY_METRIC_VALUE_TAG = "primary_metric_value"


def lineage_tags(
    *, run_id: str, run_params: Mapping[str, str], git_commit: str, data_manifest: Mapping[str, Any],
    training_fingerprint: str, primary_metric: str, headline_metrics: Mapping[str, float],
) -> dict[str, str]:  # fmt: skip
    """The few tags a version carries (promotion reads the last two); the rest is in its description."""
    if primary_metric not in headline_metrics:
        raise RegistryError(f"registry.primary_metric {primary_metric!r} is not a key of metrics.json's headline")
    return {
        "run_id": run_id,
        "git_commit": git_commit,
        "data_fingerprint": canonical_hash(data_manifest),
        "params_hash": canonical_hash(dict(run_params)),
        "training_fingerprint": training_fingerprint,
        PRIMARY_METRIC_TAG: primary_metric,
        PRIMARY_METRIC_VALUE_TAG: repr(float(headline_metrics[primary_metric])),
    }


def version_description(run_id: str, headline: Mapping[str, float], delta: Mapping[str, float]) -> str:
    """Markdown for the version page: where it comes from and every headline metric against the baseline."""
    lines = [
        f"MuCo embedder from training run `{run_id}` (its page has the parameters, curves and the full "
        "evaluation). Input: records with `text` and an optional `image`; output: one L2-normalised vector each.",
        "",
        "| metric | trained | vs baseline |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {key} | {value:.4f} | {delta[key]:+.4f} |" if key in delta else f"| {key} | {value:.4f} | |"
              for key, value in headline.items()]  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------- registration


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """``uri`` for MLflow's fluent API (start_run, log_model, register_model) inside the block only.

    ``mlflow.set_tracking_uri`` is process-wide and also exports MLFLOW_TRACKING_URI
    to every later subprocess; both are put back as they were.
    """
    from mlflow.tracking import is_tracking_uri_set

    previous = mlflow.get_tracking_uri() if is_tracking_uri_set() else None
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if exported is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = exported


def find_version_for_run(client, name: str, run_id: str):
    """The version of ``name`` made from ``run_id``, or None; more than one is an error."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if len(versions) > 1:
        numbers = ", ".join(sorted(v.version for v in versions))
        raise RegistryError(f"model '{name}' has several versions ({numbers}) from run {run_id}")
    return versions[0] if versions else None


# models-from-code: the file MLflow logs as the model and runs at load time
PYFUNC_MODEL_MODULE = "muco_flow.pyfunc_model"


def register_model_version(
    tracking_uri: str,
    *,
    name: str,
    run_id: str,
    model_dir: str,
    tags: Mapping[str, str],
    description: str = "",
    allow_older_challenger: bool = False,
    serving: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Logs the pyfunc to ``run_id`` and registers it under ``name`` with ``tags`` and alias `challenger`.

    Idempotent: a version already made from the run is reused, so a retry after a
    failure (or a second `kedro run`) never creates a duplicate. Reusing an older
    version than the current challenger (`register` with an older train_run.json)
    would move `challenger` back: refused unless ``allow_older_challenger``.
    ``serving``: the ServingLimits stored with a new version (its model_config).
    """
    from mlflow.tracking import MlflowClient

    from muco_flow.modeling.embedder import EMBEDDER_FILE

    if not (Path(model_dir) / EMBEDDER_FILE).is_file():
        raise RegistryError(f"{model_dir} holds no {EMBEDDER_FILE}: not a model written by muco-flow training")
    ServingLimits.from_config(serving)  # refused here rather than when the model is served
    client = MlflowClient(tracking_uri)
    version = find_version_for_run(client, name, run_id)
    if version is None:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        hidden_size = (config.get("text_config") or config)["hidden_size"]
        with fluent_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="embedding_model",
                # models-from-code: the model is this file's source, run at load time; nothing is pickled
                python_model=importlib.util.find_spec(PYFUNC_MODEL_MODULE).origin,
                artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
                signature=model_signature(hidden_size),
                input_example=input_example(),
                model_config=dict(serving or {}),
                pip_requirements=pinned_requirements(),
                code_paths=[str(Path(__file__).parent)],  # the muco_flow package: the model's own code
            )
        with fluent_tracking_uri(tracking_uri):
            version = mlflow.register_model(info.model_uri, name, tags=dict(tags))
        logger.info("registered %s version %s from run %s", name, version.version, run_id)
    else:
        logger.info("%s version %s already holds run %s; not registering again", name, version.version, run_id)
        current = _version_by_alias(client, name, CHALLENGER)
        if current is not None and int(current.version) > int(version.version) and not allow_older_challenger:
            raise RegistryError(
                f"'{name}' challenger is version {current.version}; run {run_id} is the older version "
                f"{version.version}, and moving challenger back needs registry.allow_older_challenger: true "
                "(is data/06_models/train_run.json an older training's?)"
            )
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    if description:
        client.update_model_version(name, version.version, description=description)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return {
        "name": name,
        "version": int(version.version),
        "run_id": run_id,
        "model_uri": f"models:/{name}/{version.version}",
        "alias": CHALLENGER,
        "tags": dict(tags),
    }


# ---------------------------------------------------------------- promotion


@dataclass(frozen=True)
class PromotionPolicy:
    """When the challenger takes `champion`: higher primary metric by at least ``margin``."""

    primary_metric: str
    margin: float = 0.0
    promote_first: bool = False

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> PromotionPolicy:
        promotion = params.get("promotion", {})
        return cls(
            primary_metric=params["primary_metric"],
            margin=float(promotion.get("margin", 0.0)),
            promote_first=bool(promotion.get("promote_first", False)),
        )


def decide_promotion(challenger: float, champion: float | None, policy: PromotionPolicy) -> tuple[bool, str]:
    """(promote?, why), given the two versions' primary metric (None: there is no champion)."""
    metric = policy.primary_metric
    if champion is None:
        if policy.promote_first:
            return True, f"no champion yet and promote_first is set ({metric} = {challenger:.4f})"
        return False, "no champion yet and promote_first is not set: promote in the MLflow UI"
    gain = challenger - champion
    comparison = f"{metric} {challenger:.4f} vs champion's {champion:.4f} (gain {gain:+.4f}, margin {policy.margin})"
    if gain >= policy.margin:
        return True, f"challenger beats the champion: {comparison}"
    return False, f"challenger does not beat the champion by the margin: {comparison}"


def _version_by_alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _metric_of(version, metric: str) -> float:
    tagged = version.tags.get(PRIMARY_METRIC_TAG)
    if tagged is None or PRIMARY_METRIC_VALUE_TAG not in version.tags:
        raise RegistryError(f"version {version.version} of '{version.name}' has no {metric} tag: it was not evaluated")
    if tagged != metric:
        raise RegistryError(
            f"version {version.version} of '{version.name}' is tagged with {tagged}, but promotion compares {metric}"
        )
    return float(version.tags[PRIMARY_METRIC_VALUE_TAG])


def promote_challenger(tracking_uri: str, name: str, policy: PromotionPolicy) -> dict[str, Any]:
    """Moves `champion` to the `challenger` version if the policy says so; records why on the version."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    challenger = _version_by_alias(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(f"model '{name}' has no '{CHALLENGER}' version: run `kedro run --pipelines=register` first")
    champion = _version_by_alias(client, name, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        promote, reason = False, f"version {challenger.version} is already the champion"
    else:
        champion_score = _metric_of(champion, policy.primary_metric) if champion is not None else None
        promote, reason = decide_promotion(_metric_of(challenger, policy.primary_metric), champion_score, policy)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
    # one tag (the version keeps few); the why, when and against what go into its description
    outcome = "promoted" if promote else "not_promoted"
    client.set_model_version_tag(name, challenger.version, "promotion", outcome)
    compared = f"version {champion.version}" if champion is not None else "no champion"
    when = datetime.now(UTC).isoformat(timespec="seconds")
    record = f"**Promotion** ({when}, compared with {compared}): {outcome}: {reason}"
    previous = client.get_model_version(name, challenger.version).description or ""
    client.update_model_version(name, challenger.version, description=f"{previous}\n\n{record}".strip())
    logger.info("%s version %s: %s", name, challenger.version, reason)
    champion_now = challenger.version if promote else (champion.version if champion is not None else None)
    return {
        "name": name,
        "challenger": int(challenger.version),
        "champion": int(champion_now) if champion_now is not None else None,
        "promoted": promote,
        "reason": reason,
    }
