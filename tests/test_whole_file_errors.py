"""A whole-file problem with the input ends a run with one line naming the file and the real problem.

The in-process tests load the dataset through a real Kedro catalog (which
wraps the error as `kedro run` sees it) and pass the error to the hook that
ends the run; the slow test runs `kedro run` itself.
"""

from __future__ import annotations

import pytest
from kedro.io import DataCatalog, DatasetError

from muco_flow.data import schema
from muco_flow.data.meta_file import MetaFileError
from muco_flow.datasets import M3TSnapshotSourceDataset
from muco_flow.hooks import OneLineInputErrors, whole_input_failure_line

META = schema.TRAIN_META_FILE  # M3T_train/M3T.parquet


def load_error(uri: str) -> DatasetError:
    """What `kedro run` gets when it loads ``m3t_source`` from ``uri``."""
    catalog = DataCatalog({"m3t_source": M3TSnapshotSourceDataset(uri=uri, meta_file=META)})
    with pytest.raises(DatasetError) as failure:
        catalog.load("m3t_source")
    return failure.value


def ended_with(error: BaseException) -> str:
    """The message the run ends with once the hook has seen ``error``."""
    with pytest.raises(SystemExit) as ended:
        OneLineInputErrors().on_pipeline_error(error=error, run_params={}, pipeline=None, catalog=None)
    assert isinstance(ended.value.code, str)
    return ended.value.code


def test_a_missing_meta_file_is_named(tmp_path):
    (tmp_path / "M3T_train").mkdir()
    line = ended_with(load_error(str(tmp_path)))
    assert line == f"input error: m3t_source: no meta file '{META}' under snapshot root '{tmp_path}'"


def test_a_missing_snapshot_root_is_named(tmp_path):
    line = ended_with(load_error(str(tmp_path / "nowhere")))
    assert line == f"input error: m3t_source: snapshot root '{tmp_path}/nowhere' does not exist"


def test_a_spark_directory_of_parquet_parts_is_told_as_such(tmp_path):
    meta = tmp_path / META
    meta.mkdir(parents=True)
    for name in ("part-00000-a.snappy.parquet", "part-00001-a.snappy.parquet", "_SUCCESS"):
        (meta / name).write_bytes(b"PAR1")
    line = ended_with(load_error(str(tmp_path)))
    assert line == (
        f"input error: m3t_source: meta file '{meta}' is a directory of parquet parts "
        "(2 files, a table as Spark writes it), not one parquet file: join the parts into one file at that path"
    )


def test_an_empty_directory_at_the_meta_path_is_not_called_missing(tmp_path):
    (tmp_path / META).mkdir(parents=True)
    line = ended_with(load_error(str(tmp_path)))
    assert line == f"input error: m3t_source: meta file '{tmp_path / META}' is a directory, not a parquet file"


def test_a_uri_naming_the_parquet_file_points_at_the_folder(tmp_path):
    meta = tmp_path / META
    meta.parent.mkdir()
    meta.write_bytes(b"PAR1")
    line = ended_with(load_error(str(meta)))
    assert line == (
        f"input error: m3t_source: snapshot root '{meta}' is a file where a folder is expected: the URI names "
        f"the snapshot's folder, the one that holds '{META}' (here '{tmp_path}')"
    )


def test_a_uri_naming_another_file_gets_no_suggested_folder(tmp_path):
    other = tmp_path / "train.parquet"
    other.write_bytes(b"PAR1")
    assert ended_with(load_error(str(other))).endswith(f"the one that holds '{META}'")


def test_an_s3_uri_without_a_bucket_is_named():
    line = ended_with(load_error("s3:///m3t/v1"))
    assert line == "input error: m3t_source: 's3:///m3t/v1' names no bucket: an S3 snapshot URI is s3://BUCKET/prefix"


def test_a_damaged_file_found_by_a_node_is_one_line_too():
    error = MetaFileError("data/M3T.parquet: the file is empty (0 bytes),\nnot a parquet file")
    assert ended_with(error) == "input error: data/M3T.parquet: the file is empty (0 bytes), not a parquet file"


@pytest.mark.parametrize("error", [ValueError("a bug"), DatasetError("m3t_shards: disk full"), KeyError("x")])
def test_other_errors_keep_their_traceback(error):
    assert whole_input_failure_line(error) is None
    OneLineInputErrors().on_pipeline_error(error=error, run_params={}, pipeline=None, catalog=None)  # no SystemExit


@pytest.mark.slow
def test_kedro_run_on_a_uri_naming_the_parquet_file_ends_in_one_line(project, tmp_path):
    from tests.conftest import kedro_run

    meta = tmp_path / "snapshot" / META
    meta.parent.mkdir(parents=True)
    meta.write_bytes(b"PAR1")
    result = kedro_run(project, "--pipelines=ingest", f"--params=m3t_source_uri={meta}", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"input error: m3t_source: snapshot root '{meta}' is a file where a folder is expected: the URI names "
        f"the snapshot's folder, the one that holds '{META}' (here '{tmp_path / 'snapshot'}')"
    )


@pytest.mark.slow
def test_a_spark_prefix_of_parquet_parts_on_s3_is_told_as_such():
    from muco_flow.data.sources import S3Snapshot, SourceError
    from tests.s3_server import ACCESS_KEY, SECRET_KEY, moto_server, s3_client_for

    with moto_server() as endpoint:
        client = s3_client_for(endpoint)
        client.create_bucket(Bucket="m3t")
        for name in ("part-00000-a.snappy.parquet", "part-00001-a.snappy.parquet", "_SUCCESS"):
            client.put_object(Bucket="m3t", Key=f"spark/{META}/{name}", Body=b"PAR1")
        options = {
            "endpoint_url": endpoint,
            "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": SECRET_KEY,
            "region_name": "us-east-1",
            "max_attempts": 1,
        }
        with pytest.raises(SourceError) as failure:
            S3Snapshot("s3://m3t/spark", META, options)
        assert str(failure.value) == (
            f"meta file s3://m3t/spark/{META} is a prefix of parquet parts (2 objects, a table as Spark writes it), "
            "not one object: join the parts into one file at that key"
        )
        with pytest.raises(SourceError, match=f"cannot read s3://m3t/nothing/{META}: NoSuchKey"):
            S3Snapshot("s3://m3t/nothing", META, options)  # no parts below: the missing object is named
