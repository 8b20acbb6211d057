"""Formatting: records decode to exactly the intended conversations."""

from __future__ import annotations

import io
import itertools
import re

import pyarrow.parquet as pq
import pytest
from PIL import Image

from muco_flow.data import schema
from muco_flow.data.conversations import FormatConfig, target_key
from muco_flow.data.fetch import FetchConfig
from muco_flow.data.formatting import format_m3t_shards
from muco_flow.data.ingest import IngestConfig, ingest_m3t_snapshot
from muco_flow.data.sources import LocalSnapshot
from muco_flow.modeling.backbone import load_processors
from muco_flow.modeling.inputs import build_model_inputs
from muco_flow.training.data import ConversationBatches, collate_conversations
from tests.conftest import load_params
from tests.corrupt_corpus import corrupt_snapshot

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def turn(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>\n"


@pytest.fixture(scope="module")
def ingested(small_sample_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingested")
    ingest_m3t_snapshot(LocalSnapshot(small_sample_root, schema.TRAIN_META_FILE), out, IngestConfig(rows_per_shard=10))
    return out


@pytest.fixture(scope="module")
def processors(tiny_backbone_dir):
    return load_processors(str(tiny_backbone_dir))


def run_format(ingested, processors, tmp_path, **overrides):
    params = {**load_params()["format"], **overrides}
    out = tmp_path / f"formatted-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    manifest = format_m3t_shards(ingested, out, *processors, FormatConfig.from_params(params))
    records = [r for s in manifest["shards"] for r in pq.read_table(out / s["file"]).to_pylist()]
    return manifest, records


def source_rows(ingested):
    rows = {}
    for path in sorted((ingested / "shards").glob("*.parquet")):
        for index, row in enumerate(pq.read_table(path).to_pylist()):
            rows[row["sample_id"]] = {**row, "_file": f"shards/{path.name}", "_row": index}
    return rows


@pytest.mark.parametrize("layout", ["independent", "conversation"])
def test_records_decode_to_the_intended_conversations(ingested, processors, tmp_path, layout):
    tokenizer, image_processor = processors
    manifest, records = run_format(ingested, processors, tmp_path, target_layout=layout)
    assert manifest["settings"]["target_layout"] == layout
    rows = source_rows(ingested)
    assert manifest["counts"] == {
        "samples": 24,
        "conversations": 24,
        "conversations_dropped": 0,
        "turns": 168,
        "turns_dropped": 0,
    }
    for record in records:
        row = rows[record["sample_id"]]
        assert (record["image_shard"], record["image_row"]) == (row["_file"], row["_row"])
        order, phrasing = record["turn_index"], record["phrasing"]
        assert sorted(order) == list(range(7))
        queries = [row["qry"][k][p] for k, p in zip(order, phrasing, strict=True)]
        expected_query = SYSTEM + turn("<|vision_start|><|image_pad|><|vision_end|>" + queries[0])
        expected_query += "".join(turn(q) for q in queries[1:])
        # independent: every target turn is a whole one-turn conversation of its own
        target_turns = [
            (SYSTEM if layout == "independent" or i == 0 else "") + turn(row["pos_text"][k])
            for i, k in enumerate(order)
        ]
        expected_target = "".join(target_turns)

        # image tokens as the image processor itself counts them on the real pixels
        pixels = Image.open(io.BytesIO(row["image_bytes"])).convert("RGB")
        grid = image_processor(images=[pixels], return_tensors="pt")["image_grid_thw"][0]
        n_image = int(grid.prod()) // image_processor.merge_size**2
        decoded = tokenizer.decode(record["query_input_ids"])
        assert decoded.count("<|image_pad|>") == n_image == record["image_tokens"]
        assert re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", decoded) == expected_query
        assert tokenizer.decode(record["target_input_ids"]) == expected_target
        starts = [sum(record["target_turn_lengths"][:i]) for i in range(8)]
        spans = [record["target_input_ids"][a:b] for a, b in itertools.pairwise(starts)]
        assert [tokenizer.decode(span) for span in spans] == target_turns

        emb = tokenizer.convert_tokens_to_ids("<|emb|>")
        for side in ("query", "target"):
            ids = record[f"{side}_input_ids"]
            assert record[f"{side}_emb_positions"] == [i for i, t in enumerate(ids) if t == emb]
            assert len(record[f"{side}_emb_positions"]) == 7
            assert record[f"{side}_attention_mask"] == [1] * len(ids)
        assert record["turn_type"] == [[0, 1, 1, 2, 2, 3, 4][k] for k in order]

    # one key per distinct answer text: repeats ("three", "white") share one, different answers never do
    texts_by_key: dict[int, set[str]] = {}
    for record in records:
        answers = rows[record["sample_id"]]["pos_text"]
        for k, key in zip(record["turn_index"], record["target_key"], strict=True):
            texts_by_key.setdefault(key, set()).add(answers[k])
    assert all(len(texts) == 1 for texts in texts_by_key.values())
    distinct = {text for row in rows.values() for text in row["pos_text"]}
    assert len(texts_by_key) == len(distinct) < 7 * len(rows)


def test_independent_target_rows_are_the_tokens_evaluation_encodes(ingested, processors, tmp_path):
    """Training sees each target exactly as evaluation's single-turn encoding of it."""
    tokenizer, image_processor = processors
    config = FormatConfig.from_params(load_params()["format"])
    assert config.target_layout == "independent"  # the default
    _, records = run_format(ingested, processors, tmp_path)
    rows = source_rows(ingested)
    images = [Image.open(io.BytesIO(rows[r["sample_id"]]["image_bytes"])).convert("RGB") for r in records[:3]]
    batch = collate_conversations(
        records[:3],
        images,
        image_processor,
        pad_id=tokenizer.pad_token_id,
        image_pad_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        independent_targets=True,
    )
    assert batch.target["input_ids"].shape[0] == 3 * 7 == batch.target["emb_index"].shape[0]
    template = config.templates.single_turn()
    emb = tokenizer.convert_tokens_to_ids("<|emb|>")
    for row, (record, k) in enumerate((r, k) for r in records[:3] for k in r["turn_index"]):
        text = rows[record["sample_id"]]["pos_text"][k]
        evaluation = build_model_inputs(tokenizer, image_processor, [template.format(image="", text=text)], [None])
        expected = evaluation["input_ids"][0].tolist()
        length = int(batch.target["attention_mask"][row].sum())
        assert batch.target["input_ids"][row, :length].tolist() == expected
        assert batch.target["emb_index"][row].tolist() == [row, expected.index(emb)]
    assert batch.target_keys.tolist() == [key for r in records[:3] for key in r["target_key"]]


def test_training_refuses_shards_formatted_without_the_target_columns(ingested, processors, tmp_path):
    manifest, _ = run_format(ingested, processors, tmp_path)
    formatted = next(tmp_path.iterdir())
    shard = formatted / manifest["shards"][0]["file"]
    pq.write_table(pq.read_table(shard).drop_columns(["target_key", "target_turn_lengths"]), shard)
    with pytest.raises(ValueError, match=r"has no column target_key, target_turn_lengths: .* re-run the format"):
        ConversationBatches(
            formatted, ingested, processors[1], pad_id=0, image_pad_id=1, batch_size=2, rank=0, world_size=1, seed=0
        )


def test_target_keys_ignore_case_and_spacing_only():
    assert target_key("Red") == target_key("  red ") == target_key("RED")
    assert target_key("a red circle") == target_key("a  red\tcircle")
    assert len({target_key(t) for t in ("red", "blue", "a red circle", "a red square", "")}) == 5


def test_tokenizing_turn_by_turn_equals_tokenizing_the_whole_text(ingested, processors, tmp_path):
    tokenizer, _ = processors
    _, records = run_format(ingested, processors, tmp_path)
    for record in records[:5]:
        text = tokenizer.decode(record["target_input_ids"])
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == record["target_input_ids"]


def test_same_seed_same_shards_other_seed_other_order(ingested, processors, tmp_path):
    first, records = run_format(ingested, processors, tmp_path)
    again, _ = run_format(ingested, processors, tmp_path)
    _other, other_records = run_format(ingested, processors, tmp_path, seed=1)
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in again["shards"]]
    assert [r["turn_index"] for r in records] != [r["turn_index"] for r in other_records]
    assert len({tuple(r["turn_index"]) for r in records}) > 20  # shuffled per sample, not one fixed order


def test_single_turn_mode_and_shorter_conversations(ingested, processors, tmp_path):
    single, records = run_format(ingested, processors, tmp_path, mode="single_turn")
    assert single["counts"]["conversations"] == 24 * 7
    assert all(len(r["query_emb_positions"]) == len(r["target_emb_positions"]) == 1 for r in records)
    assert all(r["image_tokens"] > 0 for r in records)  # each single-turn query still sees the image
    split, records = run_format(ingested, processors, tmp_path, turns_per_conversation=3)
    assert split["counts"]["conversations"] == 24 * 3
    by_sample: dict[str, list] = {}
    for r in records:
        by_sample.setdefault(r["sample_id"], []).append(r)
    for parts in by_sample.values():
        assert [len(p["turn_index"]) for p in parts] == [3, 3, 1]
        assert sorted(k for p in parts for k in p["turn_index"]) == list(range(7))
        assert [p["conversation_id"].split("#")[1] for p in parts] == ["0", "1", "2"]


def test_truncation_drops_whole_trailing_turns_and_counts_them(ingested, processors, tmp_path):
    tokenizer, _ = processors
    _, full = run_format(ingested, processors, tmp_path)
    # long enough for every first turn (up to 64 image tokens), too short for all seven
    manifest, cut = run_format(ingested, processors, tmp_path, max_length=150)
    assert manifest["counts"]["turns_dropped"] > 0 and manifest["counts"]["conversations_dropped"] == 0
    kept = sum(len(r["turn_index"]) for r in cut)
    assert kept + manifest["counts"]["turns_dropped"] == 168
    for short, long in zip(cut, full, strict=True):
        assert short["conversation_id"] == long["conversation_id"]
        n = len(short["turn_index"])
        assert short["turn_index"] == long["turn_index"][:n]  # a prefix of the same order
        # each independent target turn is its own sequence, so each must fit, not their sum
        assert len(short["query_input_ids"]) <= 150 and max(short["target_turn_lengths"]) <= 150
        assert short["query_input_ids"] == long["query_input_ids"][: len(short["query_input_ids"])]
        assert tokenizer.decode(short["query_input_ids"]).endswith("<|emb|><|im_end|>\n")
    # one target conversation: the sum of its turns must fit
    _, cut = run_format(ingested, processors, tmp_path, max_length=150, target_layout="conversation")
    assert max(len(r["target_input_ids"]) for r in cut) <= 150 < max(len(r["target_input_ids"]) for r in full)


def test_a_conversation_whose_first_turn_cannot_fit_is_dropped_and_counted(ingested, processors, tmp_path):
    manifest, records = run_format(ingested, processors, tmp_path, max_length=10)
    assert records == []
    assert manifest["counts"]["conversations_dropped"] == 24 and manifest["counts"]["turns_dropped"] == 168


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mode": "pairs"}, "format.mode"),
        ({"turns_per_conversation": 0}, "turns_per_conversation"),
        ({"target_field": "neg_text"}, "target_field"),
        ({"target_layout": "packed"}, "format.target_layout must be one of"),
    ],
)
def test_bad_format_parameters_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        FormatConfig.from_params({**load_params()["format"], **overrides})


