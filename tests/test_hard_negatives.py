"""Hard negatives in stage 1: M3T's neg_text formatted as one-turn target conversations, batched, configured."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muco_flow.data.conversations import FormatConfig, target_key
from muco_flow.data.formatting import assemble_conversations
from muco_flow.modeling.inputs import build_model_inputs
from muco_flow.training.config import TrainingConfig
from muco_flow.training.data import ConversationBatches
from muco_flow.training.launch import validate_grad_cache
from tests.conftest import load_params
from tests.test_format import SYSTEM, ingested, processors, run_format, source_rows, turn  # noqa: F401 (fixtures)


def batches_of(formatted, ingested_dir, processor_pair, **options):
    tokenizer, image_processor = processor_pair
    return ConversationBatches.for_tokenizer(
        formatted,
        ingested_dir,
        image_processor,
        tokenizer,
        rank=0,
        world_size=1,
        seed=0,
        **{"batch_size": 2, **options},
    )


def test_negatives_decode_to_one_turn_conversations_in_the_query_order(ingested, processors, tmp_path):  # noqa: F811
    tokenizer, _ = processors
    manifest, records = run_format(ingested, processors, tmp_path, hard_negatives=True)
    assert manifest["settings"]["hard_negatives"] is True
    assert manifest["counts"]["conversations"] == 24 and manifest["counts"]["turns_dropped"] == 0
    rows = source_rows(ingested)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    _, plain = run_format(ingested, processors, tmp_path)
    for record, without in zip(records, plain, strict=True):
        wrong = rows[record["sample_id"]]["neg_text"]
        for epoch in (0, 1):
            (conversation,) = assemble_conversations(record, epoch, manifest["settings"], image_pad)
            expected = [SYSTEM + turn(wrong[k]) for k in conversation.turn_index]
            assert [tokenizer.decode(ids) for ids in conversation.negative_ids] == expected
            assert conversation.negative_key == [target_key(wrong[k]) for k in conversation.turn_index]
        # the query and target pieces are those formatted without negatives
        assert {k: v for k, v in record.items() if not k.startswith("negative")} == {
            k: v for k, v in without.items() if not k.startswith("negative")
        }
        assert without["negative_ids"] == [] and without["negative_key"] == []


def test_training_asks_for_negatives_the_format_did_not_write(ingested, processors, tmp_path):  # noqa: F811
    manifest, _ = run_format(ingested, processors, tmp_path)
    formatted = sorted(tmp_path.iterdir())[-1]
    assert manifest["settings"]["hard_negatives"] is False
    with pytest.raises(ValueError, match=r"training.hard_negatives is set but .* format.hard_negatives: true"):
        batches_of(formatted, ingested, processors, hard_negatives=True)


def test_batched_negatives_are_the_tokens_training_encodes_targets_with(ingested, processors, tmp_path):  # noqa: F811
    """Each negative row is its text as an independent target is encoded, sample-major like the targets."""
    tokenizer, _ = processors
    run_format(ingested, processors, tmp_path, hard_negatives=True)
    formatted = sorted(tmp_path.iterdir())[-1]
    batch = batches_of(formatted, ingested, processors, batch_size=3, hard_negatives=True).batch(0)
    assert batch.negative["input_ids"].shape[0] == 3 * 7 == batch.negative["emb_index"].shape[0]
    assert batch.negative_keys.shape == batch.target_keys.shape == (21,)
    template = FormatConfig.from_params(load_params()["format"]).templates.single_turn()
    emb = tokenizer.convert_tokens_to_ids("<|emb|>")
    for row in range(21):
        length = int(batch.negative["attention_mask"][row].sum())
        ids = batch.negative["input_ids"][row, :length].tolist()
        text = tokenizer.decode(ids)
        answer = text[text.index("user\n") + 5 : text.index("<|im_end|>\n<|im_start|>assistant")]
        expected = build_model_inputs(tokenizer, processors[1], [template.replace("{text}", answer)], [None])
        assert ids == expected["input_ids"][0].tolist()
        assert batch.negative["emb_index"][row].tolist() == [row, ids.index(emb)]
        assert batch.negative_keys[row] == target_key(answer)
    assert batch.tokens == sum(
        int(side["attention_mask"].sum()) for side in (batch.query, batch.target, batch.negative)
    )
    # without training.hard_negatives the same shards give batches without them
    assert batches_of(formatted, ingested, processors, batch_size=3).batch(0).negative is None


def test_chunks_are_the_batch_in_order(ingested, processors, tmp_path):  # noqa: F811
    run_format(ingested, processors, tmp_path, hard_negatives=True)
    formatted = sorted(tmp_path.iterdir())[-1]
    batches = batches_of(formatted, ingested, processors, batch_size=5, hard_negatives=True)
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
    with pytest.raises(ValueError, match=r"format.hard_negatives is set but sample .* has no neg_text"):
        run_format(copy, processors, tmp_path, hard_negatives=True)


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
        validate_grad_cache(TrainingConfig.from_dict(training), {"zero_optimization": {"stage": 2}})
    off = TrainingConfig.from_dict(load_params()["training"])
    validate_grad_cache(off, {"zero_optimization": {"stage": 0}})  # off: nothing to check


def test_grad_cache_needs_a_zero_stage():
    training = {**load_params()["training"], "grad_cache": {"chunk_size": 2}}
    with pytest.raises(ValueError, match="needs ZeRO stage 1, 2 or 3"):
        validate_grad_cache(TrainingConfig.from_dict(training), {"zero_optimization": {"stage": 0}})
    validate_grad_cache(TrainingConfig.from_dict(training), {"zero_optimization": {"stage": 2}})
