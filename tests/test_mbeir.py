"""M-BEIR as UniIR evaluates it, on files written here by hand in the published format.

The rows follow TIGER-Lab/M-BEIR as UniIR reads it (src/data/mbeir_dataset.py):
the MSCOCO rows are the real ones quoted from the download; the instruction
file has UniIR's columns (query modality, candidate modality, dataset name,
dataset id, prompts). Scores are checked against a slow reference of UniIR's
scorer (src/common/mbeir_retriever.py: sort, cut at k, any positive is a hit).
"""

from __future__ import annotations

import pickle
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from muco_flow.evaluation.datasets import EvaluationDataError, Item
from muco_flow.evaluation.encoded_pool import InMemoryPool
from muco_flow.evaluation.mbeir import (
    CandidatePool,
    MBeirBenchmark,
    MBeirTask,
    format_string,
    read_mbeir,
    read_pool,
    score_mbeir,
)
from muco_flow.evaluation.retrieval import QueryShare, chunked_positive_ranks
from muco_flow.pipelines.evaluate.nodes import load_evaluation_sets
from muco_flow.sample.m3t_mini import MBEIR_TASKS
from tests.conftest import load_params

COCO_IMAGE = "mbeir_images/mscoco_images/val2014/COCO_val2014_000000391895.jpg"
COCO_IMAGE_2 = "mbeir_images/mscoco_images/val2014/COCO_val2014_000000522418.jpg"
OVEN_IMAGE = "mbeir_images/oven_images/08/oven_05011178.jpg"

INSTRUCTIONS = (
    "query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\tprompt_2\tprompt_3\tprompt_4\n"
    "text\timage\tMSCOCO\t9\tFind me an everyday image that matches the given caption.\t\t\t\n"
    "image\ttext\tMSCOCO\t9\tfind an everyday caption describing the given image\t\t\t\n"
    "image,text\ttext\tOVEN\t5\tRetrieve a Wikipedia paragraph that provides an answer to the given query "
    "about the image.\tDetermine the Wikipedia snippet that identifies the visual entity in the image.\t\t\n"
)
# query/test/mbeir_mscoco_task0_test.jsonl: the first row is the download's, without query_src_content as quoted
MSCOCO_T2I = (
    '{"qid": "9:1", "query_txt": "A man with a red helmet on a small moped on a dirt road.", "query_img_path": null, '
    '"query_modality": "text", "pos_cand_list": ["9:1"], "neg_cand_list": [], "task_id": 0}\n'
    '{"qid": "9:2", "query_txt": "two dogs playing in the snow", "query_img_path": null, "query_modality": "text", '
    '"query_src_content": null, "pos_cand_list": ["9:7"], "neg_cand_list": [], "task_id": 0}\n'
    '{"qid": "9:3", "query_txt": "\\"A quoted caption\\"  ", "query_img_path": null, "query_modality": "text", '
    '"query_src_content": null, "pos_cand_list": ["9:1"], "neg_cand_list": [], "task_id": 0}\n'
)
MSCOCO_T2I_POOL = (
    f'{{"txt": null, "img_path": "{COCO_IMAGE}", "modality": "image", "did": "9:1", "src_content": null}}\n'
    f'{{"txt": null, "img_path": "{COCO_IMAGE_2}", "modality": "image", "did": "9:7", "src_content": null}}\n'
)
# query/test/mbeir_mscoco_task3_test.jsonl: the download's row, five captions of one image
MSCOCO_I2T = (
    f'{{"qid": "9:6", "query_txt": null, "query_img_path": "{COCO_IMAGE}", "query_modality": "image", '
    '"query_src_content": null, "pos_cand_list": ["9:2", "9:3", "9:4", "9:5", "9:6"], "neg_cand_list": [], '
    '"task_id": 3}\n'
)
MSCOCO_I2T_POOL = "".join(
    f'{{"txt": "{text}", "img_path": null, "modality": "text", "did": "{did}", "src_content": null}}\n'
    for did, text in (
        ("9:2", "A man riding a motor bike on a dirt road on the countryside."),
        ("9:3", "A man riding on the back of a motorcycle."),
        ("9:4", "A dirt path with a young person on a motor bike"),
        ("9:5", "A man in a red shirt and a red hat is on a motorcycle on a hill side."),
        ("9:6", "a man riding on the back of a motorcycle down a road"),
        ("9:14174", "A man riding on the back of a motorcycle down a road."),
    )
)
# OVEN (image, text -> text): a positive of InfoSeek (dataset 6) is in the union pool only
OVEN_TASK6 = (
    f'{{"qid": "5:10", "query_txt": "what is the name of this building?", "query_img_path": "{OVEN_IMAGE}", '
    '"query_modality": "image,text", "query_src_content": "{\\"question_type\\": \\"entity\\"}", '
    '"pos_cand_list": ["5:100", "6:200"], "neg_cand_list": ["5:101"], "task_id": 6}\n'
)
OVEN_POOL = (
    '{"txt": "Chrysler Building. The Chrysler Building is an Art Deco skyscraper.", "img_path": null, '
    '"modality": "text", "did": "5:100", "src_content": null}\n'
    '{"txt": "Empire State Building", "img_path": null, "modality": "text", "did": "5:101", "src_content": null}\n'
)
INFOSEEK_ROW = (
    '{"txt": "Chrysler Building (New York City)", "img_path": null, "modality": "text", "did": "6:200", '
    '"src_content": null}\n'
)
TASKS = ["mscoco_task0", "mscoco_task3", "oven_task6"]
LOCAL_POOLS = {"mscoco_task0": "mscoco_task0_test", "mscoco_task3": "mscoco_task3_test"}


