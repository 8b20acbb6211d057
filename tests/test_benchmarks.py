"""Benchmarks at their smallest settings: the JSON they write, and the arithmetic they rest on.

Nothing here asserts on speed: timings on a shared machine prove nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import common
from benchmarks.__main__ import BENCHMARKS, report, update_docs
from benchmarks.retrieval_scaling import GeneratedPool, working_set_bytes
from benchmarks.training_throughput import Work, batch_work, ideal_ratio, per_token_training_flops
from benchmarks.zero_memory import theoretical_bytes
from muco_flow.evaluation.retrieval import chunked_top_k
from tests.conftest import PROJECT_ROOT, load_params


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("benchmarks")


def run_benchmark(name: str, out: Path, *options: str) -> dict:
    """``python -m benchmarks.<name> --quick``, as a user runs it; returns the JSON it wrote."""
    command = [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out), *options]
    finished = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    document = common.read_result(out, name)
    assert_common_structure(document, name)
    return document


def assert_common_structure(document: dict, name: str) -> None:
    assert document["benchmark"] == name
    assert {"platform", "cpu_count", "python"} <= document["machine"].keys()
    assert {"torch", "transformers", "deepspeed", "muco_flow_commit"} <= document["versions"].keys()
    assert document["parameters"] and document["results"]
    for goal in document["goals"]:
        assert set(goal) == {"goal", "target", "measured", "met"}
    for summary in _summaries(document["results"]):
        assert summary["min"] <= summary["median"] <= summary["max"] and summary["repeats"] >= 1


def _summaries(value):
    if isinstance(value, dict):
        if {"median", "min", "max", "repeats"} <= value.keys():
            yield value
        for inner in value.values():
            yield from _summaries(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _summaries(inner)


def test_ideal_ratio_from_hand_counted_tokens():
    # K=3 pairs of one image with 4 image tokens (16 patches); system header 10
    # tokens; each query turn 8 tokens, each target turn 7.
    single = Work(lm_tokens=3 * (10 + 4 + 8) + 3 * (10 + 7), vision_patches=3 * 16)
    multi = Work(lm_tokens=(10 + 4 + 3 * 8) + (10 + 3 * 7), vision_patches=16)
    assert (single.lm_tokens, multi.lm_tokens) == (117, 69)
    cost = {"lm_token": 100.0, "vision_patch": 25.0}
    assert ideal_ratio(single, multi, cost) == pytest.approx((117 * 100 + 48 * 25) / (69 * 100 + 16 * 25))
    assert ideal_ratio(multi, multi, cost) == 1.0


def test_per_token_flops_from_the_tiny_presets_shapes(tiny_backbone_dir, tiny_preset):
    from benchmarks.workload import training_embedder

    embedder = training_embedder(load_params(), tiny_backbone_dir)
    text, vision = tiny_preset["text"], tiny_preset["vision"]
    d, ffn, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    kv = d // text["num_attention_heads"] * text["num_key_value_heads"]
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, ffn), (d, ffn), (ffn, d)]  # q k v o gate up down
    r = load_params()["training"]["embedder"]["lora"]["r"]
    frozen = layers * sum(i * o for i, o in shapes)
    lora = layers * sum(r * (i + o) for i, o in shapes)
    # frozen weights: forward + input gradient; LoRA: + its own weight gradient
    assert per_token_training_flops(embedder)["lm_token"] == 4 * frozen + 6 * lora

    e = vision["embed_dim"]
    patch = 3 * 2 * 14 * 14 * e
    block = e * 3 * e + e * e + 2 * e * (e * vision["mlp_ratio"])  # qkv, proj, fc1, fc2
    merger = (4 * e) * (4 * e) + (4 * e) * d  # once per 2 x 2 patches
    assert per_token_training_flops(embedder)["vision_patch"] == 2 * (patch + vision["depth"] * block) + 2 * merger / 4


@pytest.mark.parametrize("target_layout", ["independent", "conversation"])
def test_both_modes_hold_the_same_pairs_and_differ_by_the_repeated_header_and_image(
    small_sample_root, tiny_backbone_dir, target_layout
):
    from benchmarks import workload
    from muco_flow.data.conversations import ChatTemplates

    params = load_params()
    embedder = workload.training_embedder(params, tiny_backbone_dir)
    samples, originals = workload.sample_images(small_sample_root, 2)
    images, processor = workload.square_images(originals, 56, tiny_backbone_dir)
    turns = 3
    batches = workload.paired_batches(
        samples,
        images,
        turns=turns,
        embedder=embedder,
        image_processor=processor,
        format_params={**params["format"], "target_layout": target_layout},
    )
    single, multi = batches["single_turn"], batches["multi_turn"]
    assert single.pairs == multi.pairs == 2 * turns
    assert (len(single.conversation_ids), len(multi.conversation_ids)) == (2 * turns, 2)

    templates = ChatTemplates(**params["format"]["templates"])
    framing = {"system", "user", "assistant", "You are a helpful assistant."}

    def turn_texts(side: dict) -> list[str]:
        texts = embedder.tokenizer.batch_decode(side["input_ids"], skip_special_tokens=True)
        return sorted(line for text in texts for line in text.splitlines() if line.strip() not in framing | {""})

    for side in ("query", "target"):
        assert turn_texts(getattr(single, side)) == turn_texts(getattr(multi, side))

    def count(text: str) -> int:
        return len(embedder.tokenizer(text, add_special_tokens=False)["input_ids"])

    header = count(templates.system)
    image_tokens = (56 // 28) ** 2
    placeholder = count(templates.image) - 1 + image_tokens  # <|image_pad|> becomes the image's tokens
    single_work, multi_work = batch_work(single), batch_work(multi)
    # each of the K-1 extra conversations per image repeats the header and the image on the query side, and
    # the header on the target side unless independent targets already give every target its own header;
    # the newline after the image takes the place of the separator between turns, but one target
    # conversation of K turns has K-1 separators that K one-turn conversations do not
    extra_conversations = 2 * (turns - 1)
    separator = count(templates.turn_separator)
    target_header = header - separator if target_layout == "conversation" else 0
    assert single_work.lm_tokens - multi_work.lm_tokens == extra_conversations * (header + target_header + placeholder)
    assert single_work.vision_patches == turns * multi_work.vision_patches == turns * 2 * 4 * image_tokens


@pytest.mark.slow
def test_training_throughput_quick(results_dir, small_sample_root, tiny_backbone_dir):
    document = run_benchmark(
        "training_throughput", results_dir, "--sample", str(small_sample_root), "--backbone", str(tiny_backbone_dir)
    )
    steps = {(r["mode"], r["turns"]): r for r in document["results"] if r["kind"] == "step"}
    assert set(steps) == {("single_turn", 1), ("single_turn", 3), ("multi_turn", 3)}
    images = document["parameters"]["images_per_step"]
    for (mode, turns), step in steps.items():
        assert step["pairs_per_step"] == images * turns
        assert step["conversations_per_step"] == images * (turns if mode == "single_turn" else 1)
    cost = {
        "lm_token": document["parameters"]["flops_per_lm_token"],
        "vision_patch": document["parameters"]["flops_per_vision_patch"],
    }
    comparisons = {c["turns"]: c for c in document["results"] if c["kind"] == "multi_over_single"}
    assert comparisons[1]["ideal_ratio"] == 1.0
    work = {key: Work(s["lm_tokens"], s["vision_patches"]) for key, s in steps.items()}
    expected = ideal_ratio(work[("single_turn", 3)], work[("multi_turn", 3)], cost)
    assert comparisons[3]["ideal_ratio"] == pytest.approx(expected)
    assert comparisons[3]["ideal_ratio"] > 1
    assert comparisons[3]["fraction_of_ideal"] == pytest.approx(
        comparisons[3]["measured_ratio"]["median"] / comparisons[3]["ideal_ratio"]
    )


@pytest.mark.slow
def test_data_path_quick(results_dir, tiny_backbone_dir):
    document = run_benchmark("data_path", results_dir, "--backbone", str(tiny_backbone_dir))
    stages = {r["stage"]: r for r in document["results"]}
    processes = document["parameters"]["training_processes"]
    training = stages[f"training, {processes} processes (x{processes})"]["per_second"]["median"]
    assert training == pytest.approx(processes * stages["training, 1 process"]["per_second"]["median"])
    for stage in ("ingest", "format", "batch assembly"):
        assert stages[stage]["ratio_to_training"] == pytest.approx(stages[stage]["per_second"]["median"] / training)
    assert [g["goal"].split(" at least")[0] for g in document["goals"]] == ["ingest", "format", "batch assembly"]


@pytest.mark.slow
def test_ingest_scaling_quick(results_dir):
    document = run_benchmark("ingest_scaling", results_dir)
    for result in document["results"]:
        assert result["counts"] == {"read": result["rows"], "accepted": result["rows"], "rejected": 0}
    assert len(document["goals"]) == 1


@pytest.mark.slow
def test_data_parallelism_quick(results_dir, tiny_backbone_dir):
    document = run_benchmark("data_parallelism", results_dir, "--backbone", str(tiny_backbone_dir))
    one, two, parts = document["results"]
    assert (one["processes"], two["processes"], parts["parts"]) == (1, 2, 3)
    for result in (one, two):  # one repeat: its ingest and its format time
        assert result["total_seconds"]["median"] == pytest.approx(
            result["seconds"]["median"] + result["format_seconds"]["median"]
        )
    assert two["speedup_over_1_process"] == pytest.approx(
        one["total_seconds"]["median"] / two["total_seconds"]["median"]
    )
    assert parts["identical_to_one_process"] is True  # 3 parts and 2 processes wrote the one-process files
    assert document["goals"][1]["met"] and document["goals"][1]["measured"].startswith("identical")


@pytest.mark.slow
def test_retrieval_scaling_quick(results_dir):
    document = run_benchmark("retrieval_scaling", results_dir)
    parameters = document["parameters"]
    assert {(r["pool_size"], r["dim"]) for r in document["results"]} == {
        (size, dim) for size in parameters["pool_sizes"] for dim in parameters["dims"]
    }
    for result in document["results"]:
        expected = working_set_bytes(
            result["pool_size"],
            result["dim"],
            parameters["queries"],
            parameters["query_chunk"],
            parameters["pool_chunk"],
        )
        assert result["working_set_mib"] == pytest.approx(expected / 2**20)


def test_a_generated_pool_streams_the_same_top_k_as_brute_force():
    pool = GeneratedPool(size=2500, dim=12, block=700, seed=3)
    whole = torch.cat(list(pool))
    assert whole.shape == (2500, 12) and torch.equal(whole, torch.cat(list(pool)))  # the same pool each pass
    queries = torch.randn(9, 12, generator=torch.Generator().manual_seed(4))
    scores, indices = chunked_top_k(queries, pool, 10, query_chunk=4)
    expected = (queries @ whole.T).topk(10, dim=1)
    torch.testing.assert_close(scores, expected.values)
    assert torch.equal(indices, expected.indices)
    # a block and its scores, not the pool
    assert working_set_bytes(10**6, 1536, 64, 1024, 65536) == (65536 * 1536 + 64 * 65536) * 4


def test_zero_theory_for_a_known_parameter_count():
    p, f, n = 1_000, 3_000, 2
    assert theoretical_bytes(0, p, f, n) == {
        "parameters": 16_000,
        "gradients": 4_000,
        "optimizer_state": 8_000,
        "fp32_master": 0,
    }
    assert theoretical_bytes(1, p, f, n) == {
        "parameters": 16_000,
        "gradients": 4_000,
        "optimizer_state": 4_000,
        "fp32_master": 2_000,
    }
    assert theoretical_bytes(2, p, f, n)["gradients"] == 2_000
    assert theoretical_bytes(3, p, f, n)["parameters"] == 8_000
    # parameters stage 3 keeps whole on every rank come on top of the partition
    assert theoretical_bytes(3, p, f, n, persistent=500)["parameters"] == 8_000 + 2_000


@pytest.mark.slow
def test_zero_memory_quick_matches_the_theory(results_dir, small_sample_root, tiny_backbone_dir):
    document = run_benchmark(
        "zero_memory", results_dir, "--sample", str(small_sample_root), "--backbone", str(tiny_backbone_dir)
    )
    results = {r["stage"]: r for r in document["results"]}
    assert set(results) == set(document["parameters"]["stages"])
    for stage, result in results.items():
        assert "error" not in result, result.get("traceback")
        assert len(result["bytes_per_rank"]) == 2
        for category, theory in result["theory_bytes"].items():
            for rank_bytes in result["bytes_per_rank"]:
                assert rank_bytes[category] == pytest.approx(theory, rel=0.01), (stage, category)


@pytest.mark.slow
def test_grad_cache_memory_quick(results_dir, small_sample_root, tiny_backbone_dir):
    document = run_benchmark(
        "grad_cache_memory", results_dir, "--sample", str(small_sample_root), "--backbone", str(tiny_backbone_dir)
    )
    parameters = document["parameters"]
    results = {(r["chunk"], r["batch"]): r for r in document["results"]}
    assert set(results) == {(c, b) for c in (None, parameters["chunk"]) for b in parameters["batches"]}
    for (chunk, batch), result in results.items():
        # one backward per chunk with GradCache, one for the whole batch without
        assert result["backward_passes"] == (-(-batch // chunk) if chunk else 1)
        assert result["graph_peak_bytes"] > 0 and result["peak_rss_mib"] > result["step_peak_rss_over_start_mib"]
    assert [g["goal"].split(":")[0] for g in document["goals"]] == [f"GradCache (chunk {parameters['chunk']})"] * 2


@pytest.mark.slow
def test_evaluation_memory_quick(results_dir):
    document = run_benchmark("evaluation_memory", results_dir)
    parameters = document["parameters"]
    memory = [r for r in document["results"] if r["measure"] == "memory"]
    scoring = [r for r in document["results"] if r["measure"] == "scoring"]
    assert [r["candidates"] for r in memory] == parameters["sizes"]
    for result in memory:
        assert 1 <= result["median_rank"] <= result["candidates"]
        assert result["pool_mib"] == pytest.approx(result["candidates"] * parameters["dim"] * 4 / 2**20)
        # an M-BEIR-shaped line is hundreds of bytes; what the reader keeps of it is not
        assert result["pool_file_mib"] * 2**20 / result["candidates"] > 200
    # 1 and 2 processes ranked every query alike
    assert [r["processes"] for r in scoring] == [1, 2]
    assert scoring[0]["ranks_digests"] == scoring[1]["ranks_digests"] and len(scoring[0]["ranks_digests"]) == 1
    assert len(document["goals"]) == len(parameters["sizes"]) + 2


@pytest.mark.slow
def test_mining_memory_quick(results_dir):
    document = run_benchmark("mining_memory", results_dir)
    parameters = document["parameters"]
    assert [r["candidates"] for r in document["results"]] == parameters["sizes"]
    for result in document["results"]:
        # queries near their positives, the rest random: every row keeps mine.filter.keep (4) negatives
        assert result["negatives_per_row"] == 4
        assert result["rows_per_second"] == pytest.approx(parameters["rows"] / result["mine_seconds"])
    assert len(document["goals"]) == 1


@pytest.mark.slow
def test_training_input_quick(results_dir, small_sample_root, tiny_backbone_dir):
    document = run_benchmark(
        "training_input", results_dir, "--sample", str(small_sample_root), "--backbone", str(tiny_backbone_dir)
    )
    (result,) = document["results"]
    assert result["image_tokens"] == (476 // 28) * (644 // 28)  # 640x480 on Qwen2-VL's 28-pixel grid: 17 x 23
    assert [m["conversations"] for m in result["memory"]] == document["parameters"]["sizes"]
    # rank 0 of N reads its 8 conversations of every full batch of the epoch (N x 8 conversations)
    reads = result["reads"]
    assert [r["ranks"] for r in reads] == document["parameters"]["read_ranks"] == [2, 8, 32]
    assert all(r["image_bytes_used"] > 0 for r in reads)
    assert [r["steps"] for r in reads] == [document["parameters"]["read_size"] // (8 * r["ranks"]) for r in reads]
    rates = result["rates"]
    assert rates["ratio"] == pytest.approx(
        rates["loader_conversations_per_second"] / rates["training_conversations_per_second"]
    )
    assert len(document["goals"]) == 5  # memory, reads at 2, 8 and 32 ranks, input rate


@pytest.mark.slow  # reads what the slow benchmark runs above wrote
def test_the_report_holds_every_table_and_goal(results_dir, tmp_path):
    ran = [name for name in BENCHMARKS if (results_dir / f"{name}.json").exists()]
    assert ran, "the quick benchmarks above write their JSON here"
    markdown = report(results_dir, ran, dict.fromkeys(ran, 1.0), "python -m benchmarks --quick")
    for name in ran:
        document = json.loads((results_dir / f"{name}.json").read_text())
        assert all(goal["goal"] in markdown for goal in document["goals"])
    docs = tmp_path / "performance.md"
    docs.write_text("intro\n<!-- benchmark results: begin -->\nstale table\n<!-- benchmark results: end -->\noutro\n")
    update_docs(markdown, docs)
    text = docs.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale table" not in text and markdown in text
