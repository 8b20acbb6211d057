"""A real S3-protocol server (moto_server) on 127.0.0.1, and a proxy that injects faults, for integration tests."""

from __future__ import annotations

import contextlib
import http.client
import socket
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

from tests.servers import background_server, free_port

# Recognisable fake credentials: tests assert they never appear in outputs.
ACCESS_KEY = "AKIAMUCOFLOWTESTKEY1"
SECRET_KEY = "muco-flow-test-SECRET-do-not-log-4f9a2c"


@contextmanager
def moto_server() -> Iterator[str]:
    """Starts moto_server on a free loopback port; yields its endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)]
    with background_server(command, endpoint, timeout_s=30):
        yield endpoint


def s3_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }


def s3_client_for(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )


def upload_tree(client, root: Path, bucket: str, prefix: str) -> int:
    client.create_bucket(Bucket=bucket)
    count = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")
            count += 1
    return count


# --- fault injection ----------------------------------------------------------

INJECTED_ERRORS = {
    500: "InternalError",
    503: "SlowDown",
    403: "AccessDenied",
}


@dataclass(frozen=True)
class Fault:
    """What the proxy does to one request instead of passing it through.

    - ``status``: answers ``status`` with an S3 XML error ``code`` (default: S3's code for it);
    - ``reset``: closes the connection without an answer;
    - ``truncate``: forwards the headers (full Content-Length) but only half the body, then closes;
    - ``shrink``: forwards half the body with a Content-Length that matches it (only a checksum can tell).
    """

    kind: str
    status: int = 503
    code: str | None = None


class FaultyS3Proxy:
    """A loopback HTTP proxy in front of an S3 endpoint that injects faults into chosen GETs.

    ``inject(fragment, *faults)`` queues faults for GET requests whose path
    contains ``fragment``: one per request, in order; later requests pass
    through. ``always(fragment, fault)`` applies a fault to every such
    request. ``gets(fragment)`` counts the GETs that reached the proxy.
    """

    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self._upstream = (parsed.hostname, parsed.port)
        self._lock = threading.Lock()
        self._queued: dict[str, list[Fault]] = {}
        self._always: dict[str, Fault] = {}
        self.requests: Counter[str] = Counter()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def inject(self, fragment: str, *faults: Fault) -> None:
        with self._lock:
            self._queued.setdefault(fragment, []).extend(faults)

    def always(self, fragment: str, fault: Fault) -> None:
        with self._lock:
            self._always[fragment] = fault

    def gets(self, fragment: str) -> int:
        with self._lock:
            return sum(n for path, n in self.requests.items() if fragment in path)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            if method != "GET":
                return None
            self.requests[path] += 1
            for fragment, fault in self._always.items():
                if fragment in path:
                    return fault
            for fragment, queue in self._queued.items():
                if fragment in path and queue:
                    return queue.pop(0)
            return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _forward(self) -> tuple[int, list[tuple[str, str]], bytes]:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                connection = http.client.HTTPConnection(*proxy._upstream, timeout=30)
                try:
                    connection.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                    response = connection.getresponse()
                    return response.status, response.getheaders(), response.read()
                finally:
                    connection.close()

            def _reply(
                self, status: int, headers: list[tuple[str, str]], body: bytes, length: int, close: bool = False
            ) -> None:
                self.send_response_only(status)
                for name, value in headers:
                    if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(length))
                if close:
                    # Say so, as a real server does: otherwise the client may put the socket back in its
                    # pool and send the retry down it before the close reaches it; that retry then fails
                    # as ConnectionClosedError without ever reaching the proxy, and gets() undercounts.
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(body)
                    self.wfile.flush()

            def _handle(self) -> None:
                fault = proxy._fault_for(self.command, self.path)
                if fault is None:
                    status, headers, body = self._forward()
                    declared = dict((k.lower(), v) for k, v in headers).get("content-length", len(body))
                    self._reply(status, headers, body, int(declared) if self.command == "HEAD" else len(body))
                elif fault.kind == "status":
                    code = fault.code or INJECTED_ERRORS.get(fault.status, str(fault.status))
                    error = f"<Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>"
                    self._reply(fault.status, [("Content-Type", "application/xml")], error.encode(), len(error))
                elif fault.kind == "reset":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                elif fault.kind in ("truncate", "shrink"):
                    status, headers, body = self._forward()
                    half = body[: len(body) // 2]
                    declared = len(body) if fault.kind == "truncate" else len(half)
                    self._reply(status, headers, half, declared, close=True)
                else:
                    raise ValueError(f"unknown fault kind '{fault.kind}'")

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

        return Handler


@contextmanager
def faulty_proxy(upstream: str) -> Iterator[FaultyS3Proxy]:
    proxy = FaultyS3Proxy(upstream)
    try:
        yield proxy
    finally:
        proxy.stop()
