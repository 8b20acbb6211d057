"""Formatting: records decode to exactly the intended conversations."""

from __future__ import annotations

import io
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from muco_flow.data import schema
from muco_flow.data.conversations import FormatConfig, plan_turns, target_key
from muco_flow.data.fetch import FetchConfig
from muco_flow.data.formatting import assemble_conversations, format_m3t_shards
from muco_flow.data.ingest import IngestConfig
from muco_flow.data.m3t_ingest import ingest_m3t_snapshot
from muco_flow.data.shards import read_shard
from muco_flow.data.sources import LocalSnapshot
from muco_flow.modeling.backbone import load_processors
from muco_flow.modeling.inputs import build_model_inputs
from muco_flow.modeling.prompt import single_turn_text
from muco_flow.training.data import ConversationBatches, collate_conversations
from tests.conftest import load_params
from tests.corrupt_corpus import corrupt_snapshot

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def turn(user: str, newline: bool = True) -> str:
    """One turn of naver-ai/muco's TEMPLATE_PRETRAIN (src/loader.py lines 101-130); turns are joined by "\\n".

    With format.user_text_newline (the default) the user text ends with a newline, as MuCo's evaluation has it.
    """
    if newline and not user.endswith("\n"):
        user += "\n"
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>"


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
    records = [r for s in manifest["shards"] for r in read_shard(out / s["file"]).to_pylist()]
    return manifest, records


def source_rows(ingested):
    rows = {}
    for path in sorted((ingested / "shards").glob("*.parquet")):
        for index, row in enumerate(pq.read_table(path).to_pylist()):
            rows[row["sample_id"]] = {**row, "_file": f"shards/{path.name}", "_row": index}
    return rows


def conversations(record, epoch, manifest, tokenizer):
    return assemble_conversations(record, epoch, manifest["settings"], tokenizer.convert_tokens_to_ids("<|image_pad|>"))


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
        # image tokens as the image processor itself counts them on the real pixels
        pixels = Image.open(io.BytesIO(row["image_bytes"])).convert("RGB")
        grid = image_processor(images=[pixels], return_tensors="pt")["image_grid_thw"][0]
        n_image = int(grid.prod()) // image_processor.merge_size**2
        assert record["image_tokens"] == n_image
        for epoch in (0, 1):
            (conversation,) = conversations(record, epoch, manifest, tokenizer)
            order = conversation.turn_index
            assert sorted(order) == list(range(7))
            plan = plan_turns(
                record["sample_id"], [len(q) for q in row["qry"]], epoch, seed=0, shuffle=True, resample=True
            )
            assert tuple(order) == plan.order
            queries = [row["qry"][k][p] for k, p in zip(plan.order, plan.phrasing, strict=True)]
            # the first turn shows the image where <|image_1|> was; the others drop "<|image_1|>\n"
            expected_query = SYSTEM + "\n".join(
                [
                    turn(queries[0].replace("<|image_1|>", VISION)),
                    *(turn(q[len("<|image_1|>\n") :]) for q in queries[1:]),
                ]
            )
            decoded = tokenizer.decode(conversation.query_ids)
            assert decoded.count("<|image_pad|>") == n_image
            assert re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", decoded) == expected_query
            targets = [turn(row["pos_text"][k]) for k in order]
            if layout == "independent":  # every target is a whole one-turn conversation of its own
                assert [tokenizer.decode(ids) for ids in conversation.target_ids] == [SYSTEM + t for t in targets]
            else:
                assert [tokenizer.decode(ids) for ids in conversation.target_ids] == [SYSTEM + "\n".join(targets)]
            assert conversation.turn_type == [[0, 1, 1, 2, 2, 3, 4][k] for k in order]

    # one key per distinct answer text: repeats ("three", "white") share one, different answers never do
    texts_by_key: dict[int, set[str]] = {}
    for record in records:
        answers = rows[record["sample_id"]]["pos_text"]
        for k, key in enumerate(record["target_key"]):
            texts_by_key.setdefault(key, set()).add(answers[k])
    assert all(len(texts) == 1 for texts in texts_by_key.values())
    distinct = {text for row in rows.values() for text in row["pos_text"]}
    assert len(texts_by_key) == len(distinct) < 7 * len(rows)


def test_turn_order_and_phrasing_change_every_epoch_unless_fixed(ingested, processors, tmp_path):
    tokenizer, _ = processors
    manifest, records = run_format(ingested, processors, tmp_path)

    def draws(manifest, epoch):
        return [(c.turn_index, c.query_ids) for r in records for c in conversations(r, epoch, manifest, tokenizer)]

    assert draws(manifest, 0) == draws(manifest, 0)  # a step always maps to the same batch
    changed = sum(a != b for a, b in zip(draws(manifest, 0), draws(manifest, 1), strict=True))
    assert changed > 20  # of 24 samples
    fixed, records = run_format(ingested, processors, tmp_path, resample_each_epoch=False)
    assert draws(fixed, 0) == draws(fixed, 5)