def write_download(root: Path) -> Path:
    files = {
        "instructions/query_instructions.tsv": INSTRUCTIONS,
        "query/test/mbeir_mscoco_task0_test.jsonl": MSCOCO_T2I,
        "query/test/mbeir_mscoco_task3_test.jsonl": MSCOCO_I2T,
        "query/test/mbeir_oven_task6_test.jsonl": OVEN_TASK6,
        "cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl": MSCOCO_T2I_POOL,
        "cand_pool/local/mbeir_mscoco_task3_test_cand_pool.jsonl": MSCOCO_I2T_POOL,
        "cand_pool/local/mbeir_oven_task6_cand_pool.jsonl": OVEN_POOL,
        "cand_pool/global/mbeir_union_test_cand_pool.jsonl": MSCOCO_T2I_POOL
        + MSCOCO_I2T_POOL
        + OVEN_POOL
        + INFOSEEK_ROW,
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for i, path in enumerate((COCO_IMAGE, COCO_IMAGE_2, OVEN_IMAGE)):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / path, format="JPEG")
    return root


@pytest.fixture
def download(tmp_path) -> Path:
    return write_download(tmp_path / "M-BEIR")


def test_every_row_is_read_with_uniirs_instruction_and_normalisation(download):
    benchmark = read_mbeir(download, TASKS, local_pools=LOCAL_POOLS)
    t2i, i2t, oven = benchmark.tasks
    assert (t2i.task_id, i2t.task_id, oven.task_id) == (0, 3, 6)
    assert t2i.queries == [
        Item(
            "Find me an everyday image that matches the given caption. "
            "A man with a red helmet on a small moped on a dirt road."
        ),
        # the query text keeps its case and gets the final period
        Item("Find me an everyday image that matches the given caption. two dogs playing in the snow."),
        # UniIR strips quotes from the ends of the joined string only
        Item('Find me an everyday image that matches the given caption. "A quoted caption.'),
    ]  # fmt: skip
    # an image query's text is the formatted prompt alone
    assert i2t.queries == [Item("Find an everyday caption describing the given image.", COCO_IMAGE)]
    assert i2t.positives == [["9:2", "9:3", "9:4", "9:5", "9:6"]]
    assert oven.queries[0].image == OVEN_IMAGE and oven.queries[0].text in {
        "Retrieve a Wikipedia paragraph that provides an answer to the given query about the image. "
        "what is the name of this building?",
        "Determine the Wikipedia snippet that identifies the visual entity in the image. "
        "what is the name of this building?",
    }
    assert oven.positives == [["5:100", "6:200"]]
    # candidates: normalised, never instructed; one per did, duplicates of content included
    pool = benchmark.local_pools["mscoco_task3_test"]
    assert list(pool.dids) == ["9:2", "9:3", "9:4", "9:5", "9:6", "9:14174"]
    assert pool.items[2] == Item("A dirt path with a young person on a motor bike.")
    assert pool.items[4] == pool.items[5] == Item("A man riding on the back of a motorcycle down a road.")
    assert list(benchmark.local_pools["mscoco_task0_test"].items) == [Item("", COCO_IMAGE), Item("", COCO_IMAGE_2)]
    assert len(benchmark.global_pool.items) == 2 + 6 + 2 + 1


