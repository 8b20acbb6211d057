"""Hard negatives in stage 1: M3T's neg_text formatted as one-turn target conversations, batched, configured."""

from __future__ import annotations

import io
import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from muco_flow.data.conversations import FormatConfig, single_turn_template, target_key
from muco_flow.data.formatting import FORMATTED_SCHEMA, NEGATIVE_FIELDS
from muco_flow.modeling.inputs import build_model_inputs
from muco_flow.training.data import ConversationBatches, collate_conversations
from muco_flow.training.launch import validate_grad_cache
from tests.conftest import load_params
from tests.test_format import SYSTEM, ingested, processors, run_format, source_rows, turn  # noqa: F401 (fixtures)


def test_negatives_decode_to_one_turn_conversations_in_the_query_order(ingested, processors, tmp_path):  # noqa: F811
    tokenizer, _ = processors
    manifest, records = run_format(ingested, processors, tmp_path, hard_negatives=True)
    assert manifest["settings"]["hard_negatives"] is True
    assert manifest["counts"]["conversations"] == 24 and manifest["counts"]["turns_dropped"] == 0
    rows = source_rows(ingested)
    emb = tokenizer.convert_tokens_to_ids("<|emb|>")
    for record in records:
        wrong = rows[record["sample_id"]]["neg_text"]
        expected = [SYSTEM + turn(wrong[k]) for k in record["turn_index"]]
        starts = [sum(record["negative_turn_lengths"][:i]) for i in range(len(expected) + 1)]
        spans = [record["negative_input_ids"][a:b] for a, b in itertools.pairwise(starts)]
        assert [tokenizer.decode(span) for span in spans] == expected
        ids = record["negative_input_ids"]
        assert record["negative_emb_positions"] == [i for i, t in enumerate(ids) if t == emb]
        assert record["negative_key"] == [target_key(wrong[k]) for k in record["turn_index"]]
    # the query and target sides are those formatted without negatives
    _, plain = run_format(ingested, processors, tmp_path)
    assert [{k: r[k] for k in plain[0]} for r in records] == plain


def test_without_the_option_the_shards_keep_their_schema(ingested, processors, tmp_path):  # noqa: F811
    manifest, _ = run_format(ingested, processors, tmp_path)
    formatted = sorted(tmp_path.iterdir())[-1]
    assert manifest["settings"]["hard_negatives"] is False
    assert pq.read_schema(formatted / manifest["shards"][0]["file"]).names == FORMATTED_SCHEMA.names
    with pytest.raises(ValueError, match=r"training.hard_negatives is set but .* format.hard_negatives: true"):
        ConversationBatches(
            formatted,
            ingested,
            processors[1],
            pad_id=0,
            image_pad_id=1,
            batch_size=2,
            rank=0,
            world_size=1,
            seed=0,
            hard_negatives=True,
        )


def test_batched_negatives_are_the_tokens_evaluation_encodes(ingested, processors, tmp_path):  # noqa: F811
    """Each negative row is its text encoded as a candidate is, sample-major like the targets."""
    tokenizer, image_processor = processors
    _, records = run_format(ingested, processors, tmp_path, hard_negatives=True)
    rows = source_rows(ingested)
    images = [Image.open(io.BytesIO(rows[r["sample_id"]]["image_bytes"])).convert("RGB") for r in records[:3]]
    batch = collate_conversations(
        records[:3],
        images,
        image_processor,
        pad_id=tokenizer.pad_token_id,
        image_pad_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        independent_targets=True,
        hard_negatives=True,
    )
    assert batch.negative["input_ids"].shape[0] == 3 * 7 == batch.negative["emb_index"].shape[0]
    template = single_turn_template(FormatConfig.from_params(load_params()["format"]).templates)
    emb = tokenizer.convert_tokens_to_ids("<|emb|>")
    for row, (record, k) in enumerate((r, k) for r in records[:3] for k in r["turn_index"]):
        text = rows[record["sample_id"]]["neg_text"][k]
        evaluation = build_model_inputs(tokenizer, image_processor, [template.format(image="", text=text)], [None])
        expected = evaluation["input_ids"][0].tolist()
        length = int(batch.negative["attention_mask"][row].sum())
        assert batch.negative["input_ids"][row, :length].tolist() == expected
        assert batch.negative["emb_index"][row].tolist() == [row, expected.index(emb)]
    assert batch.negative_keys.tolist() == [key for r in records[:3] for key in r["negative_key"]]
    assert batch.tokens == sum(
        int(side["attention_mask"].sum()) for side in (batch.query, batch.target, batch.negative)
    )


def test_chunks_are_the_batch_in_order(ingested, processors, tmp_path):  # noqa: F811
    run_format(ingested, processors, tmp_path, hard_negatives=True)
    formatted = sorted(tmp_path.iterdir())[-1]
    tokenizer, image_processor = processors
    batches = ConversationBatches(
        formatted,
        ingested,
        image_processor,
        pad_id=tokenizer.pad_token_id,
        image_pad_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        batch_size=5,
        rank=1,
        world_size=2,
        seed=0,
        hard_negatives=True,
    )
    whole, chunks = batches.batch(3), batches.batch_chunks(3, 2)
    assert [len(c.conversation_ids) for c in chunks] == [2, 2, 1]
    assert [i for c in chunks for i in c.conversation_ids] == whole.conversation_ids
    for name in ("target_keys", "negative_keys"):
        assert [k for c in chunks for k in getattr(c, name).tolist()] == getattr(whole, name).tolist()


def test_a_sample_without_negatives_is_named(ingested, processors, tmp_path):  # noqa: F811
    copy = tmp_path / "ingested"
    copy.mkdir()
    for path in ingested.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(ingested)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(ingested)).write_bytes(path.read_bytes())
    shard = sorted((copy / "shards").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    column = table.schema.get_field_index("neg_text")
    table = table.set_column(column, table.schema.field(column), pa.nulls(len(table), table.schema.field(column).type))
    pq.write_table(table, shard)
    with pytest.raises(ValueError, match=r"sample .* has no neg_text: format.hard_negatives needs one wrong answer"):
        run_format(copy, processors, tmp_path, hard_negatives=True)


def test_negative_fields_are_appended_after_the_plain_ones():
    names = [f.name for f in NEGATIVE_FIELDS]
    assert names == ["negative_input_ids", "negative_emb_positions", "negative_key", "negative_turn_lengths"]
    assert not set(names) & set(FORMATTED_SCHEMA.names)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"grad_cache": {"chunk_size": 0}}, "chunk_size must be a positive integer or null, got 0"),
        ({"grad_cache": {"chunk_size": True}}, "chunk_size must be a positive integer or null, got True"),
        ({"grad_cache": {"chunk_size": 2}, "gradient_accumulation_steps": 4}, "replaces gradient accumulation"),
    ],
)
def test_grad_cache_settings_that_cannot_run_are_named(overrides, message):
    training = {**load_params()["training"], **overrides}
    with pytest.raises(ValueError, match=message):
        validate_grad_cache(training, {"zero_optimization": {"stage": 2}})
    validate_grad_cache(load_params()["training"], {"zero_optimization": {"stage": 0}})  # off: nothing to check


def test_grad_cache_needs_a_zero_stage():
    training = {**load_params()["training"], "grad_cache": {"chunk_size": 2}}
    with pytest.raises(ValueError, match="needs ZeRO stage 1, 2 or 3"):
        validate_grad_cache(training, {"zero_optimization": {"stage": 0}})
    validate_grad_cache(training, {"zero_optimization": {"stage": 2}})
