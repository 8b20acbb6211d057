"""Ingestion: an M3T snapshot in, validated parquet shards with embedded images out.

The meta file is streamed in batches of rows, so memory stays flat however
many rows there are (only the set of seen sample ids grows, a few bytes per
row). Every row read ends either in a shard or in ``rejects.parquet`` with a
reason code; the manifest checks read = accepted + rejected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import requests
from tqdm.auto import tqdm

from muco_flow.data import schema
from muco_flow.data.fetch import FetchConfig, FetchError, fetch_url
from muco_flow.data.images import (
    MAX_ASPECT_RATIO,
    CheckedImage,
    ImageDecodeError,
    UnsafePathError,
    check_image,
    confined_key,
)
from muco_flow.data.meta_file import MetaFileError, UndecodableRow, decode_rows, iter_batches, open_parquet
from muco_flow.data.row_checks import (
    Reject,
    check_limit_settings,
    check_row_limits,
    internal_error,
    is_blank,
    normalise_sample_id,
)
from muco_flow.data.shards import ShardWriter
from muco_flow.data.sources import (
    ImageMissingError,
    ImageUnreadableError,
    SnapshotSource,
    SourceError,
    file_sha256,
)
from muco_flow.modeling import tokens

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"
REJECTS_FILE = "rejects.parquet"
MANIFEST_FILE = "manifest.json"

REJECT_REASONS = {
    "MISSING_FIELD": "a required field is null or NaN",
    "WRONG_TYPE": "a field has the wrong type (for example a number where text belongs)",
    "TURN_COUNT_MISMATCH": "qry, pos_text, pos_sentence (and neg_text) have different numbers of turns",
    "IMAGE_PLACEHOLDER": f"a text holds an image placeholder other than one {tokens.IMAGE_1} (one image per sample)",
    "EMPTY_TEXT": "a query phrasing or target is empty or only invisible characters (zero-width, whitespace)",
    "TEXT_TOO_LONG": "a text, id or path is longer than ingest.max_text_chars, max_id_chars or max_path_chars",
    "TOO_MANY_TURNS": "the row has more turns than ingest.max_turns",
    "TOO_MANY_PHRASINGS": "a turn has more query phrasings than ingest.max_phrasings_per_turn",
    "UNDECODABLE_VALUE": "a value cannot be decoded (for example invalid UTF-8 in a string column)",
    "SPECIAL_TOKEN_IN_TEXT": "a text contains a chat or MuCo control token such as <|emb|> or <|im_start|>",
    "DUPLICATE_ID": "the sample id was already accepted earlier in the file",
    "UNSAFE_PATH": "the image path is absolute, contains '..' or leaves the root through a symlink",
    "IMAGE_MISSING": "no image at the path and no image URL to fetch it from",
    "DOWNLOAD_FAILED": "the image was not on disk and its URL did not give an image",
    "EMPTY_IMAGE": "the image file has 0 bytes",
    "IMAGE_UNDECODABLE": "the image is truncated or not an image",
    "IMAGE_TOO_LARGE": "the image exceeds the decompression-bomb pixel limit, or ingest.max_image_bytes",
    "IMAGE_NOT_A_FILE": "the image path is a FIFO, socket, device or symlink loop, not a regular file",
    "IMAGE_UNREADABLE": "the image file exists but cannot be read (permissions, an I/O error)",
    "IMAGE_ASPECT_RATIO": "the image's long side is more than ingest.max_aspect_ratio times its short side",
    "TARGET_IMAGE_UNSUPPORTED": "a target has an image (pos_image_path); stage 1 ingests text targets only",
    "INTERNAL_ERROR": "a check failed in a way nobody foresaw (the message names the exception); please report it",
}

REQUIRED = (schema.QRY, schema.POS_TEXT, schema.POS_SENTENCE, schema.QRY_IMAGE_PATH)
OPTIONAL = (schema.NEG_TEXT, schema.QRY_SENTENCE, schema.POS_IMAGE_PATH, schema.IMAGE_URL)

INGESTED_SCHEMA = pa.schema(
    [
        pa.field(schema.SAMPLE_ID, pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field(schema.QRY, pa.list_(pa.list_(pa.string())), nullable=False),
        pa.field(schema.POS_TEXT, pa.list_(pa.string()), nullable=False),
        pa.field(schema.POS_SENTENCE, pa.list_(pa.string()), nullable=False),
        pa.field(schema.NEG_TEXT, pa.list_(pa.string())),
        pa.field(schema.QRY_SENTENCE, pa.string()),
        # a sample without an image (qry_image_path "") has "" and nulls here
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("image_bytes", pa.binary()),
        pa.field("image_sha256", pa.string()),
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("image_upscaled", pa.bool_()),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field(schema.SAMPLE_ID, pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class IngestConfig:
    """The `ingest` parameters (conf/base/parameters_ingest.yml)."""

    # our column name -> the source's; columns not listed keep their names
    column_mapping: dict[str, str] = field(default_factory=dict)
    # None, or a column the file lacks (the published M3T has none): the id is
    # derived from the row's position and content (derived_sample_id)
    id_column: str | None = schema.SAMPLE_ID
    rows_per_shard: int = 5000
    batch_rows: int = 256
    max_text_chars: int = 2000
    max_id_chars: int = 256
    max_path_chars: int = 4096  # image paths and URLs
    max_turns: int = 32  # M3T has 7
    max_phrasings_per_turn: int = 256  # each is tokenized twice by format
    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 50_000_000
    max_aspect_ratio: float = MAX_ASPECT_RATIO  # Qwen2-VL's image processor refuses more
    max_reject_fraction: float = 0.05
    image_workers: int = 8
    download: FetchConfig = field(default_factory=FetchConfig)

    def __post_init__(self) -> None:
        if self.rows_per_shard < 1 or self.batch_rows < 1 or self.image_workers < 1:
            raise ValueError("ingest: rows_per_shard, batch_rows and image_workers must be at least 1")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError(f"ingest.max_reject_fraction must be within [0, 1], got {self.max_reject_fraction}")
        check_limit_settings(self.max_turns, self.max_phrasings_per_turn)
        if not 1.0 <= self.max_aspect_ratio <= MAX_ASPECT_RATIO:
            raise ValueError(
                f"ingest.max_aspect_ratio must be within [1, {MAX_ASPECT_RATIO:g}] (Qwen2-VL's limit), "
                f"got {self.max_aspect_ratio}"
            )

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> IngestConfig:
        params = dict(params)
        download = dict(params.pop("download", {}))
        if "allowed_content_types" in download:
            download["allowed_content_types"] = tuple(download["allowed_content_types"])
        return cls(download=FetchConfig(**download), **params)

    def source_column(self, ours: str) -> str:
        """The source's name for our column ``ours``."""
        if ours == schema.SAMPLE_ID and self.id_column:
            return self.id_column
        return self.column_mapping.get(ours, ours)


