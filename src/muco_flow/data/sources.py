"""Where an M3T snapshot is read from: a local directory or an ``s3://`` prefix.

Both give the same two things: a local copy of the meta parquet (so that it
can be streamed by row groups) and the bytes of an image by its relative path.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from muco_flow.data.images import confined_key, confined_path

logger = logging.getLogger(__name__)


class ImageMissingError(LookupError):
    """The snapshot has no file at an image path."""


class SourceError(RuntimeError):
    """The snapshot could not be read (permissions, network, a bad URI)."""


class ImageUnreadableError(Exception):
    """One image that is there but cannot be taken; ``code`` is its reject reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_FILE_KINDS = (
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def read_regular_file(path: Path, shown: str, max_bytes: int | None = None) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes``.

    Opened without blocking and checked on the open descriptor, so a FIFO,
    a socket or a device is refused without a single read (reading a FIFO
    would wait for a writer for ever, a device could stream for ever).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageMissingError(f"no image file at '{shown}'") from None
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            raise ImageMissingError(f"no image file can exist at '{shown}': {err.strerror}") from None
        if err.errno == errno.ELOOP:
            raise ImageUnreadableError("IMAGE_NOT_A_FILE", f"image path '{shown}' is a symlink loop") from None
        if err.errno == errno.ENXIO:  # what open() says of a Unix socket
            raise ImageUnreadableError("IMAGE_NOT_A_FILE", f"image path '{shown}' is a socket, not a file") from None
        raise ImageUnreadableError("IMAGE_UNREADABLE", f"cannot read image file '{shown}': {err.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ImageMissingError(f"no image file at '{shown}' (a directory)")
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "special file")
            raise ImageUnreadableError("IMAGE_NOT_A_FILE", f"image path '{shown}' is a {kind}, not a regular file")
        os.set_blocking(fd, True)
        limit = max_bytes if max_bytes is not None else 1 << 62
        parts, size = [], 0
        while size <= limit:
            block = os.read(fd, min(1 << 20, limit + 1 - size))
            if not block:
                break
            parts.append(block)
            size += len(block)
        if size > limit:
            raise ImageUnreadableError(
                "IMAGE_TOO_LARGE", f"image file '{shown}' is larger than ingest.max_image_bytes = {limit}"
            )
        return b"".join(parts)
    except OSError as err:
        raise ImageUnreadableError("IMAGE_UNREADABLE", f"cannot read image file '{shown}': {err.strerror}") from None
    finally:
        os.close(fd)


class SnapshotSource(Protocol):
    uri: str
    meta_file: str

    def meta_path(self) -> Path: ...

    def read_image(self, relative: str, max_bytes: int | None = None) -> bytes: ...

    def close(self) -> None: ...


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LocalSnapshot:
    def __init__(self, root: str | Path, meta_file: str) -> None:
        self.root = Path(root)
        self.uri, self.meta_file = str(self.root), meta_file
        self._meta = self.root / meta_file
        _check_local_meta_file(self.root, meta_file)

    def meta_path(self) -> Path:
        return self._meta

    def read_image(self, relative: str, max_bytes: int | None = None) -> bytes:
        return read_regular_file(confined_path(self.root, relative), relative, max_bytes)

    def close(self) -> None:
        pass


# A model directory's record of the run that wrote it (training/model_identity.py): not part of the content it names
MODEL_IDENTITY_FILE = "model_identity.json"


def model_content_hash(directory: str | Path) -> str:
    """sha256 over every file's relative path and content (the identity file itself excluded)."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name == MODEL_IDENTITY_FILE:
            continue
        digest.update(f"{name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _check_local_meta_file(root: Path, meta_file: str) -> None:
    """Raises SourceError naming the real problem when ``root / meta_file`` is not one readable file.

    The usual mistakes are told apart, since each needs a different fix: a
    URI naming the meta file (or another file) instead of the snapshot's
    folder, and a meta "file" that is a folder of parquet parts, as Spark and
    other distributed writers leave a table.
    """
    if not root.exists():
        raise SourceError(f"snapshot root '{root}' does not exist")
    if not root.is_dir():
        named = str(root).removesuffix(meta_file).rstrip("/") if str(root).endswith(meta_file) else ""
        hint = f" (here '{named}')" if named else ""
        raise SourceError(
            f"snapshot root '{root}' is a file where a folder is expected: the URI names the snapshot's "
            f"folder, the one that holds '{meta_file}'{hint}"
        )
    meta = root / meta_file
    if meta.is_dir():
        parts = sorted(meta.rglob("*.parquet"))
        if parts:
            raise SourceError(
                f"meta file '{meta}' is a directory of parquet parts ({len(parts)} files, a table as Spark writes it), "
                "not one parquet file: join the parts into one file at that path"
            )
        raise SourceError(f"meta file '{meta}' is a directory, not a parquet file")
    if not meta.exists():
        raise SourceError(f"no meta file '{meta_file}' under snapshot root '{root}'")
    if not meta.is_file():
        raise SourceError(f"meta file '{meta}' is not a regular file")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries of transient S3 failures (the `max_attempts`, `backoff_s`, `max_backoff_s` S3 options)."""

    max_attempts: int = 5  # tries in all, the first one included
    backoff_s: float = 0.5  # the wait after the first failure; doubled after each further one
    max_backoff_s: float = 20.0  # no single wait is longer

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError(
                "S3 retries: max_attempts must be at least 1 and 0 <= backoff_s <= max_backoff_s, "
                f"got {self.max_attempts}, {self.backoff_s}, {self.max_backoff_s}"
            )

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> RetryPolicy:
        defaults = cls()
        return cls(
            max_attempts=int(options.get("max_attempts", defaults.max_attempts)),
            backoff_s=float(options.get("backoff_s", defaults.backoff_s)),
            max_backoff_s=float(options.get("max_backoff_s", defaults.max_backoff_s)),
        )

    def wait_after(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure: exponential, capped, with jitter.

        The jitter (a factor in [0.5, 1]) keeps many image reads that failed
        together from all coming back at the same instant.
        """
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


class IncompleteObjectError(Exception):
    """Fewer (or more) bytes arrived than the object's declared size."""


# S3 error codes that mean "try again later", whatever the HTTP status
TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
    }
)


