"""Downloads of images by URL: concurrent, bounded in time, size and retries.

Which failures are transient, the exponential backoff with jitter and the
server's Retry-After are urllib3's `Retry`; this module adds what urllib3
does not do: checks on the body (content type, size limit, cut-short bodies)
and a deadline on the whole transfer, retries included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests
import urllib3
from urllib3.exceptions import InvalidHeader, MaxRetryError
from urllib3.util.retry import Retry

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class FetchConfig:
    """The `ingest.download` parameters."""

    max_workers: int = 8
    timeout_s: float = 10.0  # connecting, and each read
    deadline_s: float = 60.0  # the whole transfer of one image, every retry included
    retries: int = 3
    backoff_s: float = 0.5  # the second retry waits 2x this, each later one twice the one before
    backoff_jitter_s: float = 0.5  # plus a random 0..jitter, so that workers do not retry in lockstep
    max_backoff_s: float = 30.0  # no wait is longer, a server's Retry-After included
    max_bytes: int = 20_000_000
    allowed_content_types: tuple[str, ...] = ("image/",)

    def __post_init__(self) -> None:
        if (
            self.max_workers < 1
            or self.retries < 0
            or self.timeout_s <= 0
            or self.deadline_s <= 0
            or self.max_bytes <= 0
            or min(self.backoff_s, self.backoff_jitter_s, self.max_backoff_s) < 0
        ):
            raise ValueError(f"ingest.download: invalid settings {self}")

    def retry_policy(self) -> Retry:
        """urllib3's retry state for one URL: what is transient, how long to wait, when to give up."""
        return Retry(
            total=self.retries,
            status_forcelist=RETRYABLE_STATUS,
            allowed_methods=frozenset({"GET"}),
            backoff_factor=self.backoff_s,
            backoff_jitter=self.backoff_jitter_s,
            backoff_max=self.max_backoff_s,
            respect_retry_after_header=True,
            retry_after_max=int(self.max_backoff_s),  # whole seconds (urllib3's type); rounding down keeps the bound
            raise_on_status=False,
        )


class FetchError(Exception):
    """A URL that did not yield an acceptable image body; says why."""


class _StatusError(FetchError):
    """A response other than 200; keeps it for the retry policy (its status and Retry-After)."""

    def __init__(self, response: requests.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


class _IncompleteBody(FetchError):
    """Fewer bytes than the server declared: the connection dropped mid-body, worth another try."""


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
            raise _StatusError(r)
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
            raise _IncompleteBody(f"body is {received} bytes, the server declared {declared}: incomplete")
        return bytes(body)


def fetch_url(
    session: requests.Session, url: str, config: FetchConfig, sleep: Callable[[float], None] = time.sleep
) -> bytes:
    """The body at ``url``; transient failures are retried as ``config.retry_policy()`` says, within the deadline."""
    if not url.lower().startswith(("http://", "https://")):
        raise FetchError(f"unsupported URL scheme in '{url}'")
    retry = config.retry_policy()
    deadline = time.monotonic() + config.deadline_s
    reason: Exception | str  # what the last try met, for the messages
    for attempt in range(1, config.retries + 2):
        response = error = None
        try:
            return _fetch_once(session, url, config, deadline)
        except _StatusError as status_error:
            response, reason = status_error.response.raw, status_error
            has_retry_after = "Retry-After" in status_error.response.headers
            if not retry.is_retry("GET", status_error.response.status_code, has_retry_after):
                raise FetchError(f"{reason} (after {attempt} tries)") from None
        except ValueError as unparseable:
            # a URL (or a redirect's Location) that cannot be parsed (urllib3's LocationParseError,
            # requests' InvalidURL): asking again gives the same answer
            raise FetchError(f"{type(unparseable).__name__}: {unparseable} (after {attempt} tries)") from None
        except (_IncompleteBody, requests.RequestException, urllib3.exceptions.HTTPError) as transient:
            # timeouts, resets, refused connections, cut-short bodies (also met while reading the body)
            error, reason = transient, transient if isinstance(transient, FetchError) else type(transient).__name__
        except FetchError as permanent:  # not an image, too large, too slow: the same on every try
            raise FetchError(f"{permanent} (after {attempt} tries)") from None
        try:
            retry = retry.increment("GET", url, response=response, error=error)
        except MaxRetryError:
            raise FetchError(f"{reason} (after {attempt} tries)") from None
        # the wait Retry.sleep() would take (Retry-After if given, else the backoff), handed to ``sleep``
        wait = _retry_after(retry, response)
        wait = retry.get_backoff_time() if wait is None else wait
        if time.monotonic() + wait > deadline:
            raise FetchError(f"{reason} (after {attempt} tries; no time left within ingest.download.deadline_s)")
        logger.debug("retrying %s in %.2f s after %s", url, wait, reason)
        sleep(wait)
    raise AssertionError("unreachable: the retry policy allows config.retries retries")


def _retry_after(retry: Retry, response) -> float | None:
    if response is None:
        return None
    try:
        return retry.get_retry_after(response)
    except InvalidHeader:  # a malformed Retry-After: the backoff instead
        return None


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
