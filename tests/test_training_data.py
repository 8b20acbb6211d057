"""Training input: records and images streamed from the formatted files, batches made in worker processes."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from muco_flow.data import schema
from muco_flow.data.conversations import FormatConfig
from muco_flow.data.formatting import assemble_conversations, format_m3t_part, format_m3t_shards, merge_format_parts
from muco_flow.data.ingest import IngestConfig
from muco_flow.data.m3t_ingest import ingest_m3t_snapshot
from muco_flow.data.record_index import INDEX_FILE, RecordIndex, scan_record_files
from muco_flow.data.shards import read_shard
from muco_flow.data.sources import LocalSnapshot
from muco_flow.modeling.backbone import load_processors
from muco_flow.training.config import DataMixSettings, TrainingConfig
from muco_flow.training.data import (
    Batch,
    ConversationBatches,
    batch_bytes,
    batch_loader,
    check_shared_memory,
    epoch_units,
)
from muco_flow.training.stage import describe_run
from tests.conftest import PROJECT_ROOT, load_params, with_value

# two conversations of 4 and 3 turns per sample: batches of two K's, two units per record
FORMAT_PARAMS = {**load_params()["format"], "turns_per_conversation": 4}


@pytest.fixture(scope="module")
def formatted(small_sample_root, tiny_backbone_dir, tmp_path_factory):
    ingested = tmp_path_factory.mktemp("ingested")
    ingest_m3t_snapshot(
        LocalSnapshot(small_sample_root, schema.TRAIN_META_FILE), ingested, IngestConfig(rows_per_shard=10)
    )
    tokenizer, image_processor = load_processors(str(tiny_backbone_dir))
    out = tmp_path_factory.mktemp("formatted")
    format_m3t_shards(ingested, out, tokenizer, image_processor, FormatConfig.from_params(FORMAT_PARAMS))
    return ingested, out, tokenizer, image_processor


def make_batches(formatted, rank=0, world_size=1, batch_size=2, data_mix=None, heldout=0):
    ingested, out, tokenizer, image_processor = formatted
    return ConversationBatches.for_tokenizer(
        out,
        ingested,
        image_processor,
        tokenizer,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=3,
        data_mix=data_mix,
        heldout=heldout,
    )


def test_records_and_images_read_back_as_ingested(formatted):
    ingested, out, _, _ = formatted
    manifest = json.loads((out / "manifest.json").read_text())
    # one record file and one image file per ingest shard, named after it (24 samples, 10 per shard)
    assert [(s["file"], s["images"], s["rows"]) for s in manifest["shards"]] == [
        (f"conversations/part-{i:05d}.arrow", f"conversations/part-{i:05d}.images", rows)
        for i, rows in enumerate([10, 10, 4])
    ]
    expected = [r for s in manifest["shards"] for r in read_shard(out / s["file"]).to_pylist()]
    ingested_images = {}
    for path in sorted((ingested / "shards").glob("*.parquet")):
        for row, sample in enumerate(pq.read_table(path).to_pylist()):
            ingested_images[(f"shards/{path.name}", row)] = sample["image_bytes"]
    records = make_batches(formatted).records
    assert records.rows == len(expected) == 24
    for index in (0, 9, 10, 23, 5):  # across record files, in any order
        record = records.record(index)
        assert {k: v for k, v in record.items() if k != "image"} == expected[index]
        assert record["image"] == ingested_images[(record["image_shard"], record["image_row"])]
    # an image file is its shard's images back to back, each once
    first = [ingested_images[("shards/part-00000.parquet", row)] for row in range(10)]
    assert (out / "conversations/part-00000.images").read_bytes() == b"".join(first)


def old_epoch_batches(batches, epoch):
    """The order the list-based reader of earlier versions drew: (record, part) tuples grouped by K."""
    by_turns = {}
    for record in range(batches.records.rows):
        for part, turns in enumerate(batches.records.record(record)["part_turns"]):
            if turns:
                by_turns.setdefault(turns, []).append((record, part))
    rng = random.Random(f"muco-train:{batches.seed}:{epoch}")
    out = []
    for turns in sorted(by_turns):
        units = list(by_turns[turns])
        rng.shuffle(units)
        full = len(units) // batches.global_batch * batches.global_batch
        out.extend(units[i : i + batches.global_batch] for i in range(0, full, batches.global_batch))
    rng.shuffle(out)
    return out


def test_epochs_draw_the_batches_the_list_based_reader_drew_split_between_ranks(formatted):
    ranks = [make_batches(formatted, rank=r, world_size=2) for r in range(2)]
    first = ranks[0]
    assert first.steps_per_epoch == 2 * (24 // 4)  # 24 units of each K, global batch 4
    for epoch in (0, 1, 2):
        epoch_units = first.epoch_batches(epoch)
        assert epoch_units.tolist() == ranks[1].epoch_batches(epoch).tolist()  # every rank agrees
        as_pairs = [[(int(first.unit_record[u]), int(first.unit_part[u])) for u in batch] for batch in epoch_units]
        assert as_pairs == old_epoch_batches(first, epoch)
    step = first.steps_per_epoch + 5  # epoch 1, batch 5
    shares = [b.batch(step) for b in ranks]
    units = first.epoch_batches(1)[5].tolist()
    records = first.records
    names = [f"{records.record(int(first.unit_record[u]))['sample_id']}#{first.unit_part[u]}" for u in units]
    assert shares[0].conversation_ids + shares[1].conversation_ids == names
    record = records.record(int(first.unit_record[units[0]]))
    conversation = assemble_conversations(record, 1, first.settings, first.image_pad_id)[int(first.unit_part[units[0]])]
    assert shares[0].query["input_ids"][0][: len(conversation.query_ids)].tolist() == conversation.query_ids


def test_m3t_is_one_dataset_so_homogeneous_batches_change_nothing_and_weights_are_refused(formatted):
    plain = make_batches(formatted, batch_size=5)
    homogeneous = make_batches(
        formatted, batch_size=5, data_mix=DataMixSettings(weights={}, caps={}, homogeneous_batches=True)
    )
    assert homogeneous.steps_per_epoch == plain.steps_per_epoch == 8  # two K's, 24 units each: 4 batches of 5 each
    assert homogeneous.epoch_batches(1).tolist() == plain.epoch_batches(1).tolist()
    with pytest.raises(ValueError, match="need conversations of one turn count"):
        make_batches(formatted, data_mix=DataMixSettings(weights={"": 2.0}, caps={}, homogeneous_batches=False))


def test_the_held_out_records_are_never_in_a_training_batch_and_are_the_whole_held_out_slice(formatted):
    batches = make_batches(formatted, heldout=5)
    # 24 records, each two conversations (4 and 3 turns): 5 held out leave 19 of each K, 9 batches of 2 per K
    assert len(batches.heldout.turns) == 10 and batches.conversations == 38
    assert batches.steps_per_epoch == 18
    records = batches.records
    held = {records.record(int(r))["sample_id"] for r in batches.heldout.record.tolist()}
    assert len(held) == 5
    for epoch in (0, 1):
        for units in batches.epoch_batches(epoch):
            trained = {records.record(int(batches.unit_record[u]))["sample_id"] for u in units}
            assert not trained & held
    scored = [cid for batch in batches.heldout_batches(3) for cid in batch.conversation_ids]
    assert sorted(scored) == sorted(f"{sample}#{part}" for sample in held for part in (0, 1))
    assert {batch.turns for batch in batches.heldout_batches(3)} == {3, 4}  # one K per batch
    # each query turn's M3T turn type, as the records hold them (the held-out score averages over types)
    for batch in batches.heldout_batches(3):
        for row, cid in enumerate(batch.conversation_ids):
            sample, part = cid.split("#")
            record = next(records.record(int(r)) for r in batches.heldout.record.tolist()
                          if records.record(int(r))["sample_id"] == sample)  # fmt: skip
            conversation = assemble_conversations(record, 0, batches.settings, batches.image_pad_id)[int(part)]
            turns = batch.turn_types[row * batch.turns : (row + 1) * batch.turns].tolist()
            assert turns == conversation.turn_type and all(kind >= 0 for kind in turns)
    # the same records whatever the training seed or rank: every rank scores the same slice
    other = make_batches(formatted, rank=1, world_size=2, heldout=5)
    assert other.heldout.record.tolist() == batches.heldout.record.tolist()
    assert make_batches(formatted).conversations == 48  # none held out: all 24 records' conversations train


def assert_same_batch(a, b):
    assert a.conversation_ids == b.conversation_ids and a.turns == b.turns
    assert torch.equal(a.target_keys, b.target_keys)
    for side in ("query", "target"):
        got, want = getattr(a, side), getattr(b, side)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got)


@pytest.mark.parametrize(  # 2 workers are DataLoader processes: slow
    ("workers", "chunk_size"),
    [(0, None), pytest.param(2, None, marks=pytest.mark.slow), pytest.param(2, 1, marks=pytest.mark.slow)],
)
def test_the_loader_gives_step_s_batch_s_from_any_start(formatted, workers, chunk_size, tmp_path, monkeypatch):
    batches = make_batches(formatted)
    start, stop = 10, 27  # resumed mid-epoch, across an epoch boundary (24 steps per epoch)
    draws = tmp_path / "draws"  # the process of every epoch drawn (forked workers inherit the patch)

    def recorded_epoch_units(*args):
        with draws.open("a") as file:
            file.write(f"{os.getpid()}\n")
        return epoch_units(*args)

    monkeypatch.setattr("muco_flow.training.data.epoch_units", recorded_epoch_units)
    rng = torch.get_rng_state()
    made = list(batch_loader(batches, start, stop, chunk_size=chunk_size, workers=workers, prefetch=2))
    # the training process's random state (dropout, restored on resume) is left as it was
    assert torch.equal(torch.get_rng_state(), rng)
    # epochs 0 and 1 drawn once each, by the rank: its workers read them (at M3T size a draw takes seconds)
    assert draws.read_text().split() == [str(os.getpid())] * 2
    reference = make_batches(formatted)
    assert len(made) == stop - start
    for step, parts in zip(range(start, stop), made, strict=True):
        expected = reference.batch_chunks(step, chunk_size) if chunk_size else [reference.batch(step)]
        assert len(parts) == len(expected) == (2 if chunk_size else 1)
        for got, want in zip(parts, expected, strict=True):
            assert_same_batch(got, want)


def test_a_steps_batch_bytes_are_its_tensors_bytes():
    part = Batch(
        query={"input_ids": torch.zeros(2, 5, dtype=torch.int64)},  # 80 bytes
        target={"pixel_values": torch.zeros(3, 4, dtype=torch.float32)},  # 48
        turns=1,
        conversation_ids=["a", "b"],
        target_keys=torch.zeros(2, dtype=torch.int64),  # 16
        negative={"input_ids": torch.zeros(1, 3, dtype=torch.int32)},  # 12
    )
    assert batch_bytes([part, part]) == 2 * (80 + 48 + 16 + 12)


def test_batches_in_flight_beyond_shared_memory_are_refused_with_the_fix(tmp_path):
    size = shutil.disk_usage(tmp_path).total
    # 2 ranks x 2 workers x prefetch 2 = 8 steps in flight: a step of size / 8 fits, one byte more does not
    check_shared_memory(size // 8, workers=2, prefetch=2, ranks_on_node=2, shared_memory=tmp_path)
    with pytest.raises(RuntimeError, match=r"2 ranks x training\.data_workers=2 x prefetch 2 .*--shm-size=\d+g"):
        check_shared_memory(size // 8 + 1, workers=2, prefetch=2, ranks_on_node=2, shared_memory=tmp_path)
    check_shared_memory(size, workers=0, prefetch=2, ranks_on_node=2, shared_memory=tmp_path)  # no workers: no check


def test_older_or_damaged_files_are_named(formatted, tmp_path):
    ingested, out, _, _ = formatted
    copy = tmp_path / "formatted"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    # an image file cut short: the sample and the file are named
    images = copy / manifest["shards"][0]["images"]
    images.write_bytes(images.read_bytes()[:-10])
    batches = make_batches((ingested, copy, *formatted[2:]))
    with pytest.raises(ValueError, match=r"part-00000\.images ends before the image of sample \S+ .*re-run the format"):
        [batches.records.record(i) for i in range(10)]
    # records of the Parquet era
    manifest["shards"][0]["file"] = "conversations/part-00000.parquet"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"part-00000\.parquet was formatted by an earlier muco-flow version"):
        make_batches((ingested, copy, *formatted[2:]))
    with pytest.raises(ValueError, match=r"training\.data_workers must be >= 0"):
        batch_loader(make_batches(formatted), 0, 1, workers=-1)


def tree(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_format_parts_and_workers_write_the_same_bytes_as_one_process(formatted, tmp_path):
    ingested, out, tokenizer, image_processor = formatted
    split = tmp_path / "split"
    config = FormatConfig.from_params({**FORMAT_PARAMS, "num_workers": 2})
    for part in (1, 0):  # in any order, as array tasks finish
        format_m3t_part(ingested, split, tokenizer, image_processor, config, part_index=part, num_parts=2)
    merge_format_parts(ingested, split, 2)
    assert tree(split) == tree(out)  # the part summaries are gone after the merge


def test_the_format_merge_names_a_missing_part_or_other_settings(formatted, tmp_path):
    ingested, _, tokenizer, image_processor = formatted
    split = tmp_path / "split"
    config = FormatConfig.from_params(FORMAT_PARAMS)
    format_m3t_part(ingested, split, tokenizer, image_processor, config, part_index=0, num_parts=2)
    with pytest.raises(ValueError, match=r"format part 1 of 2 has not finished: no .*part-00001-of-00002\.json"):
        merge_format_parts(ingested, split, 2)
    other = FormatConfig.from_params({**FORMAT_PARAMS, "max_length": 512})
    format_m3t_part(ingested, split, tokenizer, image_processor, other, part_index=1, num_parts=2)
    with pytest.raises(ValueError, match=r"format parts 0 and 1 were run with other format settings"):
        merge_format_parts(ingested, split, 2)
    with pytest.raises(ValueError, match=r"format part 2 of 2: need num_parts >= 1 and 0 <= part_index < num_parts"):
        format_m3t_part(ingested, split, tokenizer, image_processor, config, part_index=2, num_parts=2)


@pytest.mark.slow
def test_the_cli_formats_as_two_torchrun_nodes_then_merges(formatted, tiny_backbone_dir, tmp_path):
    ingested, out, _, _ = formatted
    override = tmp_path / "override.yml"
    override.write_text("format:\n  turns_per_conversation: 4\n  num_workers: 2\n")
    split = tmp_path / "split"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GROUP_"))}
    env |= {"PYTHONPATH": str(PROJECT_ROOT / "src"), "GROUP_WORLD_SIZE": "2"}
    cli = [sys.executable, "-m", "muco_flow.data.parts_cli"]
    params = ["--params", "conf/base/parameters_format.yml", "--params", str(override)]
    common = ["--shards", str(ingested), "--output", str(split), *params]
    for node in ("1", "0"):
        subprocess.run(
            [*cli, "format-part", "--backbone", str(tiny_backbone_dir), *common],
            env={**env, "GROUP_RANK": node},
            check=True,
            cwd=PROJECT_ROOT,
        )
    subprocess.run([*cli, "format-merge", *common], env=env, check=True, cwd=PROJECT_ROOT)
    assert tree(split) == tree(out)


def test_token_ids_come_from_the_vocabulary_or_the_tokenizer_is_refused():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from muco_flow.modeling.tokens import token_id

    def tokenizer(vocabulary: list[str]) -> PreTrainedTokenizerFast:
        word_level = models.WordLevel({token: i for i, token in enumerate(vocabulary)}, unk_token="[UNK]")
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(word_level), unk_token="[UNK]")

    muco = tokenizer(["[UNK]", "<|endoftext|>", "<|image_pad|>", "<|emb|>"])
    assert (token_id(muco, "<|endoftext|>"), token_id(muco, "<|image_pad|>"), token_id(muco, "<|emb|>")) == (1, 2, 3)
    with pytest.raises(ValueError, match=r"the tokenizer has no <\|emb\|> token"):
        token_id(tokenizer(["[UNK]", "<|endoftext|>", "<|image_pad|>"]), "<|emb|>")  # it maps to [UNK]
    with pytest.raises(ValueError, match="the tokenizer has no padding token"):
        token_id(muco, muco.pad_token)  # None: no padding token was set


def run_name_of(formatted, stage, training):
    ingested, out, _, _ = formatted
    config = {
        "stage": stage,
        "checkpoint": "/models/tiny-qwen2_vl",
        "conversations_dir": str(out),
        "shards_dir": str(ingested),
        "backbone": {},
        "git_commit": "0" * 40,
    }
    kedro_run = {"pipelines": "evaluate,register,train", "env": "local", "command": "kedro run --pipelines=train"}
    return describe_run(config, TrainingConfig.from_dict(training), kedro_run)["run_name"]


def test_run_names_say_stage_backbone_steps_and_seed_never_the_pipelines(formatted):
    training = load_params()["training"]  # 8 conversations x 2 processes per step, 2 epochs, seed 0
    # 24 conversations of each turn count: one full global batch of 16 each, 2 steps per epoch
    assert run_name_of(formatted, "train", training) == "stage1-tiny-qwen2_vl-4steps-seed0"
    smaller = with_value(with_value(training, "micro_batch_size", 2), "epochs", 3)
    assert run_name_of(formatted, "train", smaller) == "stage1-tiny-qwen2_vl-36steps-seed0"  # 3 x (6 + 6) steps
    three_nodes = with_value(with_value(smaller, "launcher.nodes", 3), "epochs", 1)
    assert run_name_of(formatted, "train", three_nodes) == "stage1-tiny-qwen2_vl-4steps-seed0"  # global batch 12
    twenty = with_value(with_value(training, "max_steps", 20), "seed", 7)
    assert run_name_of(formatted, "finetune", twenty) == "stage2-tiny-qwen2_vl-20steps-seed7"
    with pytest.raises(ValueError, match="pipelines"):
        run_name_of(formatted, "train", with_value(training, "run_name", "{pipelines}-{checkpoint}"))


def test_the_record_index_holds_each_records_turns_as_the_records_do(formatted, tmp_path):
    """Start-up reads the format's record index, not the record files; its turns are the records' own."""
    ingested, out, _, _ = formatted
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["record_index"] == INDEX_FILE
    index = RecordIndex.load(out)
    batches = make_batches(formatted)
    records = [batches.records.record(i) for i in range(batches.records.rows)]
    values, lengths = index.lists["part_turns"]
    assert lengths.tolist() == [len(r["part_turns"]) for r in records]
    assert values.tolist() == [turns for r in records for turns in r["part_turns"]]
    assert index.rows == len(records) > 0
    assert index.batches_per_file.tolist() == [
        pa.ipc.open_file(str(out / shard["file"])).num_record_batches for shard in manifest["shards"]
    ]

    # data formatted before the index: its record files are scanned, to the same conversations
    copy = tmp_path / "formatted"
    shutil.copytree(out, copy)
    del manifest["record_index"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / INDEX_FILE).unlink()
    scanned = make_batches((ingested, copy, *formatted[2:]))
    assert [a.tolist() for a in (scanned.unit_record, scanned.unit_part, scanned.unit_turns)] == [
        a.tolist() for a in (batches.unit_record, batches.unit_part, batches.unit_turns)
    ]


def test_a_record_index_that_does_not_fit_the_records_is_named(formatted, tmp_path):
    ingested, out, _, _ = formatted
    copy = tmp_path / "formatted"
    shutil.copytree(out, copy)
    index = RecordIndex.load(copy)
    values, lengths = index.lists["part_turns"]
    cut = RecordIndex(index.batches_per_file, index.batch_rows, {"part_turns": (values, lengths[:-1])}, {})
    cut.save(copy)
    with pytest.raises(ValueError, match=r"record_index\.npz: column part_turns does not have one value per record"):
        make_batches((ingested, copy, *formatted[2:]))
    one_file_less = RecordIndex(index.batches_per_file[:-1], index.batch_rows[: -index.batches_per_file[-1]], {}, {})
    one_file_less = RecordIndex(
        one_file_less.batches_per_file,
        one_file_less.batch_rows,
        {"part_turns": (values, lengths[: one_file_less.rows])},
        {},
    )
    one_file_less.save(copy)
    with pytest.raises(ValueError, match=r"indexes \d+ record files, the manifest lists \d+; re-run the format"):
        make_batches((ingested, copy, *formatted[2:]))


def test_the_record_index_of_hand_made_record_files(tmp_path):
    """Two files, three record batches: rows per batch, a list column flat with its lengths, and category codes."""
    table_schema = pa.schema([("part_turns", pa.list_(pa.int32())), ("dataset", pa.string())])
    batches = [
        [{"part_turns": [7], "dataset": "VOC"}, {"part_turns": [3, 4], "dataset": "A-OKVQA"}],
        [{"part_turns": [], "dataset": "VOC"}],
        [{"part_turns": [2, 0, 5], "dataset": "CIRR"}],
    ]
    files = [tmp_path / "a.arrow", tmp_path / "b.arrow"]
    for path, rows in ((files[0], batches[:2]), (files[1], batches[2:])):
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table_schema) as writer:
            for batch in rows:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=table_schema))
    scan_record_files(files, ("part_turns",), ("dataset",)).save(tmp_path)
    index = RecordIndex.load(tmp_path)
    assert index.batches_per_file.tolist() == [2, 1] and index.batch_rows.tolist() == [2, 1, 1]
    values, lengths = index.lists["part_turns"]
    assert values.tolist() == [7, 3, 4, 2, 0, 5] and lengths.tolist() == [1, 2, 0, 3]
    codes, names = index.categories["dataset"]
    assert names == ["A-OKVQA", "CIRR", "VOC"] and codes.tolist() == [2, 0, 2, 1]
