"""Evaluation readers: the sample's sets load; malformed files name dataset, row and problem."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muco_flow.evaluation.datasets import EvaluationDataError, Item, read_m3t_heldout
from muco_flow.evaluation.mmeb import read_mmeb
from muco_flow.sample.m3t_mini import MMEB_DATASETS, MMEB_DIR, MMEB_IMAGE_ROOT

DATASETS = {name: {"meta_task": d["meta_task"], "parser": d["parser"]} for name, d in MMEB_DATASETS.items()}


@pytest.fixture
def sample(small_sample_root, tmp_path):
    root = tmp_path / "sample"
    shutil.copytree(small_sample_root, root)
    return root


def mmeb(root, datasets=None):
    return read_mmeb(root / MMEB_DIR, root / MMEB_IMAGE_ROOT, datasets or DATASETS)


def rewrite_mmeb(root, dataset, change):
    (path,) = (root / MMEB_DIR / dataset).rglob("*.parquet")
    rows = pq.read_table(path).to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_the_samples_sets_load(sample):
    sets = mmeb(sample)
    assert {s.name: s.group for s in sets} == {name: d["meta_task"] for name, d in DATASETS.items()}
    count = next(s for s in sets if s.name == "MiniShapes-Count")
    assert len(count.candidates) == 4  # "one".."four": every query's candidates, encoded once
    t2i = next(s for s in sets if s.name == "MiniShapes-T2I")
    assert all(c.image and c.text == "<|image_pad|>\nRepresent the given image.\n" for c in t2i.candidates)
    turns = read_m3t_heldout(sample / "M3T_heldout/M3T.parquet", sample)
    assert [s.group for s in turns] == ["classification", "global_vqa", "local_vqa", "creative_vqa", "retrieval"]
    assert sum(len(s.queries) for s in turns) == 6 * 7
    assert all(q.text.startswith("<|image_1|>\n") and q.image for s in turns for q in s.queries)


def test_duplicate_candidates_are_merged(sample):
    def change(rows):
        rows[0]["tgt_text"] = [rows[0]["tgt_text"][0], *rows[0]["tgt_text"][:2]]  # the correct one twice
        rows[0]["tgt_img_path"] = [""] * 3

    rewrite_mmeb(sample, "MiniShapes-Cls", change)
    dataset = next(s for s in mmeb(sample) if s.name == "MiniShapes-Cls")
    assert len(dataset.candidate_lists[0]) == 2  # distinct: the duplicate of the answer counts once


def test_an_empty_candidate_string_is_scored_as_an_empty_text(sample):
    """As MuCo's and VLM2Vec's evaluations do (their process_fn tokenizes "" like any text)."""

    def change(rows):
        rows[0]["tgt_text"] = ["", *rows[0]["tgt_text"][1:]]  # the correct answer is blank
        rows[1]["tgt_text"] = [rows[1]["tgt_text"][0], "   ", *rows[1]["tgt_text"][2:]]

    rewrite_mmeb(sample, "MiniShapes-Cls", change)
    dataset = next(s for s in mmeb(sample) if s.name == "MiniShapes-Cls")
    blank = [i for i, c in enumerate(dataset.candidates) if not c.text.strip()]
    assert [dataset.candidates[i] for i in blank] == [Item(""), Item("   ")]
    assert dataset.positives[0] == [blank[0]] and blank[0] in dataset.candidate_lists[0]
    assert blank[1] in dataset.candidate_lists[1] and dataset.positives[1] != [blank[1]]


def test_a_v1_query_with_neither_text_nor_image_is_refused(sample):
    def change(rows):
        for row in rows:
            del row["qry_inst"], row["tgt_inst"]  # the v1 layout: texts as written
        rows[4].update(qry_text="<|image_1|>\n ", qry_img_path="")

    rewrite_mmeb(sample, "MiniShapes-Cls", change)
    with pytest.raises(EvaluationDataError, match=r"MiniShapes-Cls, 0000\.parquet row 4: the query has neither"):
        mmeb(sample)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda rows: rows[3].update(tgt_text=[], tgt_img_path=[]),
            "MiniShapes-Cls, 0000.parquet row 3: the candidate list is empty",
        ),
        (
            lambda rows: rows[5].update(qry_img_path="MiniShapes/missing.png"),
            "row 5: image 'MiniShapes/missing.png' not found",
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
        mmeb(sample)


def test_missing_columns_parsers_and_datasets_are_named(sample):
    path = rewrite_mmeb(sample, "MiniShapes-Count", lambda rows: None)
    pq.write_table(pq.read_table(path).drop_columns(["tgt_img_path"]), path)
    with pytest.raises(
        EvaluationDataError, match=r"MiniShapes-Count: 0000.parquet has no column\(s\) \['tgt_img_path'\]"
    ):
        mmeb(sample)
    with pytest.raises(EvaluationDataError, match=r"unknown meta-task\(s\) \['grounding'\]"):
        mmeb(sample, {**DATASETS, "MiniShapes-Grounding": {"meta_task": "grounding", "parser": "image_i2i_vg"}})
    with pytest.raises(EvaluationDataError, match=r"MiniShapes-Cls: 0000.parquet is in the Instruct layout.*parser"):
        mmeb(sample, {**DATASETS, "MiniShapes-Cls": {"meta_task": "classification", "parser": "cls"}})
    with pytest.raises(EvaluationDataError, match=r"none of the configured datasets is in .*MiniShapes-Cls"):
        mmeb(sample, {"ImageNet-1K": {"meta_task": "classification", "parser": "image_cls"}})
