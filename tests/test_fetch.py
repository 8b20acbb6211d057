"""Image downloads against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image

from muco_flow.data import schema
from muco_flow.data.fetch import FetchConfig, FetchError, fetch_url, fetch_urls
from muco_flow.data.ingest import IngestConfig
from muco_flow.data.m3t_ingest import ingest_m3t_snapshot
from muco_flow.data.sources import LocalSnapshot


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 10)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = png()


class Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, content_type: str = "image/png", length: int | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError):  # the client gave up (timeout tests)
            self.wfile.write(body)

    def do_GET(self):
        Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
        if self.path.startswith("/images/"):  # the sample's layout: any image path
            self._send(200, PNG)
        elif self.path == "/flaky.png":  # two 503s, then the image
            self._send(503, b"busy", "text/plain") if Handler.hits[self.path] <= 2 else self._send(200, PNG)
        elif self.path == "/throttled.png":  # a 429 that says when to come back, then the image
            if Handler.hits[self.path] == 1:
                self.send_response(429)
                self.send_header("Retry-After", "7")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._send(200, PNG)
        elif self.path == "/slow.png":
            time.sleep(1.5)
            self._send(200, PNG)
        elif self.path == "/page.html":
            self._send(200, b"<html></html>", "text/html")
        elif self.path == "/huge.png":
            self._send(200, PNG * 10)
        elif self.path == "/short.png":  # declares more than it sends, then closes
            self._send(200, PNG[:100], length=len(PNG))
        elif self.path == "/gone.png":
            self._send(404, b"no", "text/plain")
        else:
            self._send(500, b"?", "text/plain")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


CONFIG = FetchConfig(
    max_workers=4, timeout_s=0.5, retries=2, backoff_s=0.01, backoff_jitter_s=0.0, max_bytes=len(PNG) * 2
)


def test_fetches_concurrently_and_keeps_order(server):
    urls = [f"{server}/images/{i}.png" for i in range(12)] + [f"{server}/gone.png"]
    results = fetch_urls(urls, CONFIG)
    assert results[:12] == [PNG] * 12
    assert isinstance(results[12], FetchError) and "HTTP 404 (after 1 tries)" in str(results[12])


def test_transient_errors_are_retried_with_backoff(server):
    waits: list[float] = []
    with requests.Session() as session:
        assert fetch_url(session, f"{server}/flaky.png", CONFIG, sleep=waits.append) == PNG
    assert waits == [0.0, 0.02]  # urllib3's backoff: the first retry at once, then backoff_s * 2, * 4...


def test_the_backoff_has_jitter_within_its_bound(server):
    jittery = FetchConfig(timeout_s=0.5, retries=3, backoff_s=0.01, backoff_jitter_s=0.5)
    waits: list[float] = []
    with requests.Session() as session, pytest.raises(FetchError, match=r"HTTP 500 \(after 4 tries\)"):
        fetch_url(session, f"{server}/error.png", jittery, sleep=waits.append)
    assert waits[0] == 0.0
    assert 0.02 <= waits[1] <= 0.02 + 0.5 and 0.04 <= waits[2] <= 0.04 + 0.5
    assert waits[1:] != [0.02, 0.04]  # jittered (the chance of drawing exactly 0 twice is nil)


def test_a_servers_retry_after_is_respected_up_to_the_longest_wait(server):
    waits: list[float] = []
    with requests.Session() as session:
        assert fetch_url(session, f"{server}/throttled.png", CONFIG, sleep=waits.append) == PNG
    assert waits == [7.0]  # what the server asked for, not the backoff's 0
    Handler.hits.pop("/throttled.png")
    capped = FetchConfig(timeout_s=0.5, retries=2, max_backoff_s=3)
    with requests.Session() as session:
        assert fetch_url(session, f"{server}/throttled.png", capped, sleep=waits.append) == PNG
    assert waits == [7.0, 3.0]


@pytest.mark.parametrize(
    "path, message",
    [
        ("/slow.png", "ReadTimeout (after 3 tries)"),
        ("/page.html", "content type 'text/html' is not an image"),
        ("/huge.png", "exceeds the limit"),
        ("/short.png", "after 3 tries"),
    ],
)
def test_bad_responses_fail_with_a_reason(server, path, message):
    with requests.Session() as session, pytest.raises(FetchError, match=re.escape(message)):
        fetch_url(session, f"{server}{path}", CONFIG, sleep=lambda _: None)


def test_only_http_urls_are_fetched():
    with requests.Session() as session, pytest.raises(FetchError, match="unsupported URL scheme"):
        fetch_url(session, "file:///etc/passwd", CONFIG)


def test_ingest_downloads_images_missing_on_disk(small_sample_root, tmp_path, server):
    import shutil

    root = tmp_path / "snapshot"
    shutil.copytree(small_sample_root, root)
    table = pq.read_table(root / schema.TRAIN_META_FILE)
    urls = [f"{server}/{p}" for p in table.column(schema.QRY_IMAGE_PATH).to_pylist()]
    table = table.append_column(schema.IMAGE_URL, pa.array(urls))  # an optional column of our own
    pq.write_table(table, root / schema.TRAIN_META_FILE)
    shutil.rmtree(root / "images" / "train")  # every training image now has to come over HTTP
    out = tmp_path / "out"
    out.mkdir()
    manifest = ingest_m3t_snapshot(LocalSnapshot(root, schema.TRAIN_META_FILE), out, IngestConfig())
    assert manifest["counts"] == {"read": 24, "accepted": 24, "rejected": 0}
    stored = pq.read_table(out / manifest["shards"][0]["file"]).column("image_bytes").to_pylist()
    assert stored == [PNG] * 24