def test_independent_target_rows_are_the_tokens_evaluation_encodes(ingested, processors, tmp_path):
    """Training sees each target exactly as evaluation's single-turn encoding of it (format.user_text_newline)."""
    tokenizer, image_processor = processors
    config = FormatConfig.from_params(load_params()["format"])
    assert config.target_layout == "independent"  # the default
    manifest, records = run_format(ingested, processors, tmp_path)
    rows = source_rows(ingested)
    chosen = [conversations(r, 0, manifest, tokenizer)[0] for r in records[:3]]
    images = [Image.open(io.BytesIO(rows[r["sample_id"]]["image_bytes"])).convert("RGB") for r in records[:3]]
    emb = tokenizer.convert_tokens_to_ids("<|emb|>")
    batch = collate_conversations(
        chosen,
        images,
        [r["image_tokens"] for r in records[:3]],
        image_processor,
        pad_id=tokenizer.pad_token_id,
        image_pad_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        emb_id=emb,
    )
    assert batch.target["input_ids"].shape[0] == 3 * 7 == batch.target["emb_index"].shape[0]
    assert batch.query["emb_index"].shape[0] == 3 * 7
    template = config.templates.single_turn()
    for row, (record, k) in enumerate((r, k) for r, c in zip(records[:3], chosen, strict=True) for k in c.turn_index):
        text = rows[record["sample_id"]]["pos_text"][k]
        evaluation = single_turn_text(text, False, template)
        expected = build_model_inputs(tokenizer, image_processor, [evaluation], [None])["input_ids"][0].tolist()
        length = int(batch.target["attention_mask"][row].sum())
        assert batch.target["input_ids"][row, :length].tolist() == expected
        assert batch.target["emb_index"][row].tolist() == [row, expected.index(emb)]
    assert batch.target_keys.tolist() == [key for c in chosen for key in c.target_key]


def test_training_refuses_shards_formatted_by_another_version(ingested, processors, tmp_path):
    manifest, _ = run_format(ingested, processors, tmp_path)
    formatted = next(tmp_path.iterdir())
    shard = formatted / manifest["shards"][0]["file"]
    older = read_shard(shard).drop_columns(["target_key", "part_turns"])
    with pa.ipc.new_file(str(shard) + ".new", older.schema) as writer:
        writer.write_table(older)
    os.replace(str(shard) + ".new", shard)  # the mapped original stays readable until unmapped
    with pytest.raises(ValueError, match=r"no column part_turns, target_key\); re-run the format pipeline"):
        ConversationBatches.for_tokenizer(
            formatted,
            ingested,
            processors[1],
            processors[0],
            batch_size=2,
            rank=0,
            world_size=1,
            seed=0,
        )


def test_target_keys_ignore_case_and_spacing_only():
    assert target_key("Red") == target_key("  red ") == target_key("RED")
    assert target_key("a red circle") == target_key("a  red\tcircle")
    assert len({target_key(t) for t in ("red", "blue", "a red circle", "a red square", "")}) == 5


def test_tokenizing_piece_by_piece_equals_tokenizing_the_whole_text(ingested, processors, tmp_path):
    tokenizer, _ = processors
    manifest, records = run_format(ingested, processors, tmp_path, target_layout="conversation")
    for record in records[:5]:
        (conversation,) = conversations(record, 0, manifest, tokenizer)
        for ids in [conversation.query_ids, *conversation.target_ids]:
            assert tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] == ids


def test_same_seed_same_shards_other_seed_other_order(ingested, processors, tmp_path):
    tokenizer, _ = processors
    first, records = run_format(ingested, processors, tmp_path)
    again, _ = run_format(ingested, processors, tmp_path)
    other, _ = run_format(ingested, processors, tmp_path, seed=1)
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in again["shards"]]
    orders = [tuple(conversations(r, 0, first, tokenizer)[0].turn_index) for r in records]
    assert orders != [tuple(conversations(r, 0, other, tokenizer)[0].turn_index) for r in records]
    assert len(set(orders)) > 20  # shuffled per sample, not one fixed order


def test_single_turn_mode_and_shorter_conversations(ingested, processors, tmp_path):
    tokenizer, _ = processors
    single, records = run_format(ingested, processors, tmp_path, mode="single_turn")
    assert single["counts"]["conversations"] == 24 * 7
    for record in records:
        parts = conversations(record, 0, single, tokenizer)
        assert len(parts) == 7 and all(len(c.turn_index) == 1 == len(c.target_ids) for c in parts)
        # each single-turn query still sees the image
        assert all(c.query_ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) > 0 for c in parts)
    split, records = run_format(ingested, processors, tmp_path, turns_per_conversation=3)
    assert split["counts"]["conversations"] == 24 * 3
    for record in records:
        parts = conversations(record, 2, split, tokenizer)
        assert [len(p.turn_index) for p in parts] == [3, 3, 1]
        assert sorted(k for p in parts for k in p.turn_index) == list(range(7))
        assert [p.conversation_id.split("#")[1] for p in parts] == ["0", "1", "2"]