def test_the_prompt_is_fixed_by_the_seed_and_the_qid(download):
    # A second OVEN prompt: the draw is random.Random(f"{seed}:{qid}") over the own-dataset positives in the local
    # pool (one here), then over the key's prompts.
    prompts = [
        "Retrieve a Wikipedia paragraph that provides an answer to the given query about the image.",
        "Determine the Wikipedia snippet that identifies the visual entity in the image.",
    ]
    texts = set()
    for seed in range(12):
        rng = random.Random(f"{seed}:5:10")
        rng.choice(["5:100"])
        expected = f"{rng.choice(prompts)} what is the name of this building?"
        task = read_mbeir(download, ["oven_task6"], instruction_seed=seed, pools=["local"]).tasks[0]
        assert task.queries[0].text == expected
        texts.add(expected)
    assert len(texts) == 2
    plain = read_mbeir(download, TASKS, local_pools=LOCAL_POOLS, instructions=None).tasks
    assert [q.text for q in plain[0].queries] == [
        "A man with a red helmet on a small moped on a dirt road.",
        "Two dogs playing in the snow.",
        "A quoted caption.",
    ]
    assert plain[1].queries == [Item("", COCO_IMAGE)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  a cat\r\n", "A cat."),
        ("Is it red?", "Is it red?"),
        ("Wow!", "Wow!"),
        ('"quoted"', "Quoted."),
        ("", ""),
        (None, ""),
    ],
)
def test_format_string_is_uniirs(text, expected):
    assert format_string(text) == expected


@pytest.mark.parametrize(
    "file, line, replacement, message",
    [
        ("query/test/mbeir_mscoco_task0_test.jsonl", 2, "{not json", r"mscoco_task0_test.jsonl, line 2: not JSON"),
        (
            "query/test/mbeir_mscoco_task0_test.jsonl", 2,
            '{"qid": "9:2", "query_txt": "x", "query_img_path": null, "pos_cand_list": ["9:7"], "task_id": 0}',
            r"line 2: missing \['query_modality'\]",
        ),
        (
            "query/test/mbeir_mscoco_task0_test.jsonl", 2,
            '{"qid": "9:2", "query_txt": null, "query_img_path": null, "query_modality": "text", '
            '"pos_cand_list": ["9:7"], "task_id": 0}',
            r"line 2 \(qid 9:2\): query_modality 'text' but query_txt is empty",
        ),
        (
            "query/test/mbeir_mscoco_task0_test.jsonl", 2,
            '{"qid": "dogs", "query_txt": "x", "query_img_path": null, "query_modality": "text", '
            '"pos_cand_list": ["9:7"], "task_id": 0}',
            r"line 2: qid must be '<dataset id>:<index>', got 'dogs'",
        ),
        (
            "query/test/mbeir_mscoco_task0_test.jsonl", 2,
            '{"qid": "9:2", "query_txt": "x", "query_img_path": null, "query_modality": "text", '
            '"pos_cand_list": [], "task_id": 0}',
            r"line 2 \(qid 9:2\): pos_cand_list must be a non-empty list",
        ),
        (
            "query/test/mbeir_mscoco_task0_test.jsonl", 2,
            '{"qid": "9:2", "query_txt": "x", "query_img_path": null, "query_modality": "text", '
            '"pos_cand_list": ["9:7"], "task_id": 5}',
            r"line 2 \(qid 9:2\): task_id must be one of \[0, 1, 2, 3, 4, 6, 7, 8\], got 5",
        ),
        (
            "query/test/mbeir_mscoco_task0_test.jsonl", 2,
            '{"qid": "9:2", "query_txt": "x", "query_img_path": null, "query_modality": "text", '
            '"pos_cand_list": ["9:3"], "task_id": 0}',
            r"line 2 \(qid 9:2\): no positive of dataset 9 is in the local pool mscoco_task0_test",
        ),
        (
            "query/test/mbeir_mscoco_task0_test.jsonl", 2,
            '{"qid": "9:2", "query_txt": "x", "query_img_path": null, "query_modality": "text", '
            '"pos_cand_list": ["9:7"], "task_id": 3}',
            r"mbeir_mscoco_task0_test.jsonl: one task per file, got task ids \[0, 3\]",
        ),
        (
            "query/test/mbeir_mscoco_task3_test.jsonl", 1,
            '{"qid": "9:6", "query_txt": null, "query_img_path": "mbeir_images/missing.jpg", '
            '"query_modality": "image", "pos_cand_list": ["9:2"], "task_id": 3}',
            r"task3_test.jsonl, line 1 \(qid 9:6\): image 'mbeir_images/missing.jpg' not found",
        ),
        (
            "cand_pool/local/mbeir_mscoco_task3_test_cand_pool.jsonl", 3,
            '{"txt": "again", "img_path": null, "modality": "text", "did": "9:2"}',
            r"mbeir_mscoco_task3_test_cand_pool.jsonl, line 3: did 9:2 appears twice in the pool",
        ),
        (
            "cand_pool/local/mbeir_mscoco_task3_test_cand_pool.jsonl", 3,
            '{"txt": "a caption", "img_path": null, "modality": "caption", "did": "9:4"}',
            r"line 3: modality must be one of \['text', 'image', 'image,text'\], got 'caption'",
        ),
        (
            "instructions/query_instructions.tsv", 3,
            "image\ttext\tMSCOCO\t9",
            r"query_instructions.tsv, line 3: expected query_modality, cand_modality, dataset_name, dataset_id and",
        ),
        (
            "instructions/query_instructions.tsv", 3,
            "image\ttext\tMSCOCO\t7\tSome prompt.",
            r"task3_test.jsonl, line 1 \(qid 9:6\): the instruction file has no prompt for \('9', 'image', 'text'\)",
        ),
    ],
)  # fmt: skip
def test_bad_files_are_named_with_line_and_problem(download, file, line, replacement, message):
    path = download / file
    lines = path.read_text().splitlines()
    lines[line - 1] = replacement
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EvaluationDataError, match=message):
        read_mbeir(download, TASKS, local_pools=LOCAL_POOLS)


