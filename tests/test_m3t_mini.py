"""The M3T-mini generator: determinism, file schemas, and answers that follow the pixels."""

from __future__ import annotations

import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from muco_flow.sample.m3t_mini import (
    BACKGROUNDS,
    MBEIR_TASKS,
    QUERY_PHRASINGS,
    SHAPE_COLOURS,
    MiniSampleConfig,
    generate_m3t_mini,
)
from tests.conftest import SMALL_SAMPLE

# The published M3T columns and nothing else (naver-ai/muco src/loader.py
# lines 205-307 read them), written out independently of muco_flow.data.schema.
M3T_COLUMNS = {
    "qry": pa.list_(pa.list_(pa.string())),
    "qry_image_path": pa.string(),
    "pos_text": pa.list_(pa.string()),
    "pos_image_path": pa.string(),
    "pos_sentence": pa.list_(pa.string()),
    "neg_text": pa.list_(pa.string()),
    "qry_sentence": pa.string(),
}
# TIGER-Lab/MMEB-eval (v1) and ziyjiang/MMEB_Test_Instruct (VLM2Vec v1
# eval.py lines 84-97; naver-ai/muco src/data/eval_dataset/image_cls_dataset.py line 20)
MMEB_V1_COLUMNS = {
    "qry_text": pa.string(),
    "qry_img_path": pa.string(),
    "tgt_text": pa.list_(pa.string()),
    "tgt_img_path": pa.list_(pa.string()),
}
MMEB_INSTRUCT_COLUMNS = {"qry_inst": pa.string(), **MMEB_V1_COLUMNS, "tgt_inst": pa.string()}
MMEB_FILES = {
    "MiniShapes-Cls": "test/0000.parquet",
    "MiniShapes-Count": "test/0000.parquet",
    "MiniShapes-Color": "test-00000-of-00001.parquet",
    "MiniShapes-I2T": "test-00000-of-00001.parquet",
    "MiniShapes-T2I": "test/0000.parquet",
    "MiniShapes-Grounding": "test/0000.parquet",
}


def read_table(files: dict[str, bytes], name: str) -> pa.Table:
    return pq.read_table(io.BytesIO(files[name]))


def image(files: dict[str, bytes], name: str) -> Image.Image:
    return Image.open(io.BytesIO(files[name])).convert("RGB")


def background_name(img: Image.Image) -> str:
    # Shapes sit inside their quadrant with a margin, so a corner is background.
    return {rgb: name for name, rgb in BACKGROUNDS.items()}[img.getpixel((0, 0))]


def dominant_shape_colour(img: Image.Image) -> str:
    by_rgb = {rgb: name for name, rgb in SHAPE_COLOURS.items()}
    counts = Counter(by_rgb[p] for p in img.get_flattened_data() if p in by_rgb)
    return counts.most_common(1)[0][0]


def test_same_seed_gives_byte_identical_files(small_sample_files):
    again = generate_m3t_mini(SMALL_SAMPLE)
    assert again.keys() == small_sample_files.keys()
    assert all(again[name] == small_sample_files[name] for name in again)


def test_another_seed_gives_different_images_and_text(small_sample_files):
    other = generate_m3t_mini(MiniSampleConfig(**{**SMALL_SAMPLE.__dict__, "seed": SMALL_SAMPLE.seed + 1}))
    assert other["M3T_train/M3T.parquet"] != small_sample_files["M3T_train/M3T.parquet"]
    differing = [n for n in other if n.endswith(".png") and other[n] != small_sample_files.get(n)]
    assert len(differing) > 0.8 * sum(n.endswith(".png") for n in other)


@pytest.mark.parametrize("meta_file, rows", [("M3T_train/M3T.parquet", 24), ("M3T_heldout/M3T.parquet", 6)])
def test_m3t_meta_file_follows_the_published_layout(small_sample_files, meta_file, rows):
    table = read_table(small_sample_files, meta_file)
    assert {f.name: f.type for f in table.schema} == M3T_COLUMNS
    assert table.num_rows == rows
    for row in table.to_pylist():
        assert len(row["qry"]) == 7 and all(len(phrasings) >= 2 for phrasings in row["qry"])
        # every phrasing opens with the image marker, as the published ones do
        assert all(p.startswith("<|image_1|>\n") for phrasings in row["qry"] for p in phrasings)
        for column in ("pos_text", "pos_sentence", "neg_text"):
            assert len(row[column]) == 7
        assert row["pos_image_path"] == ""
        assert all(text.strip() for text in row["pos_text"] + row["pos_sentence"] + row["neg_text"])
        assert all(pos != neg for pos, neg in zip(row["pos_text"], row["neg_text"], strict=True))
        img = image(small_sample_files, row["qry_image_path"])
        assert all(112 <= side <= 224 for side in img.size)


def test_answers_follow_what_is_drawn(small_sample_files):
    table = read_table(small_sample_files, "M3T_train/M3T.parquet")
    for row in table.to_pylist():
        img = image(small_sample_files, row["qry_image_path"])
        # turn 2 asks for the background, turn 0 for the main (largest) object
        assert row["pos_text"][2] == background_name(img)
        assert row["pos_text"][0].split()[0] == dominant_shape_colour(img)
        assert f"on a {background_name(img)} background" in row["qry_sentence"]