def test_conversations_per_sample_keeps_each_epochs_first_conversations(ingested, processors, tmp_path):
    tokenizer, _ = processors
    every, every_records = run_format(ingested, processors, tmp_path, mode="single_turn")
    one, one_records = run_format(ingested, processors, tmp_path, mode="single_turn", conversations_per_sample=1)
    # 24 samples of 7 turns: one (image, query) pair per sample, nothing counted as dropped
    assert one["counts"] | {"conversations": 24 * 7} == every["counts"]
    assert one["counts"]["conversations"] == 24 and one["counts"]["turns_dropped"] == 0
    assert one["settings"]["conversations_per_sample"] == 1
    turns_seen = set()
    for record, full in zip(one_records, every_records, strict=True):
        assert record["part_turns"] == [1]
        for epoch in range(6):
            (kept,) = conversations(record, epoch, one, tokenizer)
            # the pair kept is the epoch's first of the seven, so the query changes with the epoch
            first = conversations(full, epoch, every, tokenizer)[0]
            assert (kept.turn_index, kept.query_ids, kept.target_ids) == (
                first.turn_index,
                first.query_ids,
                first.target_ids,
            )
            turns_seen.add((record["sample_id"], kept.turn_index[0]))
    assert len(turns_seen) > 24 * 3  # about 24 x 4.6 distinct turns in 6 epochs of 7
    split, records = run_format(ingested, processors, tmp_path, turns_per_conversation=3, conversations_per_sample=2)
    assert split["counts"]["conversations"] == 24 * 2
    assert all(len(p.turn_index) == 3 for r in records for p in conversations(r, 1, split, tokenizer))


def test_truncation_keeps_what_fits_any_draw_and_counts_the_rest(ingested, processors, tmp_path):
    tokenizer, _ = processors
    # long enough for every first turn (up to 64 image tokens), too short for all seven
    manifest, cut = run_format(ingested, processors, tmp_path, max_length=150)
    assert manifest["counts"]["turns_dropped"] > 0 and manifest["counts"]["conversations_dropped"] == 0
    kept = sum(r["part_turns"][0] for r in cut)
    assert kept + manifest["counts"]["turns_dropped"] == 168
    for record in cut:
        for epoch in range(4):
            (conversation,) = conversations(record, epoch, manifest, tokenizer)
            assert len(conversation.turn_index) == record["part_turns"][0] < 7
            # each independent target turn is its own sequence, so each must fit, not their sum
            assert len(conversation.query_ids) <= 150 and max(len(t) for t in conversation.target_ids) <= 150
            assert tokenizer.decode(conversation.query_ids).endswith("<|emb|><|im_end|>")
    # one target conversation: the sum of its turns must fit
    manifest, cut = run_format(ingested, processors, tmp_path, max_length=150, target_layout="conversation")
    assert all(len(conversations(r, 0, manifest, tokenizer)[0].target_ids[0]) <= 150 for r in cut)


def test_a_sample_whose_first_turn_cannot_fit_is_dropped_and_counted(ingested, processors, tmp_path):
    manifest, records = run_format(ingested, processors, tmp_path, max_length=10)
    assert records == []
    assert manifest["counts"]["conversations_dropped"] == 24 and manifest["counts"]["turns_dropped"] == 168


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mode": "pairs"}, "format.mode"),
        ({"turns_per_conversation": 0}, "turns_per_conversation"),
        ({"conversations_per_sample": 0}, "conversations_per_sample"),
        ({"target_field": "neg_text"}, "target_field"),
        ({"target_layout": "packed"}, "format.target_layout must be one of"),
    ],
)
def test_bad_format_parameters_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        FormatConfig.from_params({**load_params()["format"], **overrides})


def test_templates_missing_a_field_are_named():
    params = load_params()["format"]
    with pytest.raises(ValueError, match=r"templates\.turn must hold one \{content\} and one <\|emb\|>"):
        FormatConfig.from_params({**params, "templates": {**params["templates"], "turn": "no field <|emb|>"}})


def test_every_row_ingest_accepts_from_a_corrupt_snapshot_formats(small_sample_root, processors, tmp_path):
    """A row that passes ingestion never stops the format pipeline (e.g. an image Qwen2-VL cannot resize)."""
    expected = corrupt_snapshot(small_sample_root, tmp_path / "snapshot")
    ingested = tmp_path / "ingested"
    ingested.mkdir()
    config = IngestConfig(rows_per_shard=10, download=FetchConfig(retries=0, timeout_s=2))
    manifest = ingest_m3t_snapshot(LocalSnapshot(tmp_path / "snapshot", schema.TRAIN_META_FILE), ingested, config)
    assert manifest["counts"]["rejected"] == sum(1 for reason in expected.values() if reason)
    formatted, records = run_format(ingested, processors, tmp_path)
    assert {r["sample_id"] for r in records} == set(source_rows(ingested))
    # the text-only sample has no image tokens, and its first turn no vision block
    (text_only,) = [r for r in records if r["image_shard"] is None]
    tokenizer = processors[0]
    (conversation,) = conversations(text_only, 0, formatted, tokenizer)
    assert text_only["image_tokens"] == 0 and "<|vision_start|>" not in tokenizer.decode(conversation.query_ids)