def test_bad_configuration_is_named(download):
    with pytest.raises(EvaluationDataError, match=r"query/test/mbeir_webqa_task1_test.jsonl does not exist"):
        shutil.copy(download / "cand_pool/local/mbeir_oven_task6_cand_pool.jsonl",
                    download / "cand_pool/local/mbeir_webqa_task1_cand_pool.jsonl")  # fmt: skip
        read_mbeir(download, ["webqa_task1"])
    with pytest.raises(EvaluationDataError, match=r"pools must be some of \['local', 'global'\], got \['union'\]"):
        read_mbeir(download, TASKS, local_pools=LOCAL_POOLS, pools=["union"])
    with pytest.raises(EvaluationDataError, match=r"mscoco_task0: average_k 5 is not among its recall_ks \[10, 20\]"):
        read_mbeir(download, TASKS, local_pools=LOCAL_POOLS, recall_ks={"mscoco_task0": [10, 20]})


# -- scoring ----------------------------------------------------------------------------------------------


def test_a_task_is_ranked_against_its_local_pool_or_the_union_pool_that_was_read(download):
    both = read_mbeir(download, ["oven_task6"])
    task = both.tasks[0]
    assert both.candidate_pool("local", task).name == "oven_task6"  # cand_pool/local/mbeir_oven_task6_cand_pool
    assert both.candidate_pool("global", task).name == "global"
    local_only = read_mbeir(download, ["oven_task6"], pools=["local"])
    with pytest.raises(ValueError, match="global pool is scored but was not read"):
        local_only.candidate_pool("global", local_only.tasks[0])


def reference_any_hit_recall(scores: list[float], dids: list[str], positives: list[str], k: int) -> float:
    """UniIR's compute_recall_at_k on a ranking: sort by score, cut at k, any positive is a hit.

    FAISS leaves the order of equal scores open; this ranking puts non-positives first among
    equals, the order muco-flow documents (the lowest figure any order gives).
    """
    order = sorted(range(len(dids)), key=lambda i: (-scores[i], dids[i] in positives))
    top = {dids[i] for i in order[:k]}
    return 1.0 if top & set(positives) else 0.0


def vectors_by_item(table: dict[Item, list[float]]):
    def vectors(items, root):
        return torch.tensor([table[item] for item in items], dtype=torch.float32)

    return vectors


def pool_by_item(table: dict[Item, list[float]]):
    def pool(items, root):
        return InMemoryPool(vectors_by_item(table)(items, root), block_rows=3)  # several blocks per pool

    return pool


