"""Evaluation readers: the sample's sets load; malformed files name dataset, row and problem."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muco_flow.data.m3t_mini import MMEB_DATASETS
from muco_flow.evaluation.datasets import EvaluationDataError, read_m3t_heldout, read_mmeb


@pytest.fixture
def sample(small_sample_root, tmp_path):
    root = tmp_path / "sample"
    shutil.copytree(small_sample_root, root)
    return root


def rewrite_mmeb(root, dataset, change):
    path = root / "eval/mmeb" / dataset / "test.parquet"
    rows = pq.read_table(path).to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_the_samples_sets_load(sample):
    mmeb = read_mmeb(sample / "eval/mmeb", sample, MMEB_DATASETS)
    assert {s.name: s.group for s in mmeb} == MMEB_DATASETS
    count = next(s for s in mmeb if s.name == "MiniShapes-Count")
    assert len(count.candidates) == 4  # "one".."four": every query's candidates, encoded once
    t2i = next(s for s in mmeb if s.name == "MiniShapes-T2I")
    assert all(c.image and not c.text for c in t2i.candidates)
    turns = read_m3t_heldout(sample / "M3T_heldout/M3T.parquet", sample)
    assert [s.group for s in turns] == ["classification", "global_vqa", "local_vqa", "creative_vqa", "retrieval"]
    assert sum(len(s.queries) for s in turns) == 6 * 7


def test_mmeb_placeholders_are_stripped_and_duplicate_candidates_merged(sample):
    def change(rows):
        rows[0]["qry_text"] = "<|image_1|>\nRepresent the given image"
        rows[0]["tgt_text"] = [rows[0]["tgt_text"][0], *rows[0]["tgt_text"][:2]]  # the correct one twice
        rows[0]["tgt_img_path"] = [""] * 3

    rewrite_mmeb(sample, "MiniShapes-Cls", change)
    dataset = next(s for s in read_mmeb(sample / "eval/mmeb", sample, MMEB_DATASETS) if s.name == "MiniShapes-Cls")
    assert dataset.queries[0].text.endswith("\nRepresent the given image")
    assert len(dataset.candidate_lists[0]) == 2  # distinct: the duplicate of the answer counts once


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda rows: rows[3].update(tgt_text=[], tgt_img_path=[]),
            "MiniShapes-Cls, row 3: the candidate list is empty",
        ),
        (
            lambda rows: rows[5].update(qry_img_path="images/eval/missing.png"),
            "row 5: image 'images/eval/missing.png' not found",
        ),
        (lambda rows: rows[2].update(tgt_img_path=["", ""]), "row 2: 5 candidate texts but 2 candidate images"),
        (
            lambda rows: rows[1].update(qry_img_path="../../etc/passwd"),
            "row 1: image path '../../etc/passwd' contains '..'",
        ),
    ],
)
def test_malformed_mmeb_rows_are_named(sample, change, message):
    rewrite_mmeb(sample, "MiniShapes-Cls", change)
    with pytest.raises(EvaluationDataError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        read_mmeb(sample / "eval/mmeb", sample, MMEB_DATASETS)


def test_missing_columns_and_unknown_datasets_are_named(sample):
    path = sample / "eval/mmeb/MiniShapes-Count/test.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["tgt_img_path"]), path)
    with pytest.raises(
        EvaluationDataError, match=r"MiniShapes-Count: test.parquet has no column\(s\) \['tgt_img_path'\]"
    ):
        read_mmeb(sample / "eval/mmeb", sample, MMEB_DATASETS)
    with pytest.raises(EvaluationDataError, match=r"unknown meta-task\(s\) \['grounding'\]"):
        read_mmeb(sample / "eval/mmeb", sample, {**MMEB_DATASETS, "MiniShapes-Grounding": "grounding"})
    (sample / "eval/mmeb/Mystery").mkdir()
    with pytest.raises(EvaluationDataError, match=r"no meta-task for dataset\(s\) \['Mystery'\]"):
        read_mmeb(sample / "eval/mmeb", sample, MMEB_DATASETS)
