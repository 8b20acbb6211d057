"""A second corruption corpus: faults that once crashed, hung or silently altered a data run (issue 18).

None of these kinds is in ``tests/corrupt_corpus.py``. Row faults are
applied to copies of the sample's rows appended to the meta file, one fault
per row, each with the reason code ingestion must give it (None: the row must
be accepted unchanged). File faults turn a whole meta file into a damaged one,
with a fragment the one-line error must contain.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import shutil
import socket
import struct
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from muco_flow.data import schema

Row = dict
# (row, snapshot root, image server base URL) -> None; the fault edits the row and its files
RowFault = Callable[[Row, Path, str], None]

# the ingest settings the corpus is built for: small byte and time limits so faults show quickly
MAX_IMAGE_BYTES = 200_000
MAX_TURNS = 32
MAX_PHRASINGS = 256
DOWNLOAD = {"retries": 0, "timeout_s": 2, "deadline_s": 1.5}


def png(size=(40, 30), color=(10, 120, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


PNG = png()


def _image(row: Row, root: Path) -> Path:
    return root / row[schema.QRY_IMAGE_PATH]


# --- the image server: real HTTP on 127.0.0.1, one path per fault --------------------


class ImageHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        with suppress(BrokenPipeError, ConnectionResetError):  # the client gave up: what some faults expect
            self._answer()

    def _answer(self):
        if self.path == "/gzip.png":  # a valid image, sent compressed; Content-Length counts compressed bytes
            body = gzip.compress(PNG)
            self._head(200, len(body), {"Content-Encoding": "gzip"})
            self.wfile.write(body)
        elif self.path == "/bad-length.png":
            self._head(200, "abc")
            self.wfile.write(PNG)
        elif self.path == "/redirect-to-bad-host.png":
            self.send_response(302)
            self.send_header("Location", "http://img..example/x.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/trickle.png":  # one byte at a time, each well within the read timeout, for ever
            self._head(200, 100_000)
            for _ in range(100_000):
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(0.05)
        else:
            self._head(404, 0)

    def _head(self, status: int, length, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(length))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()


@contextmanager
def image_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- row faults -------------------------------------------------------------------------


def invalid_utf8_in_target(row: Row, root: Path, url: str) -> None:
    # CESU-8 for a surrogate: bytes Arrow stores as a string and Python refuses to decode
    row[schema.POS_TEXT] = [b"a red \xed\xa0\x80 car", *(t.encode() for t in row[schema.POS_TEXT][1:])]


def zero_width_only_target(row: Row, root: Path, url: str) -> None:
    row[schema.POS_TEXT] = ["\u200b\u200d\ufeff", *row[schema.POS_TEXT][1:]]


def zero_width_only_phrasing(row: Row, root: Path, url: str) -> None:
    row[schema.QRY][3] = ["\u2060\u200c \u3164", *row[schema.QRY][3][1:]]


def two_hundred_turns(row: Row, root: Path, url: str) -> None:
    for name in (schema.QRY, schema.POS_TEXT, schema.POS_SENTENCE, schema.NEG_TEXT):
        if row.get(name) is not None:
            row[name] = (row[name] * 30)[:200]


def turns_at_the_limit(row: Row, root: Path, url: str) -> None:
    """Valid: exactly ingest.max_turns turns must ingest and format."""
    for name in (schema.QRY, schema.POS_TEXT, schema.POS_SENTENCE, schema.NEG_TEXT):
        if row.get(name) is not None:
            row[name] = (row[name] * 5)[:MAX_TURNS]


def fifty_thousand_phrasings(row: Row, root: Path, url: str) -> None:
    row[schema.QRY][0] = [f"what is shown, take {i}?" for i in range(50_000)]


def phrasings_at_the_limit(row: Row, root: Path, url: str) -> None:
    """Valid: exactly ingest.max_phrasings_per_turn phrasings must ingest and format."""
    row[schema.QRY][1] = [f"describe it, version {i}" for i in range(MAX_PHRASINGS)]


def qry_sentence_too_long(row: Row, root: Path, url: str) -> None:
    row[schema.QRY_SENTENCE] = "a very long sentence " * 200


def id_too_long(row: Row, root: Path, url: str) -> None:
    row[schema.SAMPLE_ID] = "x" * 300


def id_with_surrounding_whitespace(row: Row, root: Path, url: str) -> None:
    row[schema.SAMPLE_ID] = "  train-000003\t"  # the same sample as row 3


def id_in_other_unicode_form(row: Row, root: Path, url: str) -> None:
    row[schema.SAMPLE_ID] = unicodedata.normalize("NFD", "café-01")  # row "café-01" precedes it, in NFC


def id_in_nfc(row: Row, root: Path, url: str) -> None:
    """Valid: the first of the two spellings of café-01."""
    row[schema.SAMPLE_ID] = unicodedata.normalize("NFC", "café-01")


def id_differing_only_in_case(row: Row, root: Path, url: str) -> None:
    """Valid: ids are case-sensitive (docs/reliability.md), so TRAIN-000004 is not train-000004."""
    row[schema.SAMPLE_ID] = "TRAIN-000004"


def id_only_whitespace(row: Row, root: Path, url: str) -> None:
    row[schema.SAMPLE_ID] = " \u200b\t"


def path_longer_than_the_limit(row: Row, root: Path, url: str) -> None:
    row[schema.QRY_IMAGE_PATH] = "images/" + "d/" * 2500 + "x.png"


def fifo_as_image(row: Row, root: Path, url: str) -> None:
    path = _image(row, root)
    path.unlink()
    os.mkfifo(path)  # reading it would wait for a writer for ever


def socket_as_image(row: Row, root: Path, url: str) -> None:
    # a short relative name: a Unix socket path is limited to 108 bytes
    path = _image(row, root)
    path.unlink()
    here = Path.cwd()
    os.chdir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path.name)  # the socket file stays after the socket closes
    finally:
        os.chdir(here)


def symlink_loop_as_image(row: Row, root: Path, url: str) -> None:
    path = _image(row, root)
    path.unlink()
    loop = path.with_name(path.stem + "-loop.png")
    path.symlink_to(loop.name)
    loop.symlink_to(path.name)


def image_over_max_bytes(row: Row, root: Path, url: str) -> None:
    # a valid PNG with bytes after its end: decodable, but more than the byte limit
    _image(row, root).write_bytes(PNG + b"\0" * (MAX_IMAGE_BYTES + 1))


def corrupt_avif(row: Row, root: Path, url: str) -> None:
    """An AVIF whose damage makes Pillow raise RuntimeError (found by a seeded search, checked here)."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buffer, "AVIF")
    original, rng = buffer.getvalue(), random.Random(0)
    for _ in range(2000):
        data = bytearray(original)
        for _ in range(3):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            Image.open(io.BytesIO(bytes(data))).load()
        except RuntimeError:
            _image(row, root).write_bytes(bytes(data))
            return
        except Exception:
            continue
    raise AssertionError("no AVIF damage made Pillow raise RuntimeError")


