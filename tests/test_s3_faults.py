"""S3 faults, injected by a proxy in front of a real S3-protocol server (moto_server).

Transient errors are retried with a bounded backoff; permanent ones fail at
once with a message naming the object; a cut-short transfer is never taken
for the object.
"""

from __future__ import annotations

import re
import time

import pytest

from muco_flow.data import schema
from muco_flow.data.m3t_ingest import ingest_m3t_snapshot
from muco_flow.data.sources import RetryPolicy, S3Snapshot, SourceError
from tests.s3_server import (
    ACCESS_KEY,
    SECRET_KEY,
    Fault,
    faulty_proxy,
    free_port,
    moto_server,
    s3_client_for,
    upload_tree,
)
from tests.test_ingest import FAST, ingest

pytestmark = pytest.mark.slow

BUCKET, PREFIX = "m3t", "v1"
URI = f"s3://{BUCKET}/{PREFIX}"
META_KEY = f"{PREFIX}/{schema.TRAIN_META_FILE}"
ATTEMPTS, BACKOFF = 3, 0.05


@pytest.fixture(scope="module")
def s3(small_sample_root):
    """moto_server holding the small sample under s3://m3t/v1."""
    with moto_server() as endpoint:
        upload_tree(s3_client_for(endpoint), small_sample_root, BUCKET, PREFIX)
        yield endpoint


@pytest.fixture
def proxy(s3):
    with faulty_proxy(s3) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def local_shards(small_sample_root, tmp_path_factory):
    """The shards of the same sample ingested from disk: what S3 must give too."""
    out = tmp_path_factory.mktemp("local")
    return [s["sha256"] for s in ingest(small_sample_root, out)["shards"]]


def options(endpoint: str, **extra) -> dict:
    return {
        "endpoint_url": endpoint,
        "aws_access_key_id": ACCESS_KEY,
        "aws_secret_access_key": SECRET_KEY,
        "region_name": "us-east-1",
        "max_attempts": ATTEMPTS,
        "backoff_s": BACKOFF,
        **extra,
    }


def open_source(endpoint: str, waits: list[float], uri: str = URI, **extra) -> S3Snapshot:
    return S3Snapshot(uri, schema.TRAIN_META_FILE, options(endpoint, **extra), sleep=waits.append)


def ingest_from(endpoint: str, tmp_path, waits: list[float], **extra) -> dict:
    source = open_source(endpoint, waits, **extra)
    out = tmp_path / "out"
    out.mkdir()
    try:
        return ingest_m3t_snapshot(source, out, FAST)
    finally:
        source.close()


def image_key(n: int) -> str:
    return f"images/train/{n:06d}.png"


def assert_waits_back_off(waits: list[float], failures_in_a_row: list[int]) -> None:
    """Each wait is the policy's: within [0.5, 1] x backoff x 2^(k-1) after the k-th failure in a row."""
    expected = sorted(BACKOFF * 2 ** (k - 1) for k in failures_in_a_row)
    assert len(waits) == len(expected)
    for wait, full in zip(sorted(waits), expected, strict=True):
        assert 0.5 * full <= wait <= full


def test_transient_errors_are_retried_and_the_ingest_is_complete(proxy, tmp_path, local_shards):
    proxy.inject(META_KEY, Fault("status", 503), Fault("status", 500))  # two failures, then the file
    proxy.inject(image_key(1), Fault("status", 503, "SlowDown"))
    proxy.inject(image_key(2), Fault("reset"))  # connection dropped before an answer
    proxy.inject(image_key(3), Fault("truncate"))  # half the body, then the connection closes
    proxy.inject(image_key(4), Fault("shrink"))  # half the body, declared as the whole: the CRC tells
    proxy.inject(image_key(5), Fault("status", 500), Fault("status", 503))
    waits: list[float] = []
    manifest = ingest_from(proxy.endpoint, tmp_path, waits)

    assert manifest["counts"] == {"read": 24, "accepted": 24, "rejected": 0}
    assert [s["sha256"] for s in manifest["shards"]] == local_shards  # byte for byte what the disk gives
    assert proxy.gets(META_KEY) == 3
    assert [proxy.gets(image_key(n)) for n in range(7)] == [1, 2, 2, 2, 2, 3, 1]
    # one wait per failure, doubling within a run of failures of the same object
    assert_waits_back_off(waits, [1, 2, 1, 1, 1, 1, 1, 2])


def test_an_object_that_keeps_failing_fails_the_run_after_max_attempts(proxy, tmp_path):
    proxy.always(image_key(7), Fault("status", 503))
    waits: list[float] = []
    with pytest.raises(SourceError) as failure:
        ingest_from(proxy.endpoint, tmp_path, waits)
    message = str(failure.value)
    assert f"cannot read {URI}/{image_key(7)}: still failing after {ATTEMPTS} attempts" in message
    assert "SlowDown (HTTP 503)" in message and SECRET_KEY not in message
    assert proxy.gets(image_key(7)) == ATTEMPTS  # bounded: exactly max_attempts tries
    assert_waits_back_off(waits, list(range(1, ATTEMPTS)))