def is_transient(err: Exception) -> bool:
    """Whether an S3 failure may go away on a retry (server errors, throttling, dropped or cut connections)."""
    from botocore import exceptions as b

    if isinstance(err, IncompleteObjectError):
        return True
    if isinstance(err, b.ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status in (408, 429) or _s3_error_code(err) in TRANSIENT_CODES
    if isinstance(err, b.SSLError):
        return False  # a certificate problem is configuration, not bad luck
    # connection refused or reset, timeouts, a body cut short, a checksum mismatch
    return isinstance(err, b.HTTPClientError | b.ConnectionError | b.IncompleteReadError | b.FlexibleChecksumError)


def s3_client(options: dict[str, Any]):
    """A boto3 S3 client; unset options fall back to boto3's own chain (the environment).

    botocore's own retries are off: S3Snapshot retries every call itself, body
    reads included, so that one policy bounds the time spent on a failure.
    """
    import boto3
    from botocore.config import Config

    known = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "region_name", "endpoint_url")
    kwargs = {k: options[k] for k in known if options.get(k)}
    config = Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=float(options.get("connect_timeout_s", 10)),
        read_timeout=float(options.get("read_timeout_s", 60)),
        max_pool_connections=int(options.get("max_pool_connections", 16)),
    )
    return boto3.client("s3", config=config, **kwargs)


T = TypeVar("T")
MAX_KEY_BYTES = 1024  # S3's limit on a key's length