def dds_with_unusual_flags(row: Row, root: Path, url: str) -> None:
    """A DDS header whose pixel-format flags Pillow does not implement (NotImplementedError)."""
    header = bytearray(128)
    header[:4] = b"DDS "
    struct.pack_into("<7I", header, 4, 124, 0x1007, 4, 4, 0, 0, 0)
    struct.pack_into("<2I", header, 76, 32, 0x80000)
    _image(row, root).write_bytes(bytes(header) + bytes(64))


def _fetched_instead(row: Row, root: Path, url: str) -> None:
    _image(row, root).unlink()
    row[schema.IMAGE_URL] = url


def unparseable_url(row: Row, root: Path, url: str) -> None:
    _fetched_instead(row, root, "http://img..example/x.png")


def redirect_to_unparseable_url(row: Row, root: Path, url: str) -> None:
    _fetched_instead(row, root, f"{url}/redirect-to-bad-host.png")


def invalid_content_length(row: Row, root: Path, url: str) -> None:
    _fetched_instead(row, root, f"{url}/bad-length.png")


def trickling_download(row: Row, root: Path, url: str) -> None:
    _fetched_instead(row, root, f"{url}/trickle.png")


def gzip_encoded_download(row: Row, root: Path, url: str) -> None:
    """Valid: a compressed transfer of a valid image is that image."""
    _fetched_instead(row, root, f"{url}/gzip.png")


ROW_FAULTS: dict[RowFault, str | None] = {
    invalid_utf8_in_target: "UNDECODABLE_VALUE",
    zero_width_only_target: "EMPTY_TEXT",
    zero_width_only_phrasing: "EMPTY_TEXT",
    two_hundred_turns: "TOO_MANY_TURNS",
    turns_at_the_limit: None,
    fifty_thousand_phrasings: "TOO_MANY_PHRASINGS",
    phrasings_at_the_limit: None,
    qry_sentence_too_long: "TEXT_TOO_LONG",
    id_too_long: "TEXT_TOO_LONG",
    id_with_surrounding_whitespace: "DUPLICATE_ID",
    id_in_nfc: None,
    id_in_other_unicode_form: "DUPLICATE_ID",
    id_differing_only_in_case: None,
    id_only_whitespace: "MISSING_FIELD",
    path_longer_than_the_limit: "TEXT_TOO_LONG",
    fifo_as_image: "IMAGE_NOT_A_FILE",
    socket_as_image: "IMAGE_NOT_A_FILE",
    symlink_loop_as_image: "IMAGE_NOT_A_FILE",
    image_over_max_bytes: "IMAGE_TOO_LARGE",
    corrupt_avif: "IMAGE_UNDECODABLE",
    dds_with_unusual_flags: "IMAGE_UNDECODABLE",
    unparseable_url: "DOWNLOAD_FAILED",
    redirect_to_unparseable_url: "DOWNLOAD_FAILED",
    invalid_content_length: "DOWNLOAD_FAILED",
    trickling_download: "DOWNLOAD_FAILED",
    gzip_encoded_download: None,
}


