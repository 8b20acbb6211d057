"""The ingest engine: meta files in, validated parquet shards with embedded images out.

A format's rules (``m3t_ingest.py``: M3T, ``mmeb_train_ingest.py``:
MMEB-train) come as a ``RowFormat``: the columns it needs, how a row is
checked, which images it names and what a shard row holds. This module runs
them: it reads the rows, loads and checks the images, and writes the shards,
the rejects, the manifest, and checks the reject budget.

The meta file is streamed in batches of rows, so memory stays flat however
many rows there are (only the set of seen sample ids grows, a few bytes per
row). Every row read ends either in a shard or in ``rejects.parquet`` with a
reason code; the manifest checks read = accepted + rejected.

The source's rows are cut into blocks of ``rows_per_shard``; block b becomes
``shards/part-<b>.parquet``. Blocks are independent units of work: a part
(``ingest_part``; ``m3t_ingest.ingest_m3t_part``: a SLURM array task or a torchrun node) ingests every
``num_parts``-th block on ``num_workers`` processes, and the merge
(``merge_ingest_parts``) turns ids an earlier block claimed into
``DUPLICATE_ID`` rejects and writes the one manifest, so the files do not
depend on how the work was split.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
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
from muco_flow.data.parallel import check_part, map_in_processes, part_stem, worker_state
from muco_flow.data.row_checks import (
    Reject,
    check_limit_settings,
    check_row_limits,
    internal_error,
    is_missing,
    normalise_sample_id,
)
from muco_flow.data.sources import (
    ImageMissingError,
    ImageUnreadableError,
    LocalSnapshot,
    SnapshotSource,
    SourceError,
    file_sha256,
)
from muco_flow.modeling import tokens

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"
REJECTS_FILE = "rejects.parquet"
MANIFEST_FILE = "manifest.json"

# The codes any format's rows may get: the engine's (ids, values, images) and those of the shared row checks
# (row_checks.py). A format adds its own (m3t_ingest.REJECT_REASONS_M3T, mmeb_train_ingest.REJECT_REASONS_MMEB_TRAIN).
COMMON_REJECT_REASONS = {
    "MISSING_FIELD": "a required field is null or NaN",
    "WRONG_TYPE": "a field has the wrong type (for example a number where text belongs)",
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
    "INTERNAL_ERROR": "a check failed in a way nobody foresaw (the message names the exception); please report it",
}

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
    # processes that ingest blocks of rows_per_shard rows side by side (about one per core)
    num_workers: int = 1
    download: FetchConfig = field(default_factory=FetchConfig)

    def __post_init__(self) -> None:
        if min(self.rows_per_shard, self.batch_rows, self.image_workers, self.num_workers) < 1:
            raise ValueError("ingest: rows_per_shard, batch_rows, image_workers and num_workers must be at least 1")
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


def derived_sample_id(index: int, row: dict[str, Any], content_columns: Sequence[str]) -> str:
    """An id for a row of a file without an id column: its position and a hash of its ``content_columns``.

    The position keeps ids unique; the hash makes an id name one content, so a
    reordered or edited snapshot does not silently reuse ids for other samples.
    """
    content = json.dumps([row.get(column) for column in content_columns], default=str, ensure_ascii=False)
    return f"{index:09d}-{hashlib.blake2b(content.encode(), digest_size=6).hexdigest()}"


def sample_id_of(
    row: dict[str, Any], index: int, config: IngestConfig, has_id_column: bool, content_columns: Sequence[str]
) -> str:
    """The row's id column, else the id derived from its position and ``content_columns``; Reject if unusable."""
    if not has_id_column:
        return derived_sample_id(index, row, content_columns)
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
    a path is "") into the shard row's image columns. ``id_content_columns``
    are what identifies a sample in a file without an id column (hashed into
    its derived id).
    """

    schema_version: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    output_schema: pa.Schema
    validate: Callable[[dict[str, Any], IngestConfig], dict[str, Any]]
    image_paths: Callable[[dict[str, Any]], list[tuple[str, str]]]
    image_columns: Callable[[dict[str, Any], list[CheckedImage | None]], dict[str, Any]]
    id_content_columns: tuple[str, ...]
    # for the layout-independent limits (row_checks.check_row_limits): the
    # field holding turns of phrasings (None: no turns), and the path/URL fields
    turns_field: str | None = None
    path_fields: tuple[str, ...] = ()


def check_row(
    row: dict[str, Any], position: int, prefix: str, config: IngestConfig, has_id_column: bool, row_format: RowFormat
) -> tuple[str, dict[str, Any]]:
    """The row's normalised sample id and validated fields, or Reject; layout-independent limits included.

    ``position`` is the row's index in its own file, ``prefix`` names the file's dataset (MMEB-train).
    """
    own_id = sample_id_of(row, position, config, has_id_column, row_format.id_content_columns)
    sample_id = normalise_sample_id(prefix + own_id, config.max_id_chars)
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


# --- one run as parts: blocks of source rows, merged into one manifest -------

PARTS_DIR = "parts"


def shard_name(block: int) -> str:
    """The shard of block ``block``: the accepted rows of ``rows_per_shard`` consecutive rows of one meta file."""
    return f"{SHARDS_DIR}/part-{block:05d}.parquet"


def part_name(part_index: int, num_parts: int) -> str:
    """The summary of one part, relative to the output directory (``.json``, ``.rejects.parquet``)."""
    return f"{PARTS_DIR}/{part_stem(part_index, num_parts)}"


@dataclass(frozen=True)
class _Segment:
    """Rows ``start`` .. ``stop - 1`` of meta file ``meta``, whose row 0 is source row ``first_row``."""

    meta: int
    start: int
    stop: int
    first_row: int


@dataclass(frozen=True)
class _Block:
    """Source rows ``index * rows_per_shard`` onwards, as the pieces of the meta files holding them."""

    index: int
    segments: tuple[_Segment, ...]


def _blocks(row_counts: Sequence[int], rows_per_shard: int) -> list[_Block]:
    """The source rows (the meta files' rows in their order) cut into blocks of ``rows_per_shard``."""
    first_rows = list(itertools.accumulate([0, *row_counts]))
    blocks = []
    for index, start in enumerate(range(0, first_rows[-1], rows_per_shard)):
        stop = min(start + rows_per_shard, first_rows[-1])
        segments = tuple(
            _Segment(meta, max(start, first) - first, min(stop, first + rows) - first, first)
            for meta, (rows, first) in enumerate(zip(row_counts, first_rows, strict=False))
            if first < stop and first + rows > start
        )
        blocks.append(_Block(index, segments))
    return blocks


@dataclass
class _BlockResult:
    block: int
    shard: dict[str, Any] | None  # None: every row of the block was rejected
    rejects: list[dict[str, Any]]
    # source rows rejected after their id was claimed (an image check): an earlier
    # block's claim on the id turns them into DUPLICATE_ID at the merge
    claimed_rejects: list[int]
    read: int


def _row_groups_of(meta: pq.ParquetFile, start: int, stop: int) -> tuple[list[int], int]:
    """The row groups holding rows ``start`` .. ``stop - 1``, and the first one's first row."""
    groups: list[int] = []
    first = row = 0
    for g in range(meta.num_row_groups):
        rows = meta.metadata.row_group(g).num_rows
        if row < stop and row + rows > start:
            first = row if not groups else first
            groups.append(g)
        row += rows
    return groups, first


def _duplicate_id(sample_id: str) -> Reject:
    return Reject("DUPLICATE_ID", f"sample id '{sample_id}' appeared earlier in the file")


def _ingest_block(
    parts: Sequence[MetaPart],
    labels: Sequence[str],
    block: _Block,
    output_dir: Path,
    config: IngestConfig,
    row_format: RowFormat,
    session: requests.Session,
    pool: ThreadPoolExecutor,
) -> _BlockResult:
    """The rows of one block checked into its shard; ids repeated within the block are rejected here, across blocks
    by the merge."""
    output_names = set(row_format.output_schema.names)
    seen_ids: set[bytes] = set()  # 16-byte digests: memory per row stays small
    rejects: list[dict[str, Any]] = []
    claimed_rejects: list[int] = []
    read = accepted = 0
    path = output_dir / shard_name(block.index)
    writer: pq.ParquetWriter | None = None

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

    for segment in block.segments:
        part, label = parts[segment.meta], labels[segment.meta]
        source = part.source
        meta = open_parquet(source.meta_path(), label)
        wanted = _columns_to_read(meta, config, row_format)
        has_id_column = schema.SAMPLE_ID in wanted
        prefix = f"{part.dataset}/" if part.dataset else ""
        columns = [config.source_column(c) for c in wanted]
        groups, row = _row_groups_of(meta, segment.start, segment.stop)
        batches = iter_batches(meta, label, batch_size=config.batch_rows, columns=columns, row_groups=groups)
        for batch in batches if groups else []:
            # the row groups may reach beyond the block on either side
            skip, take = max(0, segment.start - row), max(0, min(batch.num_rows, segment.stop - row))
            batch_first, row = row, row + batch.num_rows
            if take <= skip:
                continue
            rows = _map_columns(batch.slice(skip, take - skip), config, wanted)
            batch_rejects: list[dict[str, Any]] = []
            candidates: list[tuple[int, str, dict[str, Any]]] = []
            for offset, source_row in enumerate(rows):
                position = batch_first + skip + offset  # the row's index in its own file
                index = segment.first_row + position
                sample_id = None
                try:
                    if isinstance(source_row, UndecodableRow):
                        raise Reject("UNDECODABLE_VALUE", source_row.message)
                    sample_id, fields = check_row(source_row, position, prefix, config, has_id_column, row_format)
                    digest = hashlib.blake2b(sample_id.encode(), digest_size=16).digest()
                    if digest in seen_ids:
                        raise _duplicate_id(sample_id)
                    seen_ids.add(digest)
                    candidates.append((index, sample_id, fields))
                except Reject as reject:
                    batch_rejects.append(_reject_record(index, sample_id, reject))
                except Exception as err:  # no row ends the run
                    batch_rejects.append(_reject_record(index, sample_id, internal_error(err)))

            good: list[dict[str, Any]] = []
            for (index, sample_id, fields), images in zip(
                candidates, pool.map(partial(images_of, source), candidates), strict=True
            ):
                if isinstance(images, Reject):
                    batch_rejects.append(_reject_record(index, sample_id, images))
                    claimed_rejects.append(index)
                    continue
                kept = {k: v for k, v in fields.items() if k in output_names}
                columns_of_images = row_format.image_columns(fields, images)
                named = {"dataset": part.dataset} if "dataset" in output_names else {}
                good.append({schema.SAMPLE_ID: sample_id, "source_row": index, **named, **kept, **columns_of_images})
            if good:
                if writer is None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    writer = pq.ParquetWriter(
                        path, row_format.output_schema, compression="zstd", write_page_checksum=True
                    )
                writer.write_table(pa.Table.from_pylist(good, schema=row_format.output_schema))
            rejects.extend(batch_rejects)
            read += len(rows)
            accepted += len(good)
    shard = None
    if writer is not None:
        writer.close()
        shard = {"file": shard_name(block.index), "rows": accepted, "sha256": file_sha256(path)}
    rejects.sort(key=lambda r: r["source_row"])
    return _BlockResult(block.index, shard, rejects, sorted(claimed_rejects), read)


def _ingest_block_in_worker(block: _Block) -> _BlockResult:
    state = worker_state()
    config: IngestConfig = state["config"]
    with requests.Session() as session, ThreadPoolExecutor(config.image_workers) as pool:
        parts, labels = state["parts"], state["labels"]
        return _ingest_block(parts, labels, block, state["output_dir"], config, state["row_format"], session, pool)


def _forks_safely(source: SnapshotSource) -> bool:
    """Whether forked processes may share ``source``: a local one only. An S3 client's pooled connections
    would be shared by the processes, their requests mixed on one socket."""
    return isinstance(source, LocalSnapshot)


def ingest_part(
    parts: Sequence[MetaPart],
    output_dir: Path,
    config: IngestConfig,
    row_format: RowFormat,
    part_index: int = 0,
    num_parts: int = 1,
) -> dict[str, Any]:
    """One part of an ingest split over ``num_parts``: its blocks' shards, its rejects and a summary.

    Each meta file's rows are cut into blocks of ``rows_per_shard`` rows,
    numbered across the files; block b becomes shard ``part-b`` and belongs to
    part ``b % num_parts``. Within a part, ``config.num_workers`` processes
    take the blocks (one, for a source that cannot be shared by forked
    processes: S3). A shard depends only on its block, so any split gives the
    same files.
    """
    check_part("ingest", part_index, num_parts)
    output_dir = Path(output_dir)
    labels = [f"{part.source.uri.rstrip('/')}/{part.source.meta_file}" for part in parts]
    metas = [open_parquet(part.source.meta_path(), label) for part, label in zip(parts, labels, strict=True)]
    row_counts = [meta.metadata.num_rows for meta in metas]
    total = sum(row_counts)
    if total == 0:
        raise MetaFileError(f"{', '.join(labels)}: the meta file has no rows (columns {metas[0].schema_arrow.names})")
    id_columns: list[str | None] = []
    for meta, label in zip(metas, labels, strict=True):
        try:  # a setup error fails here, before any worker starts
            wanted = _columns_to_read(meta, config, row_format)
        except ValueError as err:
            raise MetaFileError(f"{label}: {err}") from None
        has_id_column = schema.SAMPLE_ID in wanted
        id_columns.append(config.id_column if has_id_column else None)
        if not has_id_column and part_index == 0:
            logger.info(
                "ingest: %s has no id column%s; each id is the row's position and a hash of its content",
                label,
                f" '{config.id_column}'" if config.id_column else "",
            )
    all_blocks = _blocks(row_counts, config.rows_per_shard)
    blocks = all_blocks[part_index::num_parts]
    workers = config.num_workers
    if workers > 1 and not all(_forks_safely(part.source) for part in parts):
        logger.info("ingest: %s is not a local snapshot; its blocks run on one process", labels[0])
        workers = 1
    (output_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    (output_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    state = {"parts": parts, "labels": labels, "output_dir": output_dir, "config": config, "row_format": row_format}
    results: list[_BlockResult] = []
    with tqdm(
        total=sum(s.stop - s.start for b in blocks for s in b.segments), desc="ingest", unit="row", disable=total < 2000
    ) as progress:
        for result in map_in_processes(_ingest_block_in_worker, blocks, workers, state):
            results.append(result)
            progress.update(result.read)

    name = part_name(part_index, num_parts)
    _write_rejects(output_dir / f"{name}.rejects.parquet", [r for result in results for r in result.rejects])
    meta_files = []
    for part, rows, first_row in zip(parts, row_counts, itertools.accumulate([0, *row_counts]), strict=False):
        meta_files.append(
            {
                "meta_file": part.source.meta_file,
                "sha256": file_sha256(part.source.meta_path()),
                **({"dataset": part.dataset} if part.dataset else {}),
                "first_row": first_row,
                "rows": rows,
            }
        )
    if len(parts) == 1 and not parts[0].dataset:
        described = {
            "uri": parts[0].source.uri,
            "meta_file": meta_files[0]["meta_file"],
            "sha256": meta_files[0]["sha256"],
        }
    else:
        described = {"uri": parts[0].source.uri, "meta_files": meta_files}
    used_id_columns = [c for c in id_columns if c is not None]
    summary = {
        "part_index": part_index,
        "num_parts": num_parts,
        "schema_version": row_format.schema_version,
        "source": described,
        "total_rows": total,
        "num_blocks": len(all_blocks),
        "settings": {
            "column_mapping": config.column_mapping,
            "id_column": used_id_columns[0] if used_id_columns else None,
            "rows_per_shard": config.rows_per_shard,
            "max_text_chars": config.max_text_chars,
            "max_image_pixels": config.max_image_pixels,
            "max_aspect_ratio": config.max_aspect_ratio,
        },
        "blocks": [r.block for r in results],
        "read": sum(r.read for r in results),
        "shards": [r.shard for r in results if r.shard],
        "claimed_rejects": {str(r.block): r.claimed_rejects for r in results if r.claimed_rejects},
        "rejects_file": f"{name}.rejects.parquet",
    }
    (output_dir / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_rejects(path: Path, rejects: list[dict[str, Any]]) -> None:
    with pq.ParquetWriter(path, REJECTS_SCHEMA, compression="zstd", write_page_checksum=True) as writer:
        if rejects:
            writer.write_table(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA))


def merge_ingest_parts(output_dir: Path, num_parts: int) -> dict[str, Any]:
    """The manifest of an ingest run as ``num_parts`` parts, once all are done.

    Checks that every part is there and that they ingested the same source
    with the same settings, covering every block once; rejects an id that an
    earlier block claimed (DUPLICATE_ID, as one process would have), rewriting
    the few shards that held one; conserves the counts: every source row is
    accepted or rejected, exactly once.
    """
    output_dir = Path(output_dir)
    if num_parts < 1:
        raise ValueError(f"ingest merge: num_parts must be at least 1, got {num_parts}")
    summaries = []
    for index in range(num_parts):
        path = output_dir / f"{part_name(index, num_parts)}.json"
        if not path.exists():
            found = (
                sorted(p.name for p in (output_dir / PARTS_DIR).glob("*.json"))
                if (output_dir / PARTS_DIR).is_dir()
                else []
            )
            raise FileNotFoundError(
                f"ingest part {index} of {num_parts} has not finished: no {path} "
                f"(found {found or 'no part summaries'}); run that part, or merge with the num_parts the parts ran with"
            )
        summaries.append(json.loads(path.read_text()))
    first = summaries[0]
    for summary in summaries[1:]:
        for key in ("source", "settings", "total_rows", "num_blocks", "schema_version"):
            if summary[key] != first[key]:
                raise ValueError(
                    f"ingest part {summary['part_index']} has another {key} than part 0 "
                    f"({summary[key]} against {first[key]}); re-run every part with the same source and settings"
                )
    blocks = sorted(b for s in summaries for b in s["blocks"])
    if blocks != list(range(first["num_blocks"])):
        raise ValueError(f"the {num_parts} parts cover blocks {blocks}, not each of 0..{first['num_blocks'] - 1} once")
    shards = sorted((dict(shard) for s in summaries for shard in s["shards"]), key=lambda shard: shard["file"])
    rejects = [r for s in summaries for r in pq.read_table(output_dir / s["rejects_file"]).to_pylist()]
    claimed = {int(b): rows for s in summaries for b, rows in s["claimed_rejects"].items()}
    _reject_duplicates_across_blocks(output_dir, shards, rejects, claimed)
    rejects.sort(key=lambda r: r["source_row"])
    shards = [shard for shard in shards if shard["rows"]]
    _write_rejects(output_dir / REJECTS_FILE, rejects)
    read = sum(s["read"] for s in summaries)
    accepted = sum(shard["rows"] for shard in shards)
    if read != accepted + len(rejects) or read != first["total_rows"]:
        raise AssertionError(
            f"ingest lost rows: read {read} of {first['total_rows']}, accepted {accepted}, rejected {len(rejects)}"
        )
    reasons = Counter(r["reason"] for r in rejects)
    manifest = {
        "schema_version": first["schema_version"],
        "source": first["source"],
        "counts": {"read": read, "accepted": accepted, "rejected": len(rejects)},
        "rejects_by_reason": dict(sorted(reasons.items())),
        "invariant_read_equals_accepted_plus_rejected": True,
        "shards": shards,
        "rejects_file": REJECTS_FILE,
        "settings": first["settings"],
    }
    (output_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    for summary in summaries:
        (output_dir / summary["rejects_file"]).unlink()
        (output_dir / f"{part_name(summary['part_index'], num_parts)}.json").unlink()
    if not any((output_dir / PARTS_DIR).iterdir()):
        (output_dir / PARTS_DIR).rmdir()
    logger.info("ingest: read %d rows, accepted %d, rejected %d %s", read, accepted, len(rejects), dict(reasons))
    return manifest


def _reject_duplicates_across_blocks(
    output_dir: Path, shards: list[dict[str, Any]], rejects: list[dict[str, Any]], claimed: dict[int, list[int]]
) -> None:
    """Rows whose id an earlier block claimed become DUPLICATE_ID rejects, as in one pass over the file.

    A block claims the ids of its accepted rows and of its rows rejected for an
    image. A later block's accepted row with such an id leaves its shard
    (``shards`` entries updated in place, rows 0 for an emptied shard), and a
    later image reject with such an id changes its reason, as one pass would
    have stopped at the id.
    """
    by_row = {r["source_row"]: r for r in rejects}
    by_block: dict[int, dict[str, Any]] = {int(s["file"].rsplit("-", 1)[1].split(".")[0]): s for s in shards}
    seen: set[bytes] = set()
    duplicates: dict[int, set[int]] = {}  # block -> source rows to drop from its shard
    for block in sorted(set(by_block) | set(claimed)):
        claims: list[tuple[int, str]] = [(row, by_row[row][schema.SAMPLE_ID]) for row in claimed.get(block, [])]
        shard = by_block.get(block)
        if shard:
            table = pq.read_table(output_dir / shard["file"], columns=[schema.SAMPLE_ID, "source_row"])
            claims += zip(table.column(1).to_pylist(), table.column(0).to_pylist(), strict=True)
        digests = []
        for row, sample_id in sorted(claims):
            digest = hashlib.blake2b(sample_id.encode(), digest_size=16).digest()
            if digest not in seen:
                digests.append(digest)
                continue
            if row in by_row:
                by_row[row].update(_reject_record(row, sample_id, _duplicate_id(sample_id)))
            else:
                duplicates.setdefault(block, set()).add(row)
                rejects.append(_reject_record(row, sample_id, _duplicate_id(sample_id)))
        seen.update(digests)
    for block, rows in duplicates.items():
        _drop_rows(output_dir, by_block[block], rows)


def _drop_rows(output_dir: Path, shard: dict[str, Any], rows: set[int]) -> None:
    """``rows`` (source rows) removed from ``shard``, row group by row group so the groups stay as written."""
    path = output_dir / shard["file"]
    parquet = pq.ParquetFile(path)
    kept_tables = []
    for g in range(parquet.num_row_groups):
        table = parquet.read_row_group(g)
        keep = pa.array([row not in rows for row in table.column("source_row").to_pylist()])
        kept_tables.append(table.filter(keep))
    kept = sum(t.num_rows for t in kept_tables)
    if not kept:
        path.unlink()
        shard["rows"] = 0
        return
    rewritten = path.with_name(path.name + ".partial")
    with pq.ParquetWriter(rewritten, parquet.schema_arrow, compression="zstd", write_page_checksum=True) as writer:
        for table in kept_tables:
            if table.num_rows:
                writer.write_table(table)
    rewritten.replace(path)
    shard.update(rows=kept, sha256=file_sha256(path))


def ingest_snapshot(
    parts: Sequence[MetaPart], output_dir: Path, config: IngestConfig, row_format: RowFormat
) -> dict[str, Any]:
    """Validates every row of every part in ``row_format`` and writes shards, rejects and a manifest.

    ``source_row`` counts rows across the parts in their order; the manifest
    gives each part's first row. One part of one (``ingest_part``), merged.
    """
    ingest_part(parts, output_dir, config, row_format)
    return merge_ingest_parts(output_dir, 1)


def check_reject_budget(
    manifest: dict[str, Any], max_reject_fraction: float, where: str, reasons: dict[str, str] = COMMON_REJECT_REASONS
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


def checked_manifest(shards_dir: str | Path, max_reject_fraction: float, reasons: dict[str, str]) -> dict[str, Any]:
    """The manifest of the ingest run in ``shards_dir``; IngestQualityError if too many rows were rejected."""
    manifest: dict[str, Any] = json.loads((Path(shards_dir) / MANIFEST_FILE).read_text())
    check_reject_budget(manifest, max_reject_fraction, where=str(shards_dir), reasons=reasons)
    return manifest