def test_hand_cases_local_and_global_pools(download):
    """Ties, an exact duplicate, five positives, and a positive that only the union pool holds."""
    benchmark = read_mbeir(
        download, TASKS, local_pools=LOCAL_POOLS, recall_ks={"default": [1, 2, 5]}, average_k={"default": 1}
    )
    t2i, i2t, oven = benchmark.tasks
    pools = benchmark.local_pools
    captions = pools["mscoco_task3_test"].items
    table = {
        # t2i: queries 1 and 3 tie their image with the other one; query 2 finds its image first
        t2i.queries[0]: [1.0, 0.0, 0.0],
        t2i.queries[1]: [0.0, 0.0, 1.0],
        t2i.queries[2]: [1.0, 0.0, 0.0],
        pools["mscoco_task0_test"].items[0]: [1.0, 0.0, 0.0],
        pools["mscoco_task0_test"].items[1]: [1.0, 0.0, 0.5],
        # i2t: five positive captions; 9:6 and the non-positive 9:14174 have the same text
        i2t.queries[0]: [1.0, 0.0, 0.0],
        captions[0]: [0.2, 0.0, 0.0],
        captions[1]: [0.6, 0.0, 0.0],
        captions[2]: [0.7, 0.0, 0.0],
        captions[3]: [0.8, 0.0, 0.0],
        captions[4]: [0.9, 0.0, 0.0],  # the same item as captions[5]
        # OVEN: the InfoSeek positive scores best, but only the union holds it
        oven.queries[0]: [0.0, 1.0, 0.0],
        pools["oven_task6"].items[0]: [0.0, 0.5, 0.0],
        pools["oven_task6"].items[1]: [0.0, 0.9, 0.0],
        benchmark.global_pool.items[-1]: [0.0, 1.0, 0.0],
    }
    results, curves = score_mbeir(benchmark, vectors_by_item(table), pool_by_item(table), curve_ks=(1, 2, 3))
    local, union = results["rows"]["local"], results["rows"]["global"]
    # t2i local: queries 1 and 3 tie their positive with the other image (it ranks first), query 2 is first
    assert {k: local["mscoco_task0"][f"recall@{k}"] for k in (1, 2, 5)} == {1: 1 / 3, 2: 1.0, 5: 1.0}
    # t2i global: every caption and OVEN text scores below both images
    assert (union["mscoco_task0"]["recall@1"], union["mscoco_task0"]["recall@2"]) == (1 / 3, 1.0)
    # i2t: the duplicate of 9:6 ties it and goes first, but 9:5 (0.8) is next: positives do not push each
    # other down, so the best positive ranks second
    assert (local["mscoco_task3"]["recall@1"], local["mscoco_task3"]["recall@2"]) == (0.0, 1.0)
    # in the union the images (score 1.0 for this query) come first as well
    assert (union["mscoco_task3"]["recall@2"], union["mscoco_task3"]["recall@5"]) == (0.0, 1.0)
    # OVEN: the local pool lacks 6:200, so its best is 5:100 behind 5:101; the union has 6:200 first
    assert (local["oven_task6"]["recall@1"], local["oven_task6"]["recall@2"]) == (0.0, 1.0)
    assert union["oven_task6"]["recall@1"] == 1.0
    assert results["average"] == {"local": pytest.approx((1 / 3 + 0 + 0) / 3), "global": pytest.approx((1 / 3 + 1) / 3)}
    assert local["mscoco_task0"] | {"recall@1": 0} == {
        "task_id": 0, "pool": "mscoco_task0_test", "recall@1": 0, "recall@2": 1.0, "recall@5": 1.0,
        "queries": 3, "candidates": 2, "queries_without_positive_in_pool": 0,
    }  # fmt: skip
    assert union["oven_task6"]["pool"] == "global" and union["oven_task6"]["candidates"] == 11
    assert curves["M-BEIR oven_task6 (local)"] == {"1": 0.0, "2": 1.0, "3": 1.0}
    # the same numbers from the reference on every row
    for kind, rows in results["rows"].items():
        for task in benchmark.tasks:
            pool = benchmark.global_pool if kind == "global" else pools[task.local_pool]
            for k in (1, 2, 5):
                expected = sum(
                    reference_any_hit_recall(
                        [sum(a * b for a, b in zip(table[query], table[c], strict=True)) for c in pool.items],
                        pool.dids, wanted, k,
                    )
                    for query, wanted in zip(task.queries, task.positives, strict=True)
                ) / len(task.queries)  # fmt: skip
                assert rows[task.name][f"recall@{k}"] == pytest.approx(expected), (kind, task.name, k)


def test_a_query_without_positive_in_the_pool_counts_as_a_miss(download, caplog):
    benchmark = read_mbeir(download, ["oven_task6"])
    pool = benchmark.local_pools["oven_task6"]
    # as if the local pool held only the InfoSeek did: nothing to hit, the query still counts
    emptied = MBeirBenchmark(
        benchmark.root,
        benchmark.tasks,
        ("local",),
        {"oven_task6": CandidatePool("oven_task6", ["5:101"], [pool.items[1]], ["text"], {"5:101": 0})},
        None,
    )
    table = {benchmark.tasks[0].queries[0]: [1.0], pool.items[1]: [1.0]}
    results, _ = score_mbeir(emptied, vectors_by_item(table), pool_by_item(table), curve_ks=(1,))
    row = results["rows"]["local"]["oven_task6"]
    assert (row["recall@10"], row["queries"], row["queries_without_positive_in_pool"]) == (0.0, 1, 1)
    assert "1 of 1 queries have no positive in the local pool" in caplog.text