def faulty_snapshot(source_root: Path, target_root: Path, url: str) -> dict[int, str | None]:
    """Copies the snapshot and appends one copy of a sample row per row fault, with its own image file.

    Returns {row index: expected reason}; the original rows keep reason None.
    """
    shutil.copytree(source_root, target_root)
    meta = target_root / schema.TRAIN_META_FILE
    # the published columns, plus the optional id (the id faults need it) and image URL
    rows = [{**row, schema.SAMPLE_ID: f"train-{i:06d}"} for i, row in enumerate(pq.read_table(meta).to_pylist())]
    originals = len(rows)
    expected: dict[int, str | None] = dict.fromkeys(range(originals))
    for n, (fault, reason) in enumerate(ROW_FAULTS.items()):
        row = {**rows[n % originals], schema.SAMPLE_ID: f"fault-{n:03d}"}
        row[schema.QRY] = [list(p) for p in row[schema.QRY]]
        image = f"images/fault-{n:03d}.png"
        shutil.copy(target_root / row[schema.QRY_IMAGE_PATH], target_root / image)
        row[schema.QRY_IMAGE_PATH] = image
        fault(row, target_root, url)
        expected[len(rows)] = reason
        rows.append(row)
    _write_meta(rows, meta)
    return expected


def _write_meta(rows: list[Row], meta: Path) -> None:
    """Writes rows whose strings may be bytes (invalid UTF-8) as string columns, unvalidated."""
    columns = {}
    optional = [pa.field(schema.SAMPLE_ID, pa.string()), pa.field(schema.IMAGE_URL, pa.string())]
    for field in [*schema.M3T_ARROW_SCHEMA, *optional]:
        values = [row.get(field.name) for row in rows]
        binary_type = _as_binary(field.type)
        encoded = [_encode(v) for v in values]
        columns[field.name] = pa.array(encoded, binary_type).view(field.type)
    pq.write_table(pa.table(columns), meta)


def _as_binary(t: pa.DataType) -> pa.DataType:
    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_list(t):
        return pa.list_(_as_binary(t.value_type))
    return t


def _encode(value):
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


# --- file faults: meta file bytes -> damaged bytes -----------------------------------------


def _table_bytes(table: pa.Table, **kwargs) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **kwargs)
    return sink.getvalue()


def truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def csv_renamed(data: bytes) -> bytes:
    return pq.read_table(io.BytesIO(data)).to_pandas().head(3).to_csv(index=False).encode()


def zero_bytes(data: bytes) -> bytes:
    return b""


def two_files_joined(data: bytes) -> bytes:
    table = pq.read_table(io.BytesIO(data))
    return _table_bytes(table.slice(0, 5)) + data


def corrupt_second_row_group(data: bytes) -> bytes:
    table = pq.read_table(io.BytesIO(data))
    clean = _table_bytes(table, row_group_size=table.num_rows // 2)
    metadata = pq.ParquetFile(io.BytesIO(clean)).metadata
    start = metadata.row_group(1).column(1).data_page_offset
    damaged = bytearray(clean)
    damaged[start + 4 : start + 40] = b"\xff" * 36
    return bytes(damaged)


def bit_flip_under_page_checksum(data: bytes) -> bytes:
    """A page of a file that carries page checksums, with one text's case flipped ("The" -> "the")."""
    table = pq.read_table(io.BytesIO(data))
    first = table.column(schema.POS_TEXT)[0][0].as_py()
    clean = _table_bytes(table, write_page_checksum=True, compression="none", use_dictionary=False)
    at = clean.index(first.encode())
    damaged = bytearray(clean)
    damaged[at] ^= 0x20
    return bytes(damaged)


def duplicate_column(data: bytes) -> bytes:
    table = pq.read_table(io.BytesIO(data))
    qry = table.column(schema.QRY)
    other = pa.array([[["what is this?"]] * 7] * table.num_rows, qry.type)
    return _table_bytes(table.append_column(schema.QRY, other))


def no_rows(data: bytes) -> bytes:
    return _table_bytes(pq.read_table(io.BytesIO(data)).slice(0, 0))


def missing_column(data: bytes) -> bytes:
    return _table_bytes(pq.read_table(io.BytesIO(data)).drop_columns([schema.POS_TEXT]))


# fault -> a fragment the one-line error must contain
FILE_FAULTS: dict[Callable[[bytes], bytes], str] = {
    truncated: "not a parquet file",
    csv_renamed: "not a parquet file",
    zero_bytes: "the file is empty (0 bytes)",
    two_files_joined: "two parquet files joined",
    corrupt_second_row_group: "a corrupt row group or page",
    bit_flip_under_page_checksum: "CRC checksum verification failed",
    duplicate_column: "column names ['qry'] appear more than once",
    no_rows: "the meta file has no rows",
    missing_column: "no column 'pos_text'",
}