class IngestQualityError(RuntimeError):
    """More rows were rejected than ingest.max_reject_fraction allows."""


# --- row checks ---------------------------------------------------------------


def string_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise Reject("WRONG_TYPE", f"{name} must be a list of strings, got {type(value).__name__}")
    return list(value)


def _phrasings(value: Any) -> list[list[str]]:
    if not isinstance(value, list | tuple):
        raise Reject("WRONG_TYPE", f"qry must be a list of turns, got {type(value).__name__}")
    # a turn is a list of phrasings; a bare string is one phrasing
    return [[turn] if isinstance(turn, str) else string_list(turn, "qry turn") for turn in value]


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


CONTROL_TOKENS = (*tokens.QWEN2_VL_SPECIAL_TOKENS, *tokens.MUCO_TOKENS)


PLACEHOLDER_PATTERN = re.compile(r"<\|image_\d+\|>")


def check_text(text: str, name: str, limit: int, *, allow_empty: bool = False) -> None:
    """Reject if ``text`` cannot be put into a conversation; ``allow_empty``: an image may stand alone."""
    if not allow_empty and is_blank(text.replace(tokens.IMAGE_1, "")):
        raise Reject("EMPTY_TEXT", f"{name} is empty or only invisible characters")
    placeholders = PLACEHOLDER_PATTERN.findall(text)
    if len(placeholders) > 1 or any(p != tokens.IMAGE_1 for p in placeholders):
        raise Reject("IMAGE_PLACEHOLDER", f"{name} holds {', '.join(placeholders)}; at most one {tokens.IMAGE_1}")
    if len(text) > limit:
        raise Reject("TEXT_TOO_LONG", f"{name} has {len(text)} characters, the limit is {limit}")
    # A control token in the data would add turns or image slots the
    # conversation does not have.
    found = next((tok for tok in CONTROL_TOKENS if tok in text), None)
    if found:
        raise Reject("SPECIAL_TOKEN_IN_TEXT", f"{name} contains the control token {found}")


