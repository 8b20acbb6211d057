"""The published formats, built here by hand from their public sources (not by muco-flow's writers).

- M3T rows as naver-ai/muco ``src/loader.py`` reads them (lines 205-307): pandas writes
  the lists as numpy arrays; no id column; phrasings carry ``<|image_1|>``.
- MMEB files as downloaded from TIGER-Lab/MMEB-eval (v1) and ziyjiang/MMEB_Test_Instruct,
  in the Hugging Face layout, with MuCo's texts (``eval_mmeb.py`` lines 79-90 and
  ``src/data/eval_dataset/image_*.py``) written out by hand.
- VLM2Vec's hit@1 (branch v1 ``eval.py`` lines 157-167, ``evaluation/eval_utils.py``
  lines 6-17) as a slow reference.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from muco_flow.data.conversations import FormatConfig
from muco_flow.data.formatting import assemble_conversations, format_m3t_shards
from muco_flow.data.ingest import IngestConfig
from muco_flow.data.m3t_ingest import ingest_m3t_snapshot
from muco_flow.data.shards import read_shard
from muco_flow.data.sources import LocalSnapshot
from muco_flow.evaluation.datasets import Item, RetrievalSet
from muco_flow.evaluation.encoded_pool import InMemoryPool
from muco_flow.evaluation.mmeb import read_mmeb
from muco_flow.evaluation.scoring import mmeb_hits
from muco_flow.modeling.backbone import load_processors
from muco_flow.modeling.inputs import build_model_inputs
from muco_flow.modeling.prompt import single_turn_text
from tests.conftest import load_params

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def base(user: str) -> str:
    """naver-ai/muco TEMPLATE_BASE (src/loader.py lines 34-39), written out."""
    return f"{SYSTEM}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>"


def save_png(path: Path, size=(64, 48), colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


# --- M3T -------------------------------------------------------------------------

PHRASINGS = [
    ["<|image_1|>\nWhat is the main object?", "<|image_1|>\nName the main object."],
    ["<|image_1|>\nHow many shapes?"],
    ["<|image_1|>\nWhat color is the background?"],
    ["<|image_1|>\nWhat is in the top left?"],
    ["<|image_1|>\nWhat shape is in the top left?"],
    ["<|image_1|>\nGive the picture a title."],
    ["<|image_1|>\nFind a caption for this image."],
]
ANSWERS = ["red circle", "two", "white", "red", "circle", "a red sun", "A red circle on white."]


@pytest.fixture(scope="module")
def published_m3t(tmp_path_factory) -> Path:
    """Three rows in the published columns, one without an image, written by pandas as M3T is."""
    root = tmp_path_factory.mktemp("m3t")
    save_png(root / "images/coco/000001.jpg")
    save_png(root / "images/coco/000002.jpg", colour=(20, 30, 200))
    rows = []
    for image in ("images/coco/000001.jpg", "images/coco/000002.jpg", ""):
        rows.append(
            {
                "qry": np.array([np.array(p, dtype=object) for p in PHRASINGS], dtype=object),
                "qry_image_path": image,
                "pos_text": np.array(ANSWERS, dtype=object),
                "pos_image_path": "",
                "pos_sentence": np.array([f"The answer is {a}." for a in ANSWERS], dtype=object),
                "neg_text": np.array(["blue square", "three", "black", "blue", "square", "a moon", "Night."]),
                "qry_sentence": "A red circle on a white background.",
            }
        )
    (root / "M3T_train").mkdir()
    pd.DataFrame(rows).to_parquet(root / "M3T_train/M3T.parquet")
    return root


@pytest.fixture(scope="module")
def ingested_m3t(published_m3t, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingested")
    config = IngestConfig.from_params(load_params()["ingest"])  # the defaults
    manifest = ingest_m3t_snapshot(LocalSnapshot(published_m3t, "M3T_train/M3T.parquet"), out, config)
    return out, manifest


def test_published_m3t_rows_are_all_accepted_with_the_default_settings(ingested_m3t):
    out, manifest = ingested_m3t
    assert manifest["counts"] == {"read": 3, "accepted": 3, "rejected": 0}
    rows = pq.read_table(out / manifest["shards"][0]["file"]).to_pylist()
    assert [len(r["qry"]) for r in rows] == [7, 7, 7] and rows[0]["qry"][0] == PHRASINGS[0]
    assert [r["image_bytes"] is None for r in rows] == [False, False, True]
    assert len({r["sample_id"] for r in rows}) == 3


def test_published_m3t_conversations_decode_to_muco_pretraining_text(ingested_m3t, tiny_backbone_dir, tmp_path):
    out, _ = ingested_m3t
    tokenizer, image_processor = load_processors(str(tiny_backbone_dir))
    # the fixed order and, with one phrasing per turn but the first, a known text; the official text
    # exactly (no newline added to the user texts)
    params = {
        **load_params()["format"],
        "shuffle_turns": False,
        "target_layout": "conversation",
        "user_text_newline": False,
    }
    manifest = format_m3t_shards(out, tmp_path, tokenizer, image_processor, FormatConfig.from_params(params))
    records = read_shard(tmp_path / manifest["shards"][0]["file"]).to_pylist()
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def decoded(record):
        (conversation,) = assemble_conversations(record, 0, manifest["settings"], image_pad)
        query = re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", tokenizer.decode(conversation.query_ids))
        return query, tokenizer.decode(conversation.target_ids[0]), conversation

    query, target, conversation = decoded(records[0])
    assert conversation.turn_index == [0, 1, 2, 3, 4, 5, 6]
    first = next(p for p in PHRASINGS[0] if p[len("<|image_1|>\n") :] in query)  # whichever phrasing was drawn
    # TEMPLATE_PRETRAIN (src/loader.py lines 101-130) with the first turn's <|image_1|> made the vision block
    # and "<|image_1|>\n" dropped from the others (lines 263-273)
    assert query == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\n{first[len('<|image_1|>') + 1 :]}<|im_end|>\n"
        "<|im_start|>assistant\n<|emb|><|im_end|>\n"
        "<|im_start|>user\nHow many shapes?<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>\n"
        "<|im_start|>user\nWhat color is the background?<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>\n"
        "<|im_start|>user\nWhat is in the top left?<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>\n"
        "<|im_start|>user\nWhat shape is in the top left?<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>\n"
        "<|im_start|>user\nGive the picture a title.<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>\n"
        "<|im_start|>user\nFind a caption for this image.<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>"
    )
    assert target == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nred circle<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>\n"
        "<|im_start|>user\ntwo<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>\n"
        "<|im_start|>user\nwhite<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>\n"
        "<|im_start|>user\nred<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>\n"
        "<|im_start|>user\ncircle<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>\n"
        "<|im_start|>user\na red sun<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>\n"
        "<|im_start|>user\nA red circle on white.<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>"
    )
    # without an image the vision block goes and the first turn keeps the newline after it (lines 289-291)
    query, _, _ = decoded(records[2])
    assert query.startswith(f"{SYSTEM}<|im_start|>user\n\n")
    assert "<|vision_start|>" not in query and "<|image_1|>" not in query


# --- MMEB ------------------------------------------------------------------------

# (dataset, layout file, rows, expected query and first-candidate user texts, images?)
V1_CLS = {
    "qry_text": ["<|image_1|>\nRepresent the given image for classification\n"],
    "qry_img_path": ["ImageNet-1K/n01818515_1.JPEG"],
    "tgt_text": [["Italian greyhound", "coucal", "Italian greyhound"]],
    "tgt_img_path": [["", "", ""]],
}
INSTRUCT_T2I = {
    "qry_inst": ["Find me an everyday image that matches the given caption:"],
    "qry_text": ["A man with a red helmet on a small moped on a dirt road."],
    "qry_img_path": [""],
    "tgt_inst": ["<|image_1|>\nRepresent the given image."],
    "tgt_text": [["", ""]],
    "tgt_img_path": [["MSCOCO_t2i/COCO_val2014_000000391895.jpg", "MSCOCO_t2i/COCO_val2014_000000000042.jpg"]],
}
INSTRUCT_QA = {
    "qry_inst": ["<|image_1|>\nRepresent the given image with the following question: "],
    "qry_text": ["What sport can you use this for?"],
    "qry_img_path": ["OK-VQA/val2014/COCO_val2014_000000000074.jpg"],
    "tgt_inst": [""],
    "tgt_text": [["racing", "surfing"]],
    "tgt_img_path": [["", ""]],
}
INSTRUCT_VG = {
    "qry_inst": ["<|image_1|>\nSelect the portion of the image that isolates the object labeled as"],
    "qry_text": ['"a red helmet"'],
    "qry_img_path": ["MSCOCO/COCO_val2014_000000391895.jpg"],
    "tgt_inst": ["<|image_1|>\nRepresent the given cropped image of the object"],
    "tgt_text": [["", ""]],
    "tgt_img_path": [["MSCOCO/crops/1.jpg", "MSCOCO/crops/2.jpg"]],
}
DATASETS = {
    "ImageNet-1K": {"meta_task": "classification", "parser": "image_cls"},
    "MSCOCO_t2i": {"meta_task": "retrieval", "parser": "image_t2i"},
    "OK-VQA": {"meta_task": "vqa", "parser": "image_qa"},
    "MSCOCO": {"meta_task": "visual_grounding", "parser": "image_i2i_vg"},
}


@pytest.fixture(scope="module")
def mmeb_download(tmp_path_factory) -> tuple[Path, Path]:
    """A Hugging Face download: v1 and Instruct files, a hidden cache, an unzipped images folder, CIFAR-100."""
    root = tmp_path_factory.mktemp("MMEB")
    images = root / "images"
    for table in (V1_CLS, INSTRUCT_T2I, INSTRUCT_QA, INSTRUCT_VG):
        for path in [*table["qry_img_path"], *(p for paths in table["tgt_img_path"] for p in paths)]:
            if path:
                save_png(images / path)
    files = {
        "ImageNet-1K/test-00000-of-00001.parquet": V1_CLS,  # main branch
        "MSCOCO_t2i/test/0000.parquet": INSTRUCT_T2I,  # refs/convert/parquet
        "OK-VQA/test/0000.parquet": INSTRUCT_QA,
        "MSCOCO/test-00000-of-00001.parquet": INSTRUCT_VG,
        "CIFAR-100/test-00000-of-00001.parquet": {"qry_text": ["x"]},  # in the download, scored by nobody
        ".cache/huggingface/download/ImageNet-1K/test-00000-of-00001.parquet.metadata": None,
    }
    for name, table in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if table is None:
            (root / name).write_text("hf cache entry")
        else:
            pd.DataFrame(table).to_parquet(root / name)
    return root, images


def test_both_mmeb_layouts_are_read_from_a_download_and_extras_are_left_alone(mmeb_download):
    root, images = mmeb_download
    sets = {s.name: s for s in read_mmeb(root, images, {**DATASETS, "VisDial": DATASETS["MSCOCO_t2i"]})}
    assert sorted(sets) == ["ImageNet-1K", "MSCOCO", "MSCOCO_t2i", "OK-VQA"]  # no VisDial folder: skipped
    assert [len(s.queries) for s in sets.values()] == [1, 1, 1, 1]
    # the duplicate "Italian greyhound" is one candidate, ranked once
    assert sets["ImageNet-1K"].candidate_lists == [[0, 1]]


EXPECTED_TEXTS = {
    # v1: the text as published, normalised by eval_mmeb.py lines 82-90
    "ImageNet-1K": (
        base(f"{VISION}\nRepresent the given image for classification\n"),
        base("Italian greyhound\n"),
    ),
    # image_t2i_eval.py lines 18-38
    "MSCOCO_t2i": (
        base(
            "Find me an everyday image that matches the given caption: "
            "A man with a red helmet on a small moped on a dirt road.\n"
        ),
        base(f"{VISION}\nRepresent the given image.\n"),
    ),
    # image_qa_dataset.py lines 17-24
    "OK-VQA": (
        base(f"{VISION}\nRepresent the given image with the following question: What sport can you use this for?\n"),
        base("racing\n"),
    ),
    # image_i2i_vg_dataset.py lines 17-38; the candidate's newline is added by eval_mmeb.py line 83
    "MSCOCO": (
        base(f'{VISION}\nSelect the portion of the image that isolates the object labeled as "a red helmet"\n'),
        base(f"{VISION}\nRepresent the given cropped image of the object\n"),
    ),
}


@pytest.mark.parametrize("dataset", EXPECTED_TEXTS)
def test_mmeb_items_are_encoded_as_muco_encodes_them(mmeb_download, tiny_backbone_dir, dataset):
    root, images = mmeb_download
    (retrieval_set,) = read_mmeb(root, images, {dataset: DATASETS[dataset]})
    template = FormatConfig.from_params(load_params()["format"]).templates.single_turn()
    assert template == base("{text}")
    tokenizer, image_processor = load_processors(str(tiny_backbone_dir))
    query, candidate = retrieval_set.queries[0], retrieval_set.candidates[0]
    for item, expected in zip((query, candidate), EXPECTED_TEXTS[dataset], strict=True):
        text = single_turn_text(item.text, item.image is not None, template)
        assert text == expected
        # and the tokens decode to it, the image's patches in place of its one <|image_pad|>
        image = Image.open(images / item.image).convert("RGB") if item.image else None
        ids = build_model_inputs(tokenizer, image_processor, [text], [image])["input_ids"][0].tolist()
        assert re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", tokenizer.decode(ids)) == expected


# --- VLM2Vec's hit@1 ---------------------------------------------------------------


def vlm2vec_hit(query: np.ndarray, candidates: list[np.ndarray]) -> bool:
    """get_pred + `pred == 0`, written as slowly as possible: the first maximum must be candidate 0."""
    scores = [float(np.dot(c, query)) for c in candidates]
    best = 0
    for i, score in enumerate(scores):
        if score > scores[best]:
            best = i
    return best == 0


class FixedVectors:
    """An encoder stand-in: one given vector per item (the scorer, not the model, is under test)."""

    def __init__(self, vectors: dict[Item, list[float]]) -> None:
        self.table = vectors

    def vectors(self, items, root):
        return torch.tensor([self.table[item] for item in items], dtype=torch.float32)

    def pool(self, items, root):
        return InMemoryPool(self.vectors(items, root))


@pytest.mark.parametrize(
    "case",
    [
        # (query, [candidate vectors in the row's order, the correct one first])
        ([1.0, 0.0], [[1.0, 0.0], [0.0, 1.0]]),  # plainly right
        ([1.0, 0.0], [[0.5, 0.5], [1.0, 0.0]]),  # plainly wrong
        ([1.0, 0.0], [[1.0, 0.0], [1.0, 0.0]]),  # a tie with another candidate: VLM2Vec gives it to the first
        ([1.0, 0.0], [[0.9, 0.1], [1.0, 0.0], [0.9, 0.1]]),  # wrong, whatever the duplicate
    ],
)
def test_mmeb_hit_at_1_equals_vlm2vec(case):
    query, candidates = case
    items = [Item(f"candidate {i}") for i in range(len(candidates))]
    table = {Item("query"): query, **{item: v for item, v in zip(items, candidates, strict=True)}}
    retrieval_set = RetrievalSet("hand", "classification", Path("."), queries=[Item("query")], candidates=items)
    retrieval_set.candidate_lists.append(list(range(len(items))))
    retrieval_set.positives.append([0])
    hits, ranks = mmeb_hits(retrieval_set, FixedVectors(table))
    assert hits == [vlm2vec_hit(np.array(query), [np.array(c) for c in candidates])]
    # the strict figure counts a tie against the correct candidate
    assert (ranks[0] == 1) == (hits[0] and all(np.dot(c, query) < np.dot(candidates[0], query) for c in candidates[1:]))


def test_exact_duplicates_of_the_answer_share_one_vector_and_still_hit(mmeb_download):
    """Row ["Italian greyhound", "coucal", "Italian greyhound"]: VLM2Vec looks both copies up by (text, path)."""
    root, images = mmeb_download
    (retrieval_set,) = read_mmeb(root, images, {"ImageNet-1K": DATASETS["ImageNet-1K"]})
    greyhound, coucal = retrieval_set.candidates
    query = retrieval_set.queries[0]
    vectors = {query: [1.0, 0.0], greyhound: [0.6, 0.8], coucal: [0.6, 0.8]}
    hits, ranks = mmeb_hits(retrieval_set, FixedVectors(vectors))
    reference = vlm2vec_hit(np.array([1.0, 0.0]), [np.array(vectors[c]) for c in (greyhound, coucal, greyhound)])
    assert hits == [reference] == [True] and ranks == [2]