def test_scores_equal_the_reference_on_random_pools_with_many_ties():
    generator = torch.Generator().manual_seed(0)
    dids = [f"1:{i}" for i in range(40)]
    # values in {-1, 0, 1} and duplicated rows: many exact ties
    pool_vectors = torch.randint(-1, 2, (40, 3), generator=generator).float()
    pool_vectors[20:30] = pool_vectors[:10]
    query_vectors = torch.randint(-1, 2, (25, 3), generator=generator).float()
    rng = random.Random(0)
    positives = [rng.sample(dids, rng.randint(1, 4)) + ["1:999"] * (q % 5 == 0) for q in range(25)]
    items = [Item(f"candidate {i}") for i in range(40)]
    queries = [Item(f"query {q}") for q in range(25)]
    table = dict(zip(items + queries, torch.cat([pool_vectors, query_vectors]).tolist(), strict=True))
    task = MBeirTask("random", 0, "random", (1, 5, 10), 5, [f"1:{q}" for q in range(25)], queries, positives)
    pool = CandidatePool("random", dids, items, ["text"] * 40, {d: i for i, d in enumerate(dids)})
    results, _ = score_mbeir(
        MBeirBenchmark(Path("."), [task], ("local",), {"random": pool}, None),
        vectors_by_item(table),
        pool_by_item(table),
        (1,),
    )
    scores = (query_vectors @ pool_vectors.T).tolist()
    for k in (1, 5, 10):
        expected = sum(reference_any_hit_recall(scores[q], dids, positives[q], k) for q in range(25)) / 25
        assert results["rows"]["local"]["random"][f"recall@{k}"] == pytest.approx(expected)
    # chunking does not change a rank: tiny chunks give what one block gives
    indices = [[pool.rows[d] for d in wanted if d in pool.rows] for wanted in positives]
    whole = chunked_positive_ranks(query_vectors, pool_vectors, indices, ignore_other_positives=True)
    assert whole == chunked_positive_ranks(
        query_vectors, pool_vectors, indices, query_chunk=4, pool_chunk=7, ignore_other_positives=True
    )
    # without the option, the other positives count as before
    assert chunked_positive_ranks(torch.ones(1, 1), torch.ones(3, 1), [[0, 2]]) == [[3, 3]]
    assert chunked_positive_ranks(torch.ones(1, 1), torch.ones(3, 1), [[0, 2]], ignore_other_positives=True) == [[2, 2]]


def test_the_configured_sample_tasks_load_through_the_node(small_sample_root):
    params = load_params()["evaluate"]
    assert params["mbeir"]["tasks"] == list(MBEIR_TASKS)
    benchmark = load_evaluation_sets(str(small_sample_root), params)["mbeir"]
    assert [t.task_id for t in benchmark.tasks] == [0, 3, 6]
    assert benchmark.pools == ("local", "global")
    assert len(benchmark.global_pool.items) == sum(len(p.items) for p in benchmark.local_pools.values())
    i2t = benchmark.tasks[1]
    assert {q.text for q in i2t.queries} <= {
        "Find a caption that describes this image.",
        "Retrieve a description matching this picture.",
        "Which sentence describes this image?",
    }
    assert all(len(p) == 2 for p in i2t.positives)


def test_rows_and_averages_reach_the_headline_and_the_report(download):
    from muco_flow.evaluation.report import compare, headline, markdown_report, recall_curve_table, recall_figure

    benchmark = read_mbeir(download, TASKS, local_pools=LOCAL_POOLS)
    items = [*benchmark.global_pool.items, *(q for t in benchmark.tasks for q in t.queries)]
    results = {}
    for label, seed in (("model", 0), ("baseline", 1)):
        generator = torch.Generator().manual_seed(seed)
        table = {item: torch.randn(4, generator=generator).tolist() for item in items}
        mbeir, curves = score_mbeir(benchmark, vectors_by_item(table), pool_by_item(table), curve_ks=(1, 2))
        mmeb = {"datasets": {"X": {"meta_task": "vqa", "queries": 1, "hit@1": 1.0}}, "meta_tasks": {"vqa": 1.0}}
        results[label] = {
            "mmeb": mmeb | {"average": 1.0}, "mbeir": mbeir, "m3t_heldout": {}, "recall_curves": curves,
        }  # fmt: skip
    flat = headline(results["model"])
    assert flat["mbeir/local/average"] == results["model"]["mbeir"]["average"]["local"]
    assert (
        flat["mbeir/global/oven_task6/recall@10"]
        == results["model"]["mbeir"]["rows"]["global"]["oven_task6"]["recall@10"]
    )
    assert not any(key.endswith(("/queries", "/candidates")) for key in flat)
    metrics = compare(results["model"], results["baseline"], chance=0.5)
    report = markdown_report(metrics, "model", "backbone")
    assert "| mscoco_task3 | 3 | local: mscoco_task3_test | 1 | 6 |" in report
    assert "| oven_task6 | 6 | global: global | 1 | 11 |" in report
    assert "**M-BEIR average (global)**" in report
    table = recall_curve_table(results["model"], results["baseline"])
    assert set(table["set"]) == {f"M-BEIR {t} ({kind})" for t in TASKS for kind in ("local", "global")}
    recall_figure(table)