def test_mmeb_sets_follow_both_published_layouts_with_the_answer_first(small_sample_files):
    images = "eval/mmeb/images/"
    for dataset, file in MMEB_FILES.items():
        table = read_table(small_sample_files, f"eval/mmeb/{dataset}/{file}")
        expected = MMEB_INSTRUCT_COLUMNS if file.startswith("test/") else MMEB_V1_COLUMNS
        assert {f.name: f.type for f in table.schema} == expected
        assert table.num_rows == SMALL_SAMPLE.eval_queries_per_dataset
        for row in table.to_pylist():
            # Small answer spaces (four counts) give fewer candidates than asked for.
            assert len(row["tgt_text"]) == len(row["tgt_img_path"])
            assert 2 <= len(row["tgt_text"]) <= SMALL_SAMPLE.eval_candidates
            assert len(set(zip(row["tgt_text"], row["tgt_img_path"], strict=True))) == len(row["tgt_text"])
            for path in [row["qry_img_path"], *row["tgt_img_path"]]:
                assert not path or images + path in small_sample_files

    # The first candidate is correct, checked against the pixels.
    def rows(dataset):
        return read_table(small_sample_files, f"eval/mmeb/{dataset}/{MMEB_FILES[dataset]}").to_pylist()

    for row in rows("MiniShapes-Cls"):
        colour = dominant_shape_colour(image(small_sample_files, images + row["qry_img_path"]))
        assert row["tgt_text"][0].split()[0] == colour
    for row in rows("MiniShapes-T2I"):
        bg = background_name(image(small_sample_files, images + row["tgt_img_path"][0]))
        assert f"on a {bg} background" in row["qry_text"]
    for row in rows("MiniShapes-Grounding"):
        colour = dominant_shape_colour(image(small_sample_files, images + row["tgt_img_path"][0]))
        assert row["qry_text"].startswith(f"{colour} ")
    # v1 folds the instruction into the text, with the image marker, as TIGER-Lab/MMEB-eval does
    for row in rows("MiniShapes-Color"):
        assert row["qry_text"].startswith(
            "<|image_1|>\nRepresent the given image with the following question: What color is the shape in the "
        )
        assert row["qry_text"].endswith("?\n")


def test_the_mbeir_download_has_uniirs_layout_and_tasks(small_sample_files):
    def jsonl(name):
        return [json.loads(line) for line in small_sample_files[f"eval/mbeir/{name}"].decode().splitlines()]

    pools = {task: jsonl(f"cand_pool/local/mbeir_{task}_cand_pool.jsonl") for task in MBEIR_TASKS}
    union = jsonl("cand_pool/global/mbeir_union_test_cand_pool.jsonl")
    assert union == [c for pool in pools.values() for c in pool]
    assert len({c["did"] for c in union}) == len(union)
    for c in union:
        assert list(c) == ["txt", "img_path", "modality", "did", "src_content"]
        assert c["img_path"] is None or c["img_path"].startswith("mbeir_images/")

    def image_bytes(path):
        return small_sample_files[f"eval/mbeir/{path}"]

    pool_texts = {c["txt"] for c in union if c["txt"]}
    pool_images = {image_bytes(c["img_path"]) for c in union if c["img_path"]}
    header, *rows = small_sample_files["eval/mbeir/instructions/query_instructions.tsv"].decode().splitlines()
    assert header.split("\t")[:4] == ["query_modality", "cand_modality", "dataset_name", "dataset_id"]
    keys = {tuple(row.split("\t")[:2]) for row in rows}
    for task, pool in pools.items():
        queries = jsonl(f"query/test/mbeir_{task}_test.jsonl")
        assert len(queries) == SMALL_SAMPLE.eval_queries_per_dataset
        by_did = {c["did"]: c for c in pool}
        for q in queries:
            assert list(q) == [
                "qid", "query_txt", "query_img_path", "query_modality", "query_src_content", "pos_cand_list",
                "neg_cand_list", "task_id",
            ]  # fmt: skip
            assert q["task_id"] == int(task.removeprefix("minishapes_task"))
            assert q["pos_cand_list"] and all(did in by_did for did in q["pos_cand_list"])
            assert (q["query_modality"], by_did[q["pos_cand_list"][0]]["modality"]) in keys
            assert q["query_img_path"] is None or f"eval/mbeir/{q['query_img_path']}" in small_sample_files
            # no query is an item of the global pool: it would be its own best match
            assert q["query_txt"] not in pool_texts
            assert q["query_img_path"] is None or image_bytes(q["query_img_path"]) not in pool_images
    # the image -> text task asks as M3T's retrieval turn, which training teaches
    assert any(row.split("\t")[4:7] == list(QUERY_PHRASINGS[6]) for row in rows)


def test_evaluation_images_are_never_training_images(small_sample_files):
    train = read_table(small_sample_files, "M3T_train/M3T.parquet").column("qry_image_path").to_pylist()
    train_pixels = {image(small_sample_files, p).tobytes() for p in train}
    held = [n for n in small_sample_files if n.startswith(("images/eval/", "images/heldout/"))]
    assert held and not any(image(small_sample_files, n).tobytes() in train_pixels for n in held)


@pytest.mark.parametrize(
    "field, value", [("train_images", 0), ("heldout_images", -1), ("eval_candidates", 1), ("eval_candidates", 100)]
)
def test_bad_sizes_are_rejected_with_the_field_named(field, value):
    with pytest.raises(ValueError, match=field):
        MiniSampleConfig(**{field: value})
