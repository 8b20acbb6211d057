"""Where an M3T snapshot is read from: a local directory or an ``s3://`` prefix.

Both give the same two things: a local copy of the meta parquet (so that it
can be streamed by row groups) and the bytes of an image by its relative path.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from muco_flow.data.images import confined_key, confined_path


class ImageMissingError(LookupError):
    """The snapshot has no file at an image path."""


class SourceError(RuntimeError):
    """The snapshot could not be read (permissions, network, a bad URI)."""


class SnapshotSource(Protocol):
    uri: str
    meta_file: str

    def meta_path(self) -> Path: ...

    def read_image(self, relative: str) -> bytes: ...

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
        if not self._meta.is_file():
            raise SourceError(f"no meta file '{meta_file}' under snapshot root '{self.root}'")

    def meta_path(self) -> Path:
        return self._meta

    def read_image(self, relative: str) -> bytes:
        path = confined_path(self.root, relative)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ImageMissingError(f"no image file at '{relative}'") from None
        except OSError as err:
            if err.errno == errno.ENAMETOOLONG:
                raise ImageMissingError(f"no image file can exist at '{relative}': {err.strerror}") from None
            raise SourceError(f"cannot read image file '{path}': {err.strerror}") from None

    def close(self) -> None:
        pass


def s3_client(options: dict[str, Any]):
    """A boto3 S3 client; unset options fall back to boto3's own chain (the environment)."""
    import boto3
    from botocore.config import Config

    known = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "region_name", "endpoint_url")
    kwargs = {k: options[k] for k in known if options.get(k)}
    config = Config(
        retries={"mode": "standard", "max_attempts": int(options.get("max_attempts", 5))},
        connect_timeout=float(options.get("connect_timeout_s", 10)),
        read_timeout=float(options.get("read_timeout_s", 60)),
        max_pool_connections=int(options.get("max_pool_connections", 16)),
    )
    return boto3.client("s3", config=config, **kwargs)


class S3Snapshot:
    """A snapshot under ``s3://bucket/prefix``; transient errors are retried by botocore."""

    def __init__(self, uri: str, meta_file: str, options: dict[str, Any]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)
        parsed = urlparse(uri)
        self.uri, self.meta_file = uri, meta_file
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.client = s3_client(options)
        self._tmp = Path(tempfile.mkdtemp(prefix="muco-s3-meta-"))
        self._meta = self._tmp / Path(meta_file).name
        self._download(self._key(meta_file), self._meta)

    def _key(self, relative: str) -> str:
        relative = confined_key(relative)
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _download(self, key: str, target: Path) -> None:
        try:
            expected = self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
            self.client.download_file(self.bucket, key, str(target))
        except self._errors as err:
            raise SourceError(f"cannot read s3://{self.bucket}/{key}: {_describe_s3_error(err)}") from None
        if target.stat().st_size != expected:
            raise SourceError(
                f"s3://{self.bucket}/{key}: got {target.stat().st_size} bytes, expected {expected}: incomplete download"
            )

    def meta_path(self) -> Path:
        return self._meta

    def read_image(self, relative: str) -> bytes:
        key = self._key(relative)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            body = response["Body"].read()
        except self._errors as err:
            if _s3_error_code(err) in {"NoSuchKey", "404", "NotFound"}:
                raise ImageMissingError(f"no object at s3://{self.bucket}/{key}") from None
            raise SourceError(f"cannot read s3://{self.bucket}/{key}: {_describe_s3_error(err)}") from None
        if len(body) != response["ContentLength"]:
            raise SourceError(f"s3://{self.bucket}/{key}: got {len(body)} of {response['ContentLength']} bytes")
        return body

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def _s3_error_code(err: Exception) -> str:
    return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))


def _describe_s3_error(err: Exception) -> str:
    # botocore messages name the operation and code, never the credentials
    code = _s3_error_code(err)
    return f"{code}: {err}" if code else str(err)


def open_snapshot(uri: str, meta_file: str, s3_options: dict[str, Any] | None = None) -> SnapshotSource:
    """A local directory, or ``s3://bucket/prefix`` with ``s3_options`` (see s3_client)."""
    if uri.startswith("s3://"):
        if not urlparse(uri).netloc:
            raise SourceError(f"'{uri}' names no bucket")
        return S3Snapshot(uri, meta_file, s3_options or {})
    if "://" in uri:
        raise SourceError(f"unsupported snapshot URI '{uri}': use a local directory or s3://bucket/prefix")
    return LocalSnapshot(uri, meta_file)
