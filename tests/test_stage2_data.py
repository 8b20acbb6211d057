"""Stage-2 data: MMEB-train rows in, MuCo's stage-2 conversations out.

The fixtures are MMEB-train files built by hand with pandas in the shape
naver-ai/muco's loader reads (src/loader.py lines 241-261): list columns as
numpy arrays, and lists written as strings. The expected conversations are
written out by hand from the official TEMPLATE_TRAIN and TEMPLATE_BASE
(src/loader.py lines 34-54), not produced by muco-flow's own templates.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from muco_flow.data import mmeb_train
from muco_flow.data.ingest import IngestConfig
from muco_flow.data.mmeb_train_conversations import (
    FinetuneFormatConfig,
    MaskConfig,
    MaskDraw,
    answer_words,
    draw_masks,
    masked_answer,
    plan_sample,
    stage2_texts,
)
from muco_flow.data.mmeb_train_formatting import assemble_finetune_sample, format_mmeb_train_shards
from muco_flow.data.mmeb_train_ingest import (
    REJECT_REASONS_MMEB_TRAIN,
    ingest_mmeb_train,
    open_meta_parts,
    parse_text_list,
    validate_mmeb_train_row,
)
from muco_flow.data.row_checks import Reject
from muco_flow.data.shards import read_shard
from muco_flow.modeling import tokens
from muco_flow.modeling.backbone import load_processors
from muco_flow.training.config import DataMixSettings
from muco_flow.training.data import ConversationBatches, epoch_counts, epoch_units
from tests.conftest import load_params

VISION = "<|vision_start|><|image_pad|><|vision_end|>"
MASK = "<|mask|>"


def train_conversation(user: str, answer: str) -> str:
    """naver-ai/muco TEMPLATE_TRAIN (src/loader.py lines 41-54), written out: no <|im_end|> after "language."."""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>\n"
        "<|im_start|>user\nPlease rewrite your last response in human-readable language.\n"
        f"<|im_start|>assistant\n{answer}<|im_end|>\n"
        "<|im_start|>user\nGenerate a response that first reconstructs your very last response by inferring any "
        "masked information, then acknowledges or rephrases the complete what I asked you, and finally integrates "
        "the Answer information seamlessly.<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>"
    )


def base_conversation(user: str) -> str:
    """TEMPLATE_BASE (src/loader.py lines 34-39)."""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>"
    )


def png(colour: tuple[int, int, int], size: tuple[int, int] = (56, 84)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


# Rows as MMEB-train has them, one per kind of set: classification, VQA, image-to-text, text-to-image.
CLS_ROW = {
    "qry": "<|image_1|>\nRepresent the given image for classification\n",
    "qry_image_path": "images/ImageNet_1K/Train/red.png",
    "pos_text": "red square",
    "pos_image_path": "",
    "neg_text": np.array(["blue circle", "green square"], dtype=object),
    "neg_image_path": np.array([""], dtype=object),
    "qry_sentence": "A red square.",
    "pos_sentence": "The object is a red square.",
}
VQA_ROW = {
    "qry": "<|image_1|>\nRepresent the given image with the following question: What color is it?\n",
    "qry_image_path": "images/OK-VQA/Train/blue.png",
    "pos_text": "blue",
    "pos_image_path": "",
    "neg_text": np.array(["red"], dtype=object),
    "neg_image_path": np.array([""], dtype=object),
    "qry_sentence": "A blue field.",
    "pos_sentence": "It is blue.",
}
T2I_ROW = {
    "qry": "Find me an everyday image that matches the given caption: A green field.",
    "qry_image_path": "",
    "pos_text": "<|image_1|>\nRepresent the given image.\n",
    "pos_image_path": "images/MSCOCO_t2i/Train/green.png",
    "neg_text": np.array(["<|image_1|>\nRepresent the given image.\n"], dtype=object),
    "neg_image_path": np.array(["images/MSCOCO_t2i/Train/red.png"], dtype=object),
    "qry_sentence": "",
    "pos_sentence": "A green field.",
}
# the same kinds with the lists written as strings, as MuCo's files may hold them (its loader eval()s them)
I2T_ROW_STRINGS = {
    "qry": "<|image_1|>\nFind a caption for the news in the given photo.\n",
    "qry_image_path": "images/VisualNews_i2t/Train/blue.png",
    "pos_text": "Blue skies over the city.",
    "pos_image_path": "",
    "neg_text": "['Rain over the harbour.', \"A storm's eye.\"]",
    "neg_image_path": "['']",
    "qry_sentence": "A plain blue picture.",
    "pos_sentence": "Blue skies over the city.",
}
T2I_ROW_STRINGS = {
    **T2I_ROW,
    "neg_text": '["<|image_1|>\\nRepresent the given image.\\n"]',
    "neg_image_path": '["images/MSCOCO_t2i/Train/blue.png"]',
}
NO_NEGATIVE_ROW = {k: v for k, v in VQA_ROW.items() if not k.startswith("neg_")}

IMAGES = {
    "images/ImageNet_1K/Train/red.png": png((220, 30, 30)),
    "images/OK-VQA/Train/blue.png": png((30, 30, 220)),
    "images/MSCOCO_t2i/Train/green.png": png((30, 200, 30), (84, 56)),
    "images/MSCOCO_t2i/Train/red.png": png((220, 30, 30), (84, 56)),
    "images/MSCOCO_t2i/Train/blue.png": png((30, 30, 220), (84, 56)),
    "images/VisualNews_i2t/Train/blue.png": png((30, 30, 220)),
}


def write_snapshot(root: Path, datasets: dict[str, list[dict]]) -> Path:
    for path, data in IMAGES.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    for name, rows in datasets.items():
        folder = root / "MMEB_train" / name
        folder.mkdir(parents=True)
        pd.DataFrame(rows).to_parquet(folder / f"{name}_generated_sentence.parquet")
    return root


PUBLISHED = {
    "ImageNet_1K": [CLS_ROW],
    "OK-VQA": [VQA_ROW, NO_NEGATIVE_ROW],
    "MSCOCO_t2i": [T2I_ROW],
    "VisualNews_i2t": [I2T_ROW_STRINGS],
    "WebQA": [T2I_ROW_STRINGS],
}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = write_snapshot(tmp_path_factory.mktemp("mmeb-train"), PUBLISHED)
    out = tmp_path_factory.mktemp("ingested")
    config = IngestConfig.from_params(load_params()["finetune_ingest"])
    manifest = ingest_mmeb_train(open_meta_parts(str(root)), out, config)
    return out, manifest


@pytest.fixture(scope="module")
def processors(tiny_backbone_dir):
    return load_processors(str(tiny_backbone_dir))


def finetune_config(**overrides) -> FinetuneFormatConfig:
    params = load_params()["finetune_format"]
    return FinetuneFormatConfig.from_params({**params, **overrides})


def formatted(ingested, processors, tmp_path, config: FinetuneFormatConfig):
    out = tmp_path / f"formatted-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    manifest = format_mmeb_train_shards(ingested[0], out, *processors, config)
    records = [r for s in manifest["shards"] for r in read_shard(out / s["file"]).to_pylist()]
    # by dataset (OK-VQA's two rows: the last, which has no negatives)
    return out, manifest, {r["sample_id"].split("/")[0]: r for r in records}


def decode(tokenizer, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", text)  # one placeholder per image, as written


# --- ingest ------------------------------------------------------------------------------------


def test_published_rows_are_all_accepted_with_every_image_stored(ingested):
    out, manifest = ingested
    assert manifest["counts"] == {"read": 6, "accepted": 6, "rejected": 0}
    assert manifest["schema_version"] == mmeb_train.SCHEMA_VERSION
    assert [m["dataset"] for m in manifest["source"]["meta_files"]] == sorted(PUBLISHED)
    rows = {r["sample_id"]: r for s in manifest["shards"] for r in read_shard(out / s["file"]).to_pylist()}
    by_dataset = {sid.split("/")[0]: r for sid, r in sorted(rows.items(), reverse=True)}
    cls, t2i, i2t, web = (by_dataset[d] for d in ("ImageNet_1K", "MSCOCO_t2i", "VisualNews_i2t", "WebQA"))
    assert cls["neg_text"] == ["blue circle", "green square"] and cls["neg_image_path"] == ["", ""]
    assert cls["image_bytes"] == IMAGES[CLS_ROW["qry_image_path"]] and cls["pos_image_bytes"] is None
    assert t2i["image_bytes"] is None and t2i["pos_image_bytes"] == IMAGES[T2I_ROW["pos_image_path"]]
    assert t2i["neg_image_bytes"] == [IMAGES["images/MSCOCO_t2i/Train/red.png"]]
    assert i2t["neg_text"] == ["Rain over the harbour.", "A storm's eye."]
    assert web["neg_image_bytes"] == [IMAGES["images/MSCOCO_t2i/Train/blue.png"]]
    no_negative = [r for r in rows.values() if r["dataset"] == "OK-VQA" and not r["neg_text"]]
    assert len(no_negative) == 1


def test_lists_written_as_strings_are_parsed_and_never_evaluated(tmp_path):
    marker = tmp_path / "evaluated"
    assert parse_text_list("['a', \"b's\"]", "neg_text") == ["a", "b's"]
    assert parse_text_list('["a\\nb"]', "neg_text") == ["a\nb"]
    assert parse_text_list(np.array(["x", "y"], dtype=object), "neg_text") == ["x", "y"]
    assert parse_text_list("one plain negative", "neg_text") == ["one plain negative"]
    assert parse_text_list("", "neg_text") == [] and parse_text_list(None, "neg_text") == []
    for code in (f"[__import__('pathlib').Path('{marker}').touch()]", "[1, 2]", "['unclosed]"):
        with pytest.raises(Reject) as err:
            parse_text_list(code, "neg_text")
        assert err.value.code == "WRONG_TYPE"
    assert not marker.exists()


BAD_ROWS = {
    "MISSING_FIELD": {**CLS_ROW, "qry": None},
    "WRONG_TYPE": {**CLS_ROW, "qry": ["<|image_1|>\nWhat is it?"]},  # a multi-turn (M3T) row
    "EMPTY_TEXT": {**CLS_ROW, "pos_text": "  "},
    "TEXT_TOO_LONG": {**CLS_ROW, "pos_text": "x" * 2001},
    "SPECIAL_TOKEN_IN_TEXT": {**CLS_ROW, "qry_sentence": "A red <|emb|> square."},
    "IMAGE_PLACEHOLDER": {**CLS_ROW, "qry": "<|image_1|> and <|image_2|>"},
    "NEGATIVE_COUNT_MISMATCH": {
        **CLS_ROW,
        "neg_text": np.array([], dtype=object),
        "neg_image_path": np.array(["x.png"]),
    },
}


@pytest.mark.parametrize("code", sorted(BAD_ROWS))
def test_a_bad_row_gets_its_reason_code(code):
    assert code in REJECT_REASONS_MMEB_TRAIN
    row = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in BAD_ROWS[code].items()}
    with pytest.raises(Reject) as err:
        validate_mmeb_train_row(row, IngestConfig())
    assert err.value.code == code


def test_an_image_side_without_its_description_is_rejected():
    row = {**T2I_ROW, "pos_sentence": ""}
    with pytest.raises(Reject, match="pos_sentence is missing, but the target has an image") as err:
        validate_mmeb_train_row(row, IngestConfig())
    assert err.value.code == "MISSING_FIELD"


def test_bad_rows_and_missing_images_land_in_rejects(tmp_path):
    broken_negative = {**T2I_ROW, "neg_image_path": np.array(["images/none.png"], dtype=object)}
    root = write_snapshot(tmp_path / "snap", {"Set": [CLS_ROW, BAD_ROWS["EMPTY_TEXT"], broken_negative]})
    out = tmp_path / "out"
    out.mkdir()
    manifest = ingest_mmeb_train(open_meta_parts(str(root)), out, IngestConfig())
    assert manifest["counts"] == {"read": 3, "accepted": 1, "rejected": 2}
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert [(r["source_row"], r["reason"]) for r in rejects] == [(1, "EMPTY_TEXT"), (2, "IMAGE_MISSING")]
    assert rejects[1]["message"].startswith("hard negative 0 image: ")
    assert rejects[1]["sample_id"].startswith("Set/000000002-")


# --- conversations -----------------------------------------------------------------------------


def test_unmasked_conversations_decode_to_template_train(ingested, processors, tmp_path):
    tokenizer = processors[0]
    config = finetune_config(mask={"whole_probability": 0.0, "word_probability": 0.0})
    _, manifest, records = formatted(ingested, processors, tmp_path, config)
    assert manifest["counts"]["records"] == 6
    image_pad = tokenizer.convert_tokens_to_ids(tokens.IMAGE_PAD)

    cls = assemble_finetune_sample(records["ImageNet_1K"], 0, manifest["settings"], image_pad)
    assert decode(tokenizer, cls.conversation.query_ids) == train_conversation(
        f"{VISION}\nRepresent the given image for classification\n", "red square\n"
    )
    assert decode(tokenizer, cls.conversation.target_ids[0]) == train_conversation(
        "red square\n", "Image description: A red square.\nRepresent the given image for classification\n"
    )
    assert decode(tokenizer, cls.conversation.negative_ids[0]) in {
        base_conversation("blue circle\n"),
        base_conversation("green square\n"),
    }

    t2i = assemble_finetune_sample(records["MSCOCO_t2i"], 0, manifest["settings"], image_pad)
    caption = "Find me an everyday image that matches the given caption: A green field.\n"
    assert decode(tokenizer, t2i.conversation.query_ids) == train_conversation(
        caption, "Image description: A green field.\nRepresent the given image.\n"
    )
    assert decode(tokenizer, t2i.conversation.target_ids[0]) == train_conversation(
        f"{VISION}\nRepresent the given image.\n", caption
    )
    assert decode(tokenizer, t2i.conversation.negative_ids[0]) == base_conversation(
        f"{VISION}\nRepresent the given image.\n"
    )


def test_a_row_without_negatives_gets_the_empty_negative(ingested, processors, tmp_path):
    tokenizer = processors[0]
    _, manifest, _ = formatted(ingested, processors, tmp_path, finetune_config())
    out = next(tmp_path.iterdir())
    records = [r for s in manifest["shards"] for r in read_shard(out / s["file"]).to_pylist()]
    (record,) = [r for r in records if r["negative_source"] == [-1]]
    sample = assemble_finetune_sample(
        record, 5, manifest["settings"], tokenizer.convert_tokens_to_ids(tokens.IMAGE_PAD)
    )
    assert decode(tokenizer, sample.conversation.negative_ids[0]) == base_conversation("\n")


def test_wholly_masked_answers(ingested, processors, tmp_path):
    tokenizer = processors[0]
    _, manifest, records = formatted(ingested, processors, tmp_path, finetune_config(mask={"whole_probability": 1.0}))
    image_pad = tokenizer.convert_tokens_to_ids(tokens.IMAGE_PAD)
    sample = assemble_finetune_sample(records["VisualNews_i2t"], 0, manifest["settings"], image_pad)
    user = f"{VISION}\nFind a caption for the news in the given photo.\n"
    assert decode(tokenizer, sample.conversation.query_ids) == train_conversation(user, MASK)
    assert decode(tokenizer, sample.conversation.target_ids[0]) == train_conversation(
        "Blue skies over the city.\n", MASK
    )


def test_word_masks_at_a_fixed_seed(ingested, processors, tmp_path):
    """Seed 0, epoch 2, the VisualNews_i2t row: both answers masked word by word, consecutive masks merged.

    The draw (words split at single spaces, as the loader's ``split(' ')``):
    in the query conversation, "Blue | skies over the city.\\n" (words 1-4
    masked, so the newline goes with them); in the target conversation, words
    2 ("A"), 4-8 ("blue" .. "for") and 14 ("photo.\\n") of the query's answer.
    """
    tokenizer = processors[0]
    _, manifest, records = formatted(ingested, processors, tmp_path, finetune_config())
    record = records["VisualNews_i2t"]
    sample = assemble_finetune_sample(
        record, 2, manifest["settings"], tokenizer.convert_tokens_to_ids(tokens.IMAGE_PAD)
    )
    assert not sample.plan.in_query.whole and not sample.plan.in_target.whole
    user = f"{VISION}\nFind a caption for the news in the given photo.\n"
    assert decode(tokenizer, sample.conversation.query_ids) == train_conversation(user, EXPECTED_IN_QUERY)
    assert decode(tokenizer, sample.conversation.target_ids[0]) == train_conversation(
        "Blue skies over the city.\n", EXPECTED_IN_TARGET
    )


EXPECTED_IN_QUERY = "Blue <|mask|>"
EXPECTED_IN_TARGET = "Image description: <|mask|> plain <|mask|> the news in the given <|mask|>"


def test_texts_and_token_pieces_agree_on_many_draws(ingested, processors, tmp_path):
    """The conversation assembled from token pieces equals tokenizing the text-level conversation."""
    tokenizer = processors[0]
    _, manifest, _ = formatted(ingested, processors, tmp_path, finetune_config())
    out = next(tmp_path.iterdir())
    shards = pq.read_table(ingested[0] / "shards/part-00000.parquet").to_pylist()
    samples = {r["sample_id"]: r for r in shards}
    records = [r for s in manifest["shards"] for r in read_shard(out / s["file"]).to_pylist()]
    config = finetune_config()
    image_pad = tokenizer.convert_tokens_to_ids(tokens.IMAGE_PAD)
    for record in records:
        row = samples[record["sample_id"]]
        sample = {
            **row,
            "query_image": row["image_bytes"] is not None,
            "target_image": row["pos_image_bytes"] is not None,
            "negative_images": [b is not None for b in row["neg_image_bytes"]],
        }
        for epoch in range(12):
            texts = stage2_texts(sample, epoch, config)
            built = assemble_finetune_sample(record, epoch, manifest["settings"], image_pad).conversation
            assert decode(tokenizer, built.query_ids) == texts.query
            assert decode(tokenizer, built.target_ids[0]) == texts.target
            assert decode(tokenizer, built.negative_ids[0]) == texts.negative


# --- masking -----------------------------------------------------------------------------------


def loader_masking(rng: random.Random, text: str) -> str:
    """naver-ai/muco src/loader.py lines 372-380 and ``masking`` (lines 406-415), restated for one answer."""
    if rng.random() < 0.5:
        return MASK
    out: list[str] = []
    for term in text.split(" "):
        if rng.random() < 0.5:
            if out and out[-1] == MASK:
                continue
            out.append(MASK)
        else:
            out.append(term)
    return " ".join(out)


def test_masking_matches_the_loader_draw_for_draw():
    text = "Image description: A red square.\nRepresent  the given image for classification\n"
    for seed in range(500):
        ours = masked_answer(text, draw_masks(random.Random(seed), len(answer_words(text)), MaskConfig()))
        assert ours == loader_masking(random.Random(seed), text)


def test_masking_statistics():
    rng, words, draws = random.Random(1), 10, 20000
    results = [draw_masks(rng, words, MaskConfig()) for _ in range(draws)]
    whole = sum(d.whole for d in results) / draws
    per_word = [m for d in results if not d.whole for m in d.words]
    # binomial standard errors: 0.0035 and 0.0016; 5 of them either way
    assert abs(whole - 0.5) < 0.018
    assert abs(sum(per_word) / len(per_word) - 0.5) < 0.008
    assert masked_answer("a b c d", MaskDraw(False, (True, True, False, True))) == f"{MASK} c {MASK}"


def test_draws_are_fixed_per_epoch_and_sample():
    mask = MaskConfig()
    first = plan_sample("Set/000000001-abc", 3, 8, 9, 4, seed=0, mask=mask)
    assert plan_sample("Set/000000001-abc", 3, 8, 9, 4, seed=0, mask=mask) == first
    others = {plan_sample("Set/000000001-abc", 3, 8, 9, e, seed=0, mask=mask) for e in range(20)}
    assert len(others) > 10  # each epoch draws again
    assert plan_sample("Set/000000002-abc", 3, 8, 9, 4, seed=0, mask=mask) != first


# --- batches -----------------------------------------------------------------------------------


def test_batches_hold_two_embeddings_per_side_and_one_per_hard_negative(ingested, processors, tmp_path):
    tokenizer, image_processor = processors
    out, _, _ = formatted(ingested, processors, tmp_path, finetune_config())
    image_pad = tokenizer.convert_tokens_to_ids(tokens.IMAGE_PAD)

    def batches(rank: int) -> ConversationBatches:
        return ConversationBatches.for_tokenizer(
            out,
            ingested[0],
            image_processor,
            tokenizer,
            batch_size=3,
            rank=rank,
            world_size=2,
            seed=0,
        )

    first, second = batches(0), batches(1)
    assert first.steps_per_epoch == 1
    for step in range(3):
        a, b, again = first.batch(step), second.batch(step), batches(0).batch(step)
        assert set(a.conversation_ids).isdisjoint(b.conversation_ids)
        assert a.turns == 2 and a.query["input_ids"].shape[0] == 3 and a.target["input_ids"].shape[0] == 3
        for side in (a.query, a.target):
            assert side["emb_index"][:, 0].tolist() == [0, 0, 1, 1, 2, 2]
        assert a.negative["emb_index"][:, 0].tolist() == [0, 1, 2]
        assert again.query["input_ids"].equal(a.query["input_ids"])  # the same draw in a new process
        for side in (s for batch in (a, b) for s in (batch.query, batch.target, batch.negative)):
            pads = int((side["input_ids"] == image_pad).sum())
            assert pads == (int(side["image_grid_thw"].prod(-1).sum()) // 4 if "image_grid_thw" in side else 0)
    assert not first.batch(0).query["input_ids"].equal(first.batch(1).query["input_ids"])


def test_the_sample_has_an_mmeb_train_set_that_ingests_cleanly(small_sample_root, tmp_path):
    parts = open_meta_parts(str(small_sample_root))
    assert [p.dataset for p in parts] == ["MiniShapes-Cls", "MiniShapes-I2T", "MiniShapes-T2I", "MiniShapes-VQA"]
    manifest = ingest_mmeb_train(parts, tmp_path, IngestConfig.from_params(load_params()["finetune_ingest"]))
    assert manifest["counts"]["rejected"] == 0 and manifest["counts"]["accepted"] == 4 * 24
    rows = [r for s in manifest["shards"] for r in pq.read_table(tmp_path / s["file"]).to_pylist()]
    assert all(r["neg_text"] for r in rows)
    assert sum(r["pos_image_bytes"] is not None for r in rows) == 24  # the text-to-image set


def test_target_and_negative_keys_tell_images_apart_and_reach_the_batch(ingested, processors, tmp_path):
    out, manifest, records = formatted(ingested, processors, tmp_path, finetune_config())
    by_id = {r["sample_id"]: r for s in manifest["shards"] for r in read_shard(out / s["file"]).to_pylist()}
    coco, webqa, cls = records["MSCOCO_t2i"], records["WebQA"], records["ImageNet_1K"]
    # both text-to-image rows want green.png with the same text: one target, so each masks the other
    assert coco["target_key"] == webqa["target_key"]
    # their negatives have that text too, but other images (red.png, blue.png): neither is the target
    assert len({coco["target_key"], *coco["negative_key"], *webqa["negative_key"]}) == 3
    # text targets are keyed by their text alone: "red square" and its negatives all differ
    assert len({cls["target_key"], *cls["negative_key"]}) == 3
    vqa = [r for r in by_id.values() if r["dataset"] == "OK-VQA"]
    assert len(vqa) == 2 and vqa[0]["target_key"] == vqa[1]["target_key"]  # both answer "blue"

    tokenizer, image_processor = processors
    batches = ConversationBatches.for_tokenizer(
        out, ingested[0], image_processor, tokenizer, batch_size=6, rank=0, world_size=1, seed=0
    )
    batch = batches.batch(0)
    for i, sample in enumerate(batch.conversation_ids):
        assert batch.target_keys[2 * i : 2 * i + 2].tolist() == [by_id[sample]["target_key"]] * 2
        assert batch.negative_keys[i].item() in by_id[sample]["negative_key"]


# --- the data mix (training.data_mix) ----------------------------------------------------------


def mix(weights=None, caps=None, homogeneous=False) -> DataMixSettings:
    return DataMixSettings(weights=weights or {}, caps=caps or {}, homogeneous_batches=homogeneous)


def test_epoch_counts_are_weight_times_samples_rounded_half_up_within_the_cap():
    samples = np.array([10, 4, 7, 10])
    counts = epoch_counts(samples, ["a", "b", "c", "d"], mix({"a": 0.5, "b": 2.5, "d": 0.25}, {"c": 5, "b": 9}))
    # a: 5; b: 10 capped at 9; c: 7 capped at 5; d: 2.5 rounds up to 3
    assert counts.tolist() == [5, 9, 5, 3]
    assert epoch_counts(samples, ["a", "b", "c", "d"], mix()).tolist() == [10, 4, 7, 10]
    with pytest.raises(ValueError, match="names ImageNet, which the data does not hold"):
        epoch_counts(samples, ["a", "b", "c", "d"], mix(caps={"ImageNet": 3}))


def test_epoch_units_cycle_through_a_dataset_in_new_orders_and_leave_whole_ones_undrawn():
    unit_dataset = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    rng = random.Random(3)
    state = rng.getstate()
    assert epoch_units(unit_dataset, np.array([3, 2, 3]), rng).tolist() == list(range(8))
    assert rng.getstate() == state  # nothing to draw: a run without a mix keeps its batches
    units = epoch_units(unit_dataset, np.array([3, 5, 1]), rng).tolist()
    # dataset 1 five times over its two units: two passes and one more; dataset 2 one of its three
    assert units[:3] == [0, 1, 2] and sorted({units.count(3), units.count(4)}) == [2, 3]
    assert len(units) == 9 and len([u for u in units if u >= 5]) == 1


def mixed_batches(ingested, processors, out, data_mix, batch_size=2) -> ConversationBatches:
    tokenizer, image_processor = processors
    return ConversationBatches.for_tokenizer(
        out, ingested[0], image_processor, tokenizer, batch_size=batch_size, rank=0, world_size=1, seed=0,
        data_mix=data_mix,
    )  # fmt: skip


def datasets_of(batches: ConversationBatches, epoch: int) -> list[list[str]]:
    names = batches.dataset_names
    return [[names[batches.unit_dataset[u]] for u in batch] for batch in batches.epoch_batches(epoch)]


def test_weights_caps_and_homogeneous_batches_on_hand_counted_data(ingested, processors, tmp_path):
    # the published rows: ImageNet_1K 1, MSCOCO_t2i 1, OK-VQA 2, VisualNews_i2t 1, WebQA 1 sample
    out, _, _ = formatted(ingested, processors, tmp_path, finetune_config())
    plain = mixed_batches(ingested, processors, out, mix())
    assert plain.steps_per_epoch == 3  # 6 samples in batches of 2, any mix

    # OK-VQA left out, WebQA four times: 1 + 1 + 1 + 4 = 7 samples, 3 batches, one sample left over
    weighted = mixed_batches(ingested, processors, out, mix({"OK-VQA": 0, "WebQA": 4}))
    assert weighted.steps_per_epoch == 3
    for epoch in (0, 1):
        seen = [name for batch in datasets_of(weighted, epoch) for name in batch]
        assert len(seen) == 6 and "OK-VQA" not in seen and seen.count("WebQA") >= 3

    # one dataset per batch: only OK-VQA (2) and WebQA (4, weighted) fill batches of 2: 1 + 2 steps
    homogeneous = mixed_batches(ingested, processors, out, mix({"WebQA": 4}, homogeneous=True))
    assert homogeneous.steps_per_epoch == 3
    for epoch in (0, 1):
        assert sorted(datasets_of(homogeneous, epoch)) == [["OK-VQA"] * 2] + [["WebQA"] * 2] * 2

    # a cap: WebQA's four at most three, so one batch of WebQA and one left over
    capped = mixed_batches(ingested, processors, out, mix({"WebQA": 4}, {"WebQA": 3}, homogeneous=True))
    assert sorted(datasets_of(capped, 0)) == [["OK-VQA"] * 2, ["WebQA"] * 2]
    assert capped.batch(1).turns == 2  # the batches are made, not only counted


def test_a_held_out_stage_two_slice_is_whole_samples_never_in_a_training_batch(ingested, processors, tmp_path):
    out, _, _ = formatted(ingested, processors, tmp_path, finetune_config())
    tokenizer, image_processor = processors
    batches = ConversationBatches.for_tokenizer(
        out, ingested[0], image_processor, tokenizer, batch_size=2, rank=0, world_size=1, seed=0, heldout=2
    )
    assert batches.steps_per_epoch == 2  # 6 samples, 2 held out: 4 in batches of 2
    (held,) = batches.heldout_batches(8)
    assert len(held.conversation_ids) == 2 and held.turns == 2
    assert held.target_keys.shape[0] == 4  # each sample's main and auxiliary target: [0::2] is what is scored
    trained = {cid for step in range(2 * batches.steps_per_epoch) for cid in batches.batch(step).conversation_ids}
    assert len(trained) == 4 and not trained & set(held.conversation_ids)
    # the held-out samples' datasets are not counted in the epoch either
    assert int(batches.epoch_counts.sum()) == 4
