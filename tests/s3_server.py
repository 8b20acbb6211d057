"""A real S3-protocol server (moto_server) on 127.0.0.1, for integration tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