def _target_image_path(value: Any) -> str:
    """pos_image_path as one string: the published file's string (or the first path of a list of them)."""
    if is_missing(value):
        return ""
    if isinstance(value, str):
        return value
    return next((p for p in string_list(value, schema.POS_IMAGE_PATH) if p), "")


def validate_text_fields(row: dict[str, Any], config: IngestConfig) -> dict[str, Any]:
    """The row's fields in our schema, or Reject with the first problem found."""
    for name in REQUIRED:
        if is_missing(row.get(name)):
            raise Reject("MISSING_FIELD", f"{name} is missing")
    qry = _phrasings(row[schema.QRY])
    pos_text = string_list(row[schema.POS_TEXT], schema.POS_TEXT)
    pos_sentence = string_list(row[schema.POS_SENTENCE], schema.POS_SENTENCE)
    neg_text = None if is_missing(row.get(schema.NEG_TEXT)) else string_list(row[schema.NEG_TEXT], schema.NEG_TEXT)
    counts = {"qry": len(qry), "pos_text": len(pos_text), "pos_sentence": len(pos_sentence)}
    if neg_text is not None:
        counts["neg_text"] = len(neg_text)
    if len(set(counts.values())) != 1 or not qry:
        raise Reject("TURN_COUNT_MISMATCH", "turn counts differ: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    for k, phrasings in enumerate(qry):
        if not phrasings:
            raise Reject("EMPTY_TEXT", f"qry turn {k} has no phrasing")
        for p in phrasings:
            check_text(p, f"qry turn {k}", config.max_text_chars)
    for name, texts in (("pos_text", pos_text), ("pos_sentence", pos_sentence), ("neg_text", neg_text or [])):
        for k, text in enumerate(texts):
            check_text(text, f"{name} turn {k}", config.max_text_chars)
    image_path = row[schema.QRY_IMAGE_PATH]
    if not isinstance(image_path, str):
        raise Reject("WRONG_TYPE", f"qry_image_path must be a string, got {type(image_path).__name__}")
    if _target_image_path(row.get(schema.POS_IMAGE_PATH)):
        raise Reject("TARGET_IMAGE_UNSUPPORTED", "pos_image_path names a target image")
    sentence = row.get(schema.QRY_SENTENCE)
    if not is_missing(sentence) and not isinstance(sentence, str):
        raise Reject("WRONG_TYPE", f"qry_sentence must be a string, got {type(sentence).__name__}")
    url = row.get(schema.IMAGE_URL)
    return {
        schema.QRY: qry,
        schema.POS_TEXT: pos_text,
        schema.POS_SENTENCE: pos_sentence,
        schema.NEG_TEXT: neg_text,
        schema.QRY_SENTENCE: None if is_missing(sentence) else sentence,
        "image_path": image_path,
        "image_url": url if isinstance(url, str) and url else None,
    }


def derived_sample_id(index: int, row: dict[str, Any]) -> str:
    """An id for a row of a file without an id column: its position and a hash of its content.

    The position keeps ids unique; the hash makes an id name one content, so a
    reordered or edited snapshot does not silently reuse ids for other samples.
    """
    content = json.dumps(
        [row.get(schema.QRY_IMAGE_PATH), row.get(schema.QRY), row.get(schema.POS_TEXT)], default=str, ensure_ascii=False
    )
    return f"{index:09d}-{hashlib.blake2b(content.encode(), digest_size=6).hexdigest()}"


def sample_id_of(row: dict[str, Any], index: int, config: IngestConfig, has_id_column: bool) -> str:
    if not has_id_column:
        return derived_sample_id(index, row)
    value = row.get(schema.SAMPLE_ID)
    if is_missing(value):
        raise Reject("MISSING_FIELD", f"sample id column '{config.id_column}' is missing")
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise Reject("WRONG_TYPE", f"sample id must be a string or integer, got {type(value).__name__}")
    return str(value)


def load_checked_image(
    source: SnapshotSource, path: str, url: str | None, session: requests.Session, config: IngestConfig
) -> CheckedImage:
    """The image at ``path`` in the snapshot, else from ``url``, checked and decoded."""
    try:
        confined_key(path)
        try:
            data = source.read_image(path, max_bytes=config.max_image_bytes)
        except ImageMissingError as missing:
            if not url:
                raise Reject("IMAGE_MISSING", f"{missing}, and the row has no image URL") from None
            try:
                data = fetch_url(session, url, config.download)
            except FetchError as err:
                raise Reject("DOWNLOAD_FAILED", f"{missing}; fetching {url} failed: {err}") from None
        return check_image(data, config.max_image_pixels, config.max_aspect_ratio)
    except UnsafePathError as err:
        raise Reject("UNSAFE_PATH", str(err)) from None
    except (ImageDecodeError, ImageUnreadableError) as err:
        raise Reject(err.code, str(err)) from None


IMAGE_FIELDS = ("image_bytes", "image_sha256", "image_width", "image_height", "image_upscaled")


def image_columns(image: CheckedImage | None, prefix: str = "") -> dict[str, Any]:
    """The stored columns of one image (all null without one), named ``prefix`` + IMAGE_FIELDS."""
    if image is None:
        return {prefix + name: None for name in IMAGE_FIELDS}
    values = (image.data, hashlib.sha256(image.data).hexdigest(), image.width, image.height, image.upscaled)
    return {prefix + name: value for name, value in zip(IMAGE_FIELDS, values, strict=True)}


def _reject_record(index: int, sample_id: str | None, reject: Reject) -> dict[str, Any]:
    return {"source_row": index, "sample_id": sample_id, "reason": reject.code, "message": reject.message}


def _map_columns(
    batch: pa.RecordBatch, config: IngestConfig, wanted: list[str]
) -> list[dict[str, Any] | UndecodableRow]:
    renames = {config.source_column(ours): ours for ours in wanted}
    return [
        row if isinstance(row, UndecodableRow) else {renames[k]: v for k, v in row.items() if k in renames}
        for row in decode_rows(batch)
    ]


@dataclass(frozen=True)
class RowFormat:
    """One kind of meta file: its columns, how a row is checked, and what a shard row holds.

    ``validate`` turns a row (our column names) into the shard row's text
    fields, or raises Reject; ``image_paths`` lists the images those fields
    name, each with a label for messages ("" = the row's only image, which may
    come from its URL); ``image_columns`` turns the loaded images (None where
    a path is "") into the shard row's image columns.
    """

    schema_version: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    output_schema: pa.Schema
    validate: Callable[[dict[str, Any], IngestConfig], dict[str, Any]]
    image_paths: Callable[[dict[str, Any]], list[tuple[str, str]]]
    image_columns: Callable[[dict[str, Any], list[CheckedImage | None]], dict[str, Any]]
    # for the layout-independent limits (row_checks.check_row_limits): the
    # field holding turns of phrasings (None: no turns), and the path/URL fields
    turns_field: str | None = None
    path_fields: tuple[str, ...] = ()


M3T_ROW_FORMAT = RowFormat(
    schema_version=schema.SCHEMA_VERSION,
    required=REQUIRED,
    optional=OPTIONAL,
    output_schema=INGESTED_SCHEMA,
    validate=validate_text_fields,
    image_paths=lambda fields: [("", fields["image_path"])],
    image_columns=lambda fields, images: image_columns(images[0]),
    turns_field=schema.QRY,
    path_fields=("image_path", "image_url"),
)


def check_row(
    row: dict[str, Any], position: int, prefix: str, config: IngestConfig, has_id_column: bool, row_format: RowFormat
) -> tuple[str, dict[str, Any]]:
    """The row's normalised sample id and validated fields, or Reject; layout-independent limits included.

    ``position`` is the row's index in its own file, ``prefix`` names the file's dataset (MMEB-train).
    """
    sample_id = normalise_sample_id(prefix + sample_id_of(row, position, config, has_id_column), config.max_id_chars)
    fields = row_format.validate(row, config)
    check_row_limits(
        fields,
        query_field=row_format.turns_field,
        path_fields=row_format.path_fields,
        max_text_chars=config.max_text_chars,
        max_path_chars=config.max_path_chars,
        max_turns=config.max_turns,
        max_phrasings_per_turn=config.max_phrasings_per_turn,
    )
    return sample_id, fields


@dataclass(frozen=True)
class MetaPart:
    """One meta file of a snapshot; ``dataset`` names it when a snapshot has several (MMEB-train)."""

    source: SnapshotSource
    dataset: str | None = None


def _columns_to_read(meta: pq.ParquetFile, config: IngestConfig, row_format: RowFormat) -> list[str]:
    """Our names of the columns to read; a missing required column is a setup error, not row rejects."""
    available = set(meta.schema_arrow.names)
    missing = [
        f"'{config.source_column(c)}' (for {c})"
        for c in row_format.required
        if config.source_column(c) not in available
    ]
    if missing:
        raise ValueError(
            f"the meta file has no column {', '.join(missing)}; it has {sorted(available)}. "
            "Map the source's names to ours with ingest.column_mapping."
        )
    optional = [*row_format.optional, schema.SAMPLE_ID] if config.id_column else list(row_format.optional)
    return list(row_format.required) + [c for c in optional if config.source_column(c) in available]


def ingest_m3t_snapshot(source: SnapshotSource, output_dir: Path, config: IngestConfig) -> dict[str, Any]:
    """Validates every row of ``source`` and writes shards, rejects and a manifest into ``output_dir``."""
    return ingest_snapshot([MetaPart(source)], output_dir, config, M3T_ROW_FORMAT)


def ingest_snapshot(
    parts: Sequence[MetaPart], output_dir: Path, config: IngestConfig, row_format: RowFormat
) -> dict[str, Any]:
    """Validates every row of every part in ``row_format`` and writes shards, rejects and a manifest.

    ``source_row`` counts rows across the parts in their order; the manifest
    gives each part's first row.
    """
    output_dir = Path(output_dir)
    labels = [f"{part.source.uri.rstrip('/')}/{part.source.meta_file}" for part in parts]
    metas = [open_parquet(part.source.meta_path(), label) for part, label in zip(parts, labels, strict=True)]
    total = sum(meta.metadata.num_rows for meta in metas)
    if total == 0:
        raise MetaFileError(f"{', '.join(labels)}: the meta file has no rows (columns {metas[0].schema_arrow.names})")
    shards = ShardWriter(output_dir / SHARDS_DIR, row_format.output_schema, config.rows_per_shard)
    rejects_writer = pq.ParquetWriter(
        output_dir / REJECTS_FILE, REJECTS_SCHEMA, compression="zstd", write_page_checksum=True
    )
    reasons: Counter[str] = Counter()
    seen_ids: set[bytes] = set()  # 16-byte digests: memory per row stays small
    read = accepted = 0
    part_entries: list[dict[str, Any]] = []
    id_columns: set[str | None] = set()
    output_names = set(row_format.output_schema.names)

    def images_of(
        source: SnapshotSource, candidate: tuple[int, str, dict[str, Any]]
    ) -> list[CheckedImage | None] | Reject:
        fields = candidate[2]
        loaded: list[CheckedImage | None] = []
        for label, path in row_format.image_paths(fields):
            if not path:
                loaded.append(None)  # no image here, as the published rows with an empty path
                continue
            try:
                url = fields.get("image_url") if not label else None
                loaded.append(load_checked_image(source, path, url, session, config))
            except Reject as reject:
                return Reject(reject.code, f"{label}: {reject.message}") if label else reject
            except SourceError:
                raise  # the store itself failed (S3 retries exhausted): the run stops, naming the object
            except Exception as err:
                return internal_error(err)
        return loaded

    with (
        requests.Session() as session,
        ThreadPoolExecutor(config.image_workers) as pool,
        tqdm(total=total, desc="ingest", unit="row", disable=total < 2000) as progress,
    ):
        for part, meta, label in zip(parts, metas, labels, strict=True):
            source = part.source
            try:
                wanted = _columns_to_read(meta, config, row_format)
            except ValueError as err:
                raise MetaFileError(f"{label}: {err}") from None
            has_id_column = schema.SAMPLE_ID in wanted
            id_columns.add(config.id_column if has_id_column else None)
            if not has_id_column:
                logger.info(
                    "ingest: %s has no id column%s; each id is the row's position and a hash of its content",
                    label,
                    f" '{config.id_column}'" if config.id_column else "",
                )
            first_row = read
            prefix = f"{part.dataset}/" if part.dataset else ""
            columns = [config.source_column(c) for c in wanted]
            for batch in iter_batches(meta, label, batch_size=config.batch_rows, columns=columns):
                rows = _map_columns(batch, config, wanted)
                rejects: list[dict[str, Any]] = []
                candidates: list[tuple[int, str, dict[str, Any]]] = []
                for offset, row in enumerate(rows):
                    index = read + offset
                    sample_id = None
                    try:
                        if isinstance(row, UndecodableRow):
                            raise Reject("UNDECODABLE_VALUE", row.message)
                        sample_id, fields = check_row(row, index - first_row, prefix, config, has_id_column, row_format)
                        digest = hashlib.blake2b(sample_id.encode(), digest_size=16).digest()
                        if digest in seen_ids:
                            raise Reject("DUPLICATE_ID", f"sample id '{sample_id}' appeared earlier in the file")
                        seen_ids.add(digest)
                        candidates.append((index, sample_id, fields))
                    except Reject as reject:
                        rejects.append(_reject_record(index, sample_id, reject))
                    except Exception as err:  # no row ends the run
                        rejects.append(_reject_record(index, sample_id, internal_error(err)))

                good: list[dict[str, Any]] = []
                for (index, sample_id, fields), images in zip(
                    candidates, pool.map(partial(images_of, source), candidates), strict=True
                ):
                    if isinstance(images, Reject):
                        rejects.append(_reject_record(index, sample_id, images))
                        continue
                    kept = {k: v for k, v in fields.items() if k in output_names}
                    columns_of_images = row_format.image_columns(fields, images)
                    named = {"dataset": part.dataset} if "dataset" in output_names else {}
                    good.append(
                        {schema.SAMPLE_ID: sample_id, "source_row": index, **named, **kept, **columns_of_images}
                    )
                shards.write(good)
                rejects.sort(key=lambda r: r["source_row"])
                if rejects:
                    rejects_writer.write_table(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA))
                reasons.update(r["reason"] for r in rejects)
                read += len(rows)
                accepted += len(good)
                progress.update(len(rows))
            part_entries.append(
                {
                    "meta_file": source.meta_file,
                    "sha256": file_sha256(source.meta_path()),
                    **({"dataset": part.dataset} if part.dataset else {}),
                    "first_row": first_row,
                    "rows": read - first_row,
                }
            )
    shards.close()
    rejects_writer.close()

    rejected = sum(reasons.values())
    if read != accepted + rejected or read != total:
        raise AssertionError(f"ingest lost rows: read {read} of {total}, accepted {accepted}, rejected {rejected}")
    uri = parts[0].source.uri if parts else ""
    if len(parts) == 1 and not parts[0].dataset:
        described = {"uri": uri, "meta_file": part_entries[0]["meta_file"], "sha256": part_entries[0]["sha256"]}
    else:
        described = {"uri": uri, "meta_files": part_entries}
    used_id_columns = id_columns - {None}
    manifest = {
        "schema_version": row_format.schema_version,
        "source": described,
        "counts": {"read": read, "accepted": accepted, "rejected": rejected},
        "rejects_by_reason": dict(sorted(reasons.items())),
        "invariant_read_equals_accepted_plus_rejected": True,
        "shards": shards.shards,
        "rejects_file": REJECTS_FILE,
        "settings": {
            "column_mapping": config.column_mapping,
            "id_column": next(iter(used_id_columns)) if used_id_columns else None,
            "rows_per_shard": config.rows_per_shard,
            "max_text_chars": config.max_text_chars,
            "max_image_pixels": config.max_image_pixels,
            "max_aspect_ratio": config.max_aspect_ratio,
        },
    }
    (output_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("ingest: read %d rows, accepted %d, rejected %d %s", read, accepted, rejected, dict(reasons))
    return manifest


def check_reject_budget(
    manifest: dict[str, Any], max_reject_fraction: float, where: str, reasons: dict[str, str] = REJECT_REASONS
) -> None:
    """Raises IngestQualityError with a per-reason summary if too many rows were rejected (``reasons``: codes)."""
    counts = manifest["counts"]
    if counts["read"] == 0:
        raise IngestQualityError(f"ingest read no rows: the source has no rows; nothing to train on ({where})")
    fraction = counts["rejected"] / counts["read"] if counts["read"] else 1.0
    if counts["read"] == 0 or fraction > max_reject_fraction:
        by_reason = "\n".join(
            f"  {code:<26} {n:>8}  {reasons.get(code, '')}"
            for code, n in sorted(manifest["rejects_by_reason"].items(), key=lambda kv: -kv[1])
        )
        raise IngestQualityError(
            f"ingest rejected {counts['rejected']} of {counts['read']} rows ({fraction:.1%}), "
            f"above ingest.max_reject_fraction = {max_reject_fraction:.1%}.\n"
            f"Rejects by reason:\n{by_reason or '  (the source has no rows)'}\n"
            f"Every rejected row, with its reason, is in {where}/{REJECTS_FILE}."
        )
