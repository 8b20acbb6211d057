"""Downloads of images by URL: concurrent, bounded in time, size and retries."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests
import urllib3

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class FetchConfig:
    """The `ingest.download` parameters."""

    max_workers: int = 8
    timeout_s: float = 10.0  # connecting, and each read
    deadline_s: float = 60.0  # the whole transfer of one image, every retry included
    retries: int = 3
    backoff_s: float = 0.5  # doubled after each failed try
    max_bytes: int = 20_000_000
    allowed_content_types: tuple[str, ...] = ("image/",)

    def __post_init__(self) -> None:
        if (
            self.max_workers < 1
            or self.retries < 0
            or self.timeout_s <= 0
            or self.deadline_s <= 0
            or self.max_bytes <= 0
        ):
            raise ValueError(f"ingest.download: invalid settings {self}")


class FetchError(Exception):
    """A URL that did not yield an acceptable image body; says why."""


def _declared_length(response: requests.Response) -> int | None:
    declared = response.headers.get("Content-Length")
    if declared is None:
        return None
    if not declared.strip().isdigit():
        raise FetchError(f"the server declared an invalid Content-Length {declared[:40]!r}")
    return int(declared)


def _fetch_once(session: requests.Session, url: str, config: FetchConfig, deadline: float) -> bytes:
    """One GET of ``url``; stops at ``deadline`` (time.monotonic) however slowly the bytes trickle in."""
    with session.get(url, timeout=min(config.timeout_s, max(0.001, deadline - time.monotonic())), stream=True) as r:
        if r.status_code != 200:
            raise FetchError(f"HTTP {r.status_code}")
        content_type = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not content_type.startswith(config.allowed_content_types):
            raise FetchError(f"content type '{content_type or 'missing'}' is not an image")
        # Content-Length counts the bytes on the wire: the compressed ones under a Content-Encoding
        declared = _declared_length(r)
        encoded = r.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
        if declared is not None and declared > config.max_bytes and not encoded:
            raise FetchError(f"{declared} bytes exceeds the limit of {config.max_bytes}")
        body = bytearray()
        while True:
            if time.monotonic() > deadline:
                raise FetchError(
                    f"the download took longer than ingest.download.deadline_s = {config.deadline_s:g} s "
                    f"({len(body)} bytes so far)"
                )
            # read1: at most one read from the socket, so a trickling server cannot hold one call for ever
            chunk = r.raw.read1(64 * 1024, decode_content=True)
            if not chunk:
                break
            body.extend(chunk)
            if len(body) > config.max_bytes:
                raise FetchError(f"body exceeds the limit of {config.max_bytes} bytes")
        received = r.raw.tell()  # bytes off the wire, before any decoding
        if declared is not None and received != declared:
            raise FetchError(f"body is {received} bytes, the server declared {declared}: incomplete")
        return bytes(body)


def _is_retryable(error: Exception) -> bool:
    if isinstance(error, requests.RequestException):
        return True  # timeouts, resets, refused connections
    if isinstance(error, urllib3.exceptions.TimeoutError | urllib3.exceptions.ProtocolError):
        return True  # the same, met while reading the body
    return isinstance(error, FetchError) and any(f"HTTP {s}" == str(error) for s in RETRYABLE_STATUS)


def fetch_url(
    session: requests.Session, url: str, config: FetchConfig, sleep: Callable[[float], None] = time.sleep
) -> bytes:
    """The body at ``url``; retries transient failures with exponential backoff."""
    if not url.lower().startswith(("http://", "https://")):
        raise FetchError(f"unsupported URL scheme in '{url}'")
    delay = config.backoff_s
    deadline = time.monotonic() + config.deadline_s
    for attempt in range(config.retries + 1):
        try:
            return _fetch_once(session, url, config, deadline)
        except ValueError as error:
            # a URL (or a redirect's Location) that cannot be parsed (urllib3's LocationParseError,
            # requests' InvalidURL): asking again gives the same answer
            raise FetchError(f"{type(error).__name__}: {error} (after {attempt + 1} tries)") from None
        except (FetchError, requests.RequestException, urllib3.exceptions.HTTPError) as error:
            out_of_time = time.monotonic() + delay > deadline
            if attempt == config.retries or not _is_retryable(error) or out_of_time:
                reason = error if isinstance(error, FetchError) else type(error).__name__
                raise FetchError(f"{reason} (after {attempt + 1} tries)") from None
            logger.debug("retrying %s after %s", url, error)
            sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def fetch_urls(urls: Sequence[str], config: FetchConfig) -> list[bytes | FetchError]:
    """Fetches ``urls`` concurrently; result i is the body of ``urls[i]`` or why it failed."""
    if not urls:
        return []

    def one(url: str) -> bytes | FetchError:
        try:
            return fetch_url(session, url, config)
        except FetchError as error:
            return error

    with requests.Session() as session, ThreadPoolExecutor(config.max_workers) as pool:
        return list(pool.map(one, urls))