def test_templates_missing_a_field_are_named():
    params = load_params()["format"]
    with pytest.raises(ValueError, match=r"templates\.query must contain \{query\}"):
        FormatConfig.from_params({**params, "templates": {**params["templates"], "query": "no field"}})


def test_every_row_ingest_accepts_from_a_corrupt_snapshot_formats(small_sample_root, processors, tmp_path):
    """A row that passes ingestion never stops the format pipeline (e.g. an image Qwen2-VL cannot resize)."""
    expected = corrupt_snapshot(small_sample_root, tmp_path / "snapshot")
    ingested = tmp_path / "ingested"
    ingested.mkdir()
    config = IngestConfig(rows_per_shard=10, download=FetchConfig(retries=0, timeout_s=2))
    manifest = ingest_m3t_snapshot(LocalSnapshot(tmp_path / "snapshot", schema.TRAIN_META_FILE), ingested, config)
    assert manifest["counts"]["rejected"] == sum(1 for reason in expected.values() if reason)
    _, records = run_format(ingested, processors, tmp_path)
    accepted = {
        (f"shards/{p.name}", i) for p in (ingested / "shards").glob("*.parquet") for i in range(len(pq.read_table(p)))
    }
    assert {(r["image_shard"], r["image_row"]) for r in records} == accepted