class S3Snapshot:
    """A snapshot under ``s3://bucket/prefix``.

    Transient failures are retried under ``RetryPolicy``; permanent ones
    (access denied, no such bucket, bad credentials) fail at once. Every
    object is checked against its declared size, and botocore checks its
    CRC when the store keeps one, so a cut-short transfer is never taken
    for the object.
    """

    def __init__(
        self, uri: str, meta_file: str, options: dict[str, Any], sleep: Callable[[float], None] = time.sleep
    ) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError, IncompleteObjectError)
        parsed = urlparse(uri)
        self.uri, self.meta_file = uri, meta_file
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.retry = RetryPolicy.from_options(options)
        self._sleep = sleep
        self.client = s3_client(options)
        self._tmp = Path(tempfile.mkdtemp(prefix="muco-s3-meta-"))
        self._meta = self._tmp / Path(meta_file).name
        try:
            self._download(self._key(meta_file), self._meta)
        except BaseException:
            self.close()
            raise

    def _key(self, relative: str) -> str:
        relative = confined_key(relative)
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _retrying(self, key: str, call: Callable[[], T]) -> T:
        """``call()``, retried while it fails transiently; raises its last error otherwise.

        A permanent error is raised as it is, at once; transient errors that
        outlast the policy end as SourceError.
        """
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                return call()
            except self._errors as err:
                if not is_transient(err):
                    raise
                if attempt == self.retry.max_attempts:
                    raise SourceError(
                        f"cannot read {self._url(key)}: still failing after {attempt} attempts "
                        f"(S3 option max_attempts); last error: {_describe_s3_error(err)}"
                    ) from None
                wait = self.retry.wait_after(attempt)
                logger.warning(
                    "%s: %s; attempt %d of %d in %.2f s",
                    self._url(key),
                    _describe_s3_error(err),
                    attempt + 1,
                    self.retry.max_attempts,
                    wait,
                )
                self._sleep(wait)
        raise AssertionError("unreachable")

    def _download(self, key: str, target: Path) -> None:
        """Streams the object to ``target``: to a partial file first, renamed once its size is right."""
        partial = target.with_name(target.name + ".partial")

        def attempt() -> None:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            expected = response["ContentLength"]
            written = 0
            with partial.open("wb") as f:
                for chunk in response["Body"].iter_chunks(1 << 20):  # the CRC, if any, is checked at the end
                    f.write(chunk)
                    written += len(chunk)
            if written != expected:
                raise IncompleteObjectError(f"got {written} of {expected} bytes")
            os.replace(partial, target)

        try:
            self._retrying(key, attempt)
        except self._errors as err:
            parts = self._parquet_parts(key) if _s3_error_code(err) == "NoSuchKey" else 0
            if parts:
                raise SourceError(
                    f"meta file {self._url(key)} is a prefix of parquet parts ({parts} objects, a table as Spark "
                    "writes it), not one object: join the parts into one file at that key"
                ) from None
            raise SourceError(f"cannot read {self._url(key)}: {_describe_s3_error(err)}") from None
        finally:
            partial.unlink(missing_ok=True)

    def _parquet_parts(self, key: str) -> int:
        """How many ``*.parquet`` objects lie below ``key/`` (one listing, up to 1000); 0 if it cannot tell."""
        try:
            listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=key + "/", MaxKeys=1000)
        except self._errors:
            return 0  # the missing object is what to report, not the listing
        return sum(1 for item in listing.get("Contents", []) if item["Key"].endswith(".parquet"))

    def meta_path(self) -> Path:
        return self._meta

    def read_image(self, relative: str, max_bytes: int | None = None) -> bytes:
        key = self._key(relative)
        if len(key.encode()) > MAX_KEY_BYTES:
            raise ImageMissingError(f"no object can exist at '{relative}': its key is longer than 1024 bytes")

        def attempt() -> bytes:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            if max_bytes is not None and response["ContentLength"] > max_bytes:
                response["Body"].close()
                raise ImageUnreadableError(
                    "IMAGE_TOO_LARGE",
                    f"{self._url(key)} is {response['ContentLength']} bytes, "
                    f"more than ingest.max_image_bytes = {max_bytes}",
                )
            body = response["Body"].read()  # botocore checks the length, and the CRC when there is one
            if len(body) != response["ContentLength"]:
                raise IncompleteObjectError(f"got {len(body)} of {response['ContentLength']} bytes")
            return body

        try:
            return self._retrying(key, attempt)
        except self._errors as err:
            if _s3_error_code(err) in {"NoSuchKey", "404", "NotFound"}:
                raise ImageMissingError(f"no object at {self._url(key)}") from None
            raise SourceError(f"cannot read {self._url(key)}: {_describe_s3_error(err)}") from None

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def _s3_error_code(err: Exception) -> str:
    response = getattr(err, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


HINTS = {
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "these credentials may not read it",
    "InvalidAccessKeyId": "the access key id is not known to the store",
    "SignatureDoesNotMatch": "the secret access key does not match the access key id",
}


def _describe_s3_error(err: Exception) -> str:
    """What went wrong: the S3 error code, HTTP status and message, or botocore's error. Never a credential."""
    code = _s3_error_code(err)
    if not code:
        return f"{type(err).__name__}: {err}"
    response = err.response  # type: ignore[attr-defined]
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = response.get("Error", {}).get("Message") or "no message"
    hint = f"; {HINTS[code]}" if code in HINTS else ""
    return f"{code} (HTTP {status}{hint}): {message}"


def open_snapshot(uri: str, meta_file: str, s3_options: dict[str, Any] | None = None) -> SnapshotSource:
    """A local directory, or ``s3://bucket/prefix`` with ``s3_options`` (see s3_client)."""
    if uri.startswith("s3://"):
        if not urlparse(uri).netloc:
            raise SourceError(f"'{uri}' names no bucket: an S3 snapshot URI is s3://BUCKET/prefix")
        return S3Snapshot(uri, meta_file, s3_options or {})
    if "://" in uri:
        raise SourceError(f"unsupported snapshot URI '{uri}': use a local directory or s3://bucket/prefix")
    return LocalSnapshot(uri, meta_file)
