"""`kedro run --pipelines=data` on the bundled sample, and on an s3:// copy behind a real S3 server."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tests.conftest import SMALL_RUN_PARAMS, kedro_run
from tests.s3_server import ACCESS_KEY, SECRET_KEY, moto_server, s3_client_for, s3_env, upload_tree

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_server() as endpoint:
        yield endpoint


def shard_hashes(project, layer: str) -> list[str]:
    manifest = json.loads((project / layer / "manifest.json").read_text())
    return [s["sha256"] for s in manifest["shards"]]


def test_data_pipeline_local_then_s3_gives_identical_shards(project, s3_endpoint):
    kedro_run(project, "--pipelines=sample", f"--params={SMALL_RUN_PARAMS}")
    kedro_run(project, "--pipelines=backbone")
    kedro_run(project, "--pipelines=data")
    local_shards = shard_hashes(project, "data/02_intermediate/m3t_shards")
    local_conversations = shard_hashes(project, "data/05_model_input/m3t_conversations")
    report = json.loads((project / "data/08_reporting/ingest_report.json").read_text())
    assert report["counts"] == {"read": 24, "accepted": 24, "rejected": 0}

    env = s3_env(s3_endpoint)
    client = s3_client_for(s3_endpoint)
    upload_tree(client, project / "data/01_raw/m3t_mini", "m3t", "snapshots/v1")
    result = kedro_run(project, "--pipelines=data", "--params=m3t_source_uri=s3://m3t/snapshots/v1", env=env)

    manifest = json.loads((project / "data/02_intermediate/m3t_shards/manifest.json").read_text())
    assert manifest["source"]["uri"] == "s3://m3t/snapshots/v1"
    assert shard_hashes(project, "data/02_intermediate/m3t_shards") == local_shards
    assert shard_hashes(project, "data/05_model_input/m3t_conversations") == local_conversations
    assert SECRET_KEY not in result.stdout + result.stderr


def test_s3_credentials_from_conf_local_and_errors_that_name_the_object(project, s3_endpoint):
    kedro_run(project, "--pipelines=sample", f"--params={SMALL_RUN_PARAMS}")
    client = s3_client_for(s3_endpoint)
    upload_tree(client, project / "data/01_raw/m3t_mini", "m3t-conf", "v2")
    (project / "conf/local/credentials.yml").write_text(
        "m3t_s3:\n"
        f"  aws_access_key_id: {ACCESS_KEY}\n"
        f"  aws_secret_access_key: {SECRET_KEY}\n"
        "  region_name: us-east-1\n"
        f"  endpoint_url: {s3_endpoint}\n"
    )
    clean_env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_ENDPOINT_URL": ""}
    ok = kedro_run(project, "--pipelines=ingest", "--params=m3t_source_uri=s3://m3t-conf/v2", env=clean_env)
    rows = sum(pq.read_metadata(p).num_rows for p in (project / "data/02_intermediate/m3t_shards/shards").glob("*"))
    assert rows == 24

    missing = kedro_run(
        project, "--pipelines=ingest", "--params=m3t_source_uri=s3://m3t-conf/nope", env=clean_env, check=False
    )
    assert missing.returncode != 0
    output = missing.stdout + missing.stderr
    assert "s3://m3t-conf/nope/M3T_train/M3T.parquet" in output
    for text in (ok.stdout + ok.stderr, output):
        assert SECRET_KEY not in text