@pytest.mark.parametrize(
    "fault, expected",
    [
        (Fault("status", 403, "AccessDenied"), "AccessDenied (HTTP 403; these credentials may not read it)"),
        (Fault("status", 403, "InvalidAccessKeyId"), "InvalidAccessKeyId (HTTP 403; the access key id is not known"),
        (
            Fault("status", 403, "SignatureDoesNotMatch"),
            "SignatureDoesNotMatch (HTTP 403; the secret access key does not match",
        ),
    ],
)
def test_permanent_errors_fail_at_once_naming_the_object(proxy, fault, expected):
    proxy.always(META_KEY, fault)
    waits: list[float] = []
    with pytest.raises(SourceError) as failure:
        open_source(proxy.endpoint, waits)
    message = str(failure.value)
    assert message.startswith(f"cannot read {URI}/{schema.TRAIN_META_FILE}: {expected}")
    assert SECRET_KEY not in message and ACCESS_KEY not in message
    assert proxy.gets(META_KEY) == 1 and waits == []  # no retry of what cannot get better


def test_a_missing_bucket_or_object_fails_at_once_with_its_name(proxy):
    waits: list[float] = []
    with pytest.raises(SourceError, match=re.escape("s3://no-such-bucket/v1/M3T_train/M3T.parquet: NoSuchBucket")):
        open_source(proxy.endpoint, waits, uri="s3://no-such-bucket/v1")
    with pytest.raises(SourceError, match=re.escape("s3://m3t/v9/M3T_train/M3T.parquet: NoSuchKey (HTTP 404)")):
        open_source(proxy.endpoint, waits, uri="s3://m3t/v9")
    assert waits == [] and proxy.gets("/no-such-bucket/") == 1 and proxy.gets("/m3t/v9/") == 1


@pytest.mark.parametrize(
    "kind, error",
    [
        ("truncate", r"IncompleteReadError: \d+ read, but total bytes expected is \d+"),  # half of the file
        ("shrink", "FlexibleChecksumError"),
    ],
)
def test_a_cut_short_meta_file_is_never_taken_for_the_file(proxy, kind, error):
    proxy.always(META_KEY, Fault(kind))
    waits: list[float] = []
    with pytest.raises(SourceError, match="still failing after 2 attempts") as failure:
        open_source(proxy.endpoint, waits, max_attempts=2)
    assert re.search(error, str(failure.value))
    assert proxy.gets(META_KEY) == 2 and len(waits) == 1


@pytest.mark.parametrize("kind", ["truncate", "shrink"])
def test_a_cut_short_image_stops_the_run_rather_than_storing_half_an_image(proxy, tmp_path, kind):
    proxy.always(image_key(9), Fault(kind))
    with pytest.raises(SourceError, match=re.escape(f"{URI}/{image_key(9)}: still failing after {ATTEMPTS}")):
        ingest_from(proxy.endpoint, tmp_path, [])
    assert proxy.gets(image_key(9)) == ATTEMPTS


def test_failed_opens_leave_no_temporary_copy(proxy, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    proxy.always(META_KEY, Fault("truncate"))
    with pytest.raises(SourceError):
        open_source(proxy.endpoint, [])
    assert list(tmp_path.iterdir()) == []


def test_a_stopped_server_fails_after_bounded_retries(proxy, tmp_path):
    # nothing listens at the endpoint at all
    closed = f"http://127.0.0.1:{free_port()}"
    waits: list[float] = []
    began = time.monotonic()
    with pytest.raises(SourceError) as failure:
        open_source(closed, waits, connect_timeout_s=2)
    assert time.monotonic() - began < 30
    message = str(failure.value)
    assert f"still failing after {ATTEMPTS} attempts" in message and "EndpointConnectionError" in message
    assert_waits_back_off(waits, list(range(1, ATTEMPTS)))

    # the server goes away after the meta file was read: the first image read fails the run
    waits = []
    source = open_source(proxy.endpoint, waits)
    proxy.stop()
    out = tmp_path / "out"
    out.mkdir()
    try:
        with pytest.raises(SourceError, match=re.escape(f"{URI}/images/train/") + ".*still failing after"):
            ingest_m3t_snapshot(source, out, FAST)
    finally:
        source.close()


def test_the_backoff_doubles_up_to_its_cap_and_bad_policies_are_named():
    policy = RetryPolicy(max_attempts=8, backoff_s=1.0, max_backoff_s=4.0)
    for failures, full in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 4.0), (7, 4.0)]:
        for _ in range(50):
            assert 0.5 * full <= policy.wait_after(failures) <= full
    assert RetryPolicy.from_options({"max_attempts": "2", "backoff_s": 0}).max_attempts == 2
    with pytest.raises(ValueError, match="max_attempts must be at least 1"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="backoff_s <= max_backoff_s"):
        RetryPolicy(backoff_s=5, max_backoff_s=1)


def test_an_image_key_s3_cannot_hold_is_a_missing_image_not_a_failed_run(proxy):
    from muco_flow.data.sources import ImageMissingError

    source = open_source(proxy.endpoint, [])
    try:
        with pytest.raises(ImageMissingError, match="longer than 1024 bytes"):
            source.read_image("images/" + "x" * 1100 + ".png")  # S3 would answer KeyTooLongError (HTTP 400)
        with pytest.raises(ImageMissingError, match=re.escape(f"no object at {URI}/images/train/nope.png")):
            source.read_image("images/train/nope.png")
    finally:
        source.close()
    assert proxy.gets("x" * 1100) == 0 and proxy.gets("nope.png") == 1
