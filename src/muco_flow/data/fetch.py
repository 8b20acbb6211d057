"""Downloads of images by URL: concurrent, bounded in time, size and retries."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class FetchConfig:
    """The `ingest.download` parameters."""

    max_workers: int = 8
    timeout_s: float = 10.0
    retries: int = 3
    backoff_s: float = 0.5  # doubled after each failed try
    max_bytes: int = 20_000_000
    allowed_content_types: tuple[str, ...] = ("image/",)

    def __post_init__(self) -> None:
        if self.max_workers < 1 or self.retries < 0 or self.timeout_s <= 0 or self.max_bytes <= 0:
            raise ValueError(f"ingest.download: invalid settings {self}")


class FetchError(Exception):
    """A URL that did not yield an acceptable image body; says why."""


def _fetch_once(session: requests.Session, url: str, config: FetchConfig) -> bytes:
    with session.get(url, timeout=config.timeout_s, stream=True) as response:
        if response.status_code != 200:
            raise FetchError(f"HTTP {response.status_code}")
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not content_type.startswith(config.allowed_content_types):
            raise FetchError(f"content type '{content_type or 'missing'}' is not an image")
        declared = response.headers.get("Content-Length")
        if declared is not None and int(declared) > config.max_bytes:
            raise FetchError(f"{declared} bytes exceeds the limit of {config.max_bytes}")
        body = bytearray()
        for chunk in response.iter_content(64 * 1024):
            body.extend(chunk)
            if len(body) > config.max_bytes:
                raise FetchError(f"body exceeds the limit of {config.max_bytes} bytes")
        if declared is not None and len(body) != int(declared):
            raise FetchError(f"body is {len(body)} bytes, the server declared {declared}: incomplete")
        return bytes(body)


def _is_retryable(error: Exception) -> bool:
    if isinstance(error, requests.RequestException):
        return True  # timeouts, resets, refused connections
    return isinstance(error, FetchError) and any(f"HTTP {s}" == str(error) for s in RETRYABLE_STATUS)


def fetch_url(
    session: requests.Session, url: str, config: FetchConfig, sleep: Callable[[float], None] = time.sleep
) -> bytes:
    """The body at ``url``; retries transient failures with exponential backoff."""
    if not url.lower().startswith(("http://", "https://")):
        raise FetchError(f"unsupported URL scheme in '{url}'")
    delay = config.backoff_s
    for attempt in range(config.retries + 1):
        try:
            return _fetch_once(session, url, config)
        except (FetchError, requests.RequestException) as error:
            if attempt == config.retries or not _is_retryable(error):
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
