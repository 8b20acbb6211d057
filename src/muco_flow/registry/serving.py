"""Serving a registered version: `MuCoEmbeddingModel`, the requests it takes and the limits it keeps.

A request is a frame of records with `text` and/or `image` (base64 PNG/JPEG,
or a URI where its operator allows), bounded by ``ServingLimits`` so that no
request can exhaust the server; a refused record is an HTTP 400 naming it.
Its parameters: `batch_size`, and `dimensions`, the width of the vectors
returned (each cut to its first `dimensions` numbers and re-normalised, as
Matryoshka training nests them; default: the model's whole width).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from PIL import Image

from muco_flow.modeling.matryoshka import nested_prefix
from muco_flow.registry import RegistryError

logger = logging.getLogger(__name__)

MODEL_DIR_ARTIFACT = "model_dir"
IMAGE_FORMATS = ("PNG", "JPEG")
DEFAULT_BATCH_SIZE = 16
SERVING_ENV_PREFIX = "MUCO_SERVE_"


class ModelInputError(MlflowException, ValueError):
    """A record the embedding model cannot encode; the message names the record and the problem.

    An MlflowException with INVALID_PARAMETER_VALUE, so that `mlflow models serve`
    answers HTTP 400 with this message (other exceptions become a generic 400).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


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


def parse_dimensions(params: Mapping[str, Any] | None, width: int) -> int | None:
    """The request's `dimensions` parameter, from 1 to the model's ``width``; None (absent): the whole width."""
    value = (params or {}).get("dimensions")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 1 <= value <= width:
        raise ModelInputError(
            f"dimensions must be a whole number from 1 to {width} (the model's embedding width), got {value!r}"
        )
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


def check_model_dir(model_dir: str | Path) -> None:
    """RegistryError unless ``model_dir`` is a model muco-flow training wrote (registered and served as such)."""
    from muco_flow.modeling.embedder import EMBEDDER_FILE

    if not (Path(model_dir) / EMBEDDER_FILE).is_file():
        raise RegistryError(f"{model_dir} holds no {EMBEDDER_FILE}: not a model written by muco-flow training")


class MuCoEmbeddingModel(PythonModel):
    """One L2-normalised embedding per record of `text` and optional `image`."""

    def load_context(self, context) -> None:
        from muco_flow.modeling.embedder import load_embedder

        model_dir = context.artifacts[MODEL_DIR_ARTIFACT]
        check_model_dir(model_dir)
        self.limits = ServingLimits.from_config(getattr(context, "model_config", None), os.environ)
        self.embedder, self.template = load_embedder(model_dir, default_template="")

    def count_tokens(self, text: str) -> int:
        return len(self.embedder.tokenizer(text, add_special_tokens=False)["input_ids"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        batch_size = parse_batch_size(params, self.limits)
        dimensions = parse_dimensions(params, self.embedder.hidden_size)
        items = parse_records(model_input, self.limits, self.count_tokens)
        vectors = self.embedder.encode(items, template=self.template, batch_size=batch_size, progress=False)
        if dimensions is not None:
            vectors = nested_prefix(vectors, dimensions)
        return vectors.float().numpy()


def model_signature(hidden_size: int):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    # No input schema: MLflow drops columns a schema does not name before the model sees them, and the
    # model must answer a misspelt column with a 400 (the input example and description show the columns).
    # the width without `dimensions` (MLflow does not enforce an output schema, so a cut answer passes)
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, hidden_size))])
    params = ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE), ParamSpec("dimensions", "long", None)])
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