class ThreadGather:
    """all_gather_object for ranks that are threads of this process: each rank's part, in rank order."""

    def __init__(self, ranks: int) -> None:
        self.parts: list[object] = [None] * ranks
        self.barrier = threading.Barrier(ranks)

    def for_rank(self, rank: int):
        def gather(mine):
            self.parts[rank] = mine
            self.barrier.wait()
            parts = list(self.parts)
            self.barrier.wait()  # nobody overwrites a part before every rank has read them all
            return parts

        return gather


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_scoring_their_share_of_the_queries_gather_the_metrics_of_one_process(download, ranks):
    """The hand case's ties and duplicates on 2 and 3 ranks (one-query tasks leave some ranks nothing to score)."""
    benchmark = read_mbeir(download, TASKS, local_pools=LOCAL_POOLS, recall_ks={"default": [1, 2, 5]})
    t2i, i2t, oven = benchmark.tasks
    pools = benchmark.local_pools
    generator = torch.Generator().manual_seed(3)
    items = [*benchmark.global_pool.items, *(q for t in benchmark.tasks for q in t.queries)]
    table = {item: torch.randint(-1, 2, (3,), generator=generator).float().tolist() for item in items}
    # t2i's three queries tie their positive image 9:1 with the other image 9:7
    table.update({q: [1.0, 0.0, 0.0] for q in t2i.queries})
    table.update(
        {pools["mscoco_task0_test"].items[0]: [1.0, 0.0, 0.0], pools["mscoco_task0_test"].items[1]: [1.0, 0.0, 0.0]}
    )
    one_process = score_mbeir(benchmark, vectors_by_item(table), pool_by_item(table), curve_ks=(1, 2))
    # ties go against the positive: the tied other image ranks first, so no t2i query is a hit at 1
    assert one_process[0]["rows"]["local"]["mscoco_task0"]["recall@1"] == 0.0
    assert one_process[0]["rows"]["local"]["mscoco_task0"]["recall@2"] == 1.0
    gather = ThreadGather(ranks)
    results: list[object] = [None] * ranks
    encoded: list[list[Item]] = [[] for _ in range(ranks)]

    def rank(r: int) -> None:
        def vectors(queries, root):
            encoded[r].extend(queries)
            return vectors_by_item(table)(queries, root)

        share = QueryShare(r, ranks, gather.for_rank(r))
        results[r] = score_mbeir(benchmark, vectors, pool_by_item(table), (1, 2), share)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [one_process] * ranks
    # each query was encoded by one rank only, twice (the local and the global pool)
    every_query = [q for t in benchmark.tasks for q in t.queries]
    assert sorted(map(repr, (q for e in encoded for q in e))) == sorted(map(repr, every_query * 2))
    assert all(len(e) <= 2 * -(-len(t2i.queries) // ranks) + 4 for e in encoded)
    assert i2t.queries and oven.queries


def test_a_query_share_is_a_contiguous_part_and_the_parts_come_back_in_rank_order():
    assert [QueryShare(r, 2, lambda m: m).part(5) for r in range(2)] == [slice(0, 2), slice(2, 5)]
    assert [QueryShare(r, 3, lambda m: m).part(1) for r in range(3)] == [slice(0, 0), slice(0, 0), slice(0, 1)]
    assert QueryShare().part(4) == slice(0, 4) and QueryShare().merged(["a"]) == ["a"]
    assert QueryShare(1, 2, lambda mine: [["a", "b"], mine]).merged(["c"]) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="gathered 1 parts from 2 ranks"):
        QueryShare(1, 2, lambda mine: [mine]).merged(["c"])
    with pytest.raises(ValueError, match="needs a gather"):
        QueryShare(0, 2)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        QueryShare(2, 2, lambda m: m)


def write_pool(root: Path, lines: list[str], newline: str = "\n") -> Path:
    path = root / "cand_pool/local/mbeir_hand_cand_pool.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_pool_is_kept_as_columns_and_reads_its_items_back_from_the_file(tmp_path, newline):
    (tmp_path / "mbeir_images").mkdir()
    (tmp_path / "mbeir_images/cat.jpg").write_bytes(b"an image")
    path = write_pool(
        tmp_path,
        [
            '{"did": "1:10", "txt": "a cat on a mat", "img_path": null, "modality": "text"}',
            "",
            '{"did": "12:3", "txt": null, "img_path": "mbeir_images/cat.jpg", "modality": "image"}',
            '{"did": "1:2", "txt": "  \\"Ünïcode\\" caption?", "img_path": "mbeir_images/cat.jpg", '
            '"modality": "image,text"}',
            '{"did": "1:1", "txt": "", "img_path": "mbeir_images/cat.jpg", "modality": "image", "src_content": "x"}',
        ],
        newline,
    )
    pool = read_pool(tmp_path, path, "hand")
    expected = [
        Item("A cat on a mat."),
        Item("", "mbeir_images/cat.jpg"),
        Item('Ünïcode" caption?', "mbeir_images/cat.jpg"),
        Item("", "mbeir_images/cat.jpg"),
    ]
    assert list(pool.items) == expected and len(pool.items) == 4
    assert (pool.items[-1], pool.items[1:3], pool.items[::-2]) == (expected[3], expected[1:3], expected[::-2])
    assert list(pool.dids) == ["1:10", "12:3", "1:2", "1:1"]
    assert list(pool.modalities) == ["text", "image", "image,text", "image"]
    assert dict(pool.rows) == {"1:10": 0, "12:3": 1, "1:2": 2, "1:1": 3}
    assert [d in pool.rows for d in ("1:1", "1:3", "1:100", "12:3 ", "123:45678", "")] == [True] + [False] * 5
    # as ParallelRunner hands the sets to its processes: pickled, the columns read the same
    copied = pickle.loads(pickle.dumps(pool))
    assert (list(copied.items), list(copied.dids), list(copied.modalities)) == (
        expected,
        list(pool.dids),
        list(pool.modalities),
    )
    with pytest.raises(IndexError):
        pool.items[4]
    # a few bytes per candidate, whatever its texts: offset 8, did 4 (the widest here), order 4, modality 1
    columns = pool.rows.pool_file
    held = columns.offsets.nbytes + columns.did_keys.nbytes + columns.did_order.nbytes + columns.modality_codes.nbytes
    assert held == 4 * (8 + 4 + 4 + 1)
    # the file rewritten after the read: an item is not read from another candidate's line
    write_pool(tmp_path, ['{"did": "1:10", "txt": "a", "img_path": null, "modality": "text"}', "", "{}"])
    assert pool.items[0] == Item("A.")
    with pytest.raises(EvaluationDataError, match=r"mbeir_hand_cand_pool.jsonl: changed since it was read \(row 1"):
        pool.items[1]


def test_a_repeated_did_is_named_with_the_line_of_its_second_appearance(tmp_path):
    row = '{{"did": "{}", "txt": "t", "img_path": null, "modality": "text"}}'
    path = write_pool(tmp_path, [row.format("2:1"), "", row.format("1:5"), row.format("2:1"), row.format("1:5")])
    with pytest.raises(EvaluationDataError, match=r"mbeir_hand_cand_pool.jsonl, line 4: did 2:1 appears twice"):
        read_pool(tmp_path, path, "hand")
    path.write_bytes(b'{"did": "1:1", "txt": "\xff", "img_path": null, "modality": "text"}\n')
    with pytest.raises(EvaluationDataError, match=r"mbeir_hand_cand_pool.jsonl, line 1: not UTF-8"):
        read_pool(tmp_path, path, "hand")


def test_per_rank_ranks_gather_into_the_hand_computed_ranks_of_every_query():
    pool = torch.tensor([[3.0], [2.0], [2.0], [1.0]])
    queries = torch.tensor([[1.0], [-1.0], [2.0], [0.5]])
    positives = [[1], [0], [0], [2]]
    # q0: its positive scores 2, row 0 beats it and row 2 ties it (a tie counts against it): 3
    # q1: its positive scores -3, the lowest: 4; q2: its positive scores 6, the best: 1
    # q3: its positive scores 1, row 0 beats it and row 1 ties it: 3
    expected = [[3], [4], [1], [3]]
    assert chunked_positive_ranks(queries, pool, positives) == expected
    shares = [QueryShare(r, 3, lambda mine: parts) for r in range(3)]
    parts = [chunked_positive_ranks(queries[s.part(4)], pool, positives[s.part(4)], pool_chunk=3) for s in shares]
    assert [len(p) for p in parts] == [1, 1, 2]
    assert [s.merged(p) for s, p in zip(shares, parts, strict=True)] == [expected] * 3


def test_every_set_kind_scored_on_two_ranks_has_one_process_metrics_and_each_rank_encodes_its_queries_only():
    from muco_flow.evaluation.encoding import EncodingCache
    from muco_flow.evaluation.scoring import score_sets
    from tests.test_dimensions import TableEmbedder, mbeir_benchmark, mmeb_set

    def score(share=None, embedder=None):
        cache = EncodingCache(embedder or TableEmbedder(), "{text}", 2)
        return score_sets([mmeb_set()], mbeir_benchmark(), [mmeb_set()], cache, progress_every_s=30, share=share)

    one_process = score()
    # hand values (tests/test_dimensions.py's table): in its own list each query's positive is first; in the
    # whole pool q1's positive p1 (0.633) ranks below p2 (0.707), and q2 finds p2 first
    assert one_process["mmeb"]["average"] == 1.0 and one_process["mbeir"]["average"] == {"local": 0.5}
    assert one_process["m3t_heldout"]["retrieval"]["recall@1"] == 0.5
    gather = ThreadGather(2)
    embedders = [TableEmbedder(), TableEmbedder()]
    results: list[object] = [None, None]

    def rank(r: int) -> None:
        results[r] = score(QueryShare(r, 2, gather.for_rank(r)), embedders[r])

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [one_process, one_process]
    # one process encodes the 2 queries and 4 candidates; a rank its 1 query and the 4 candidates
    assert [e.encoded for e in embedders] == [5, 5]
