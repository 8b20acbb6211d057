"""Evaluation at each width (`evaluate.dimensions`): hand-made vectors, scored from the same encoding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from muco_flow.evaluation.config import EvaluationConfig, EvaluationConfigError
from muco_flow.evaluation.datasets import Item, RetrievalSet
from muco_flow.evaluation.encoded_pool import EncodedPool, InMemoryPool, PrefixPool
from muco_flow.evaluation.encoding import EncodingCache
from muco_flow.evaluation.mbeir import CandidatePool, MBeirBenchmark, MBeirTask
from muco_flow.evaluation.report import compare, dimension_table
from muco_flow.evaluation.scoring import score_dimensions, score_sets
from tests.conftest import load_params

# Each text's vector (normalised by the embedder). Query q1 finds its positive p1 only with all three
# numbers: cut to 1, p1 is (-1) and n1 (+1); cut to 2, q1 = (1, 1)/sqrt2 scores n1 = (1, 0) at 0.707 and
# p1 = (-0.1, 1)/1.005 at 0.633. Query q2 = (1, 0, 0) finds p2 = (1, 0, 0) at every width (n2 cuts to 0 or (0, 1)).
TABLE = {
    "q1": (1.0, 1.0, 0.0),
    "p1": (-0.1, 1.0, 0.0),
    "n1": (0.1, 0.0, 1.0),
    "q2": (1.0, 0.0, 0.0),
    "p2": (1.0, 0.0, 0.0),
    "n2": (0.0, 1.0, 1.0),
}


class TableEmbedder:
    """Encodes an item as its text's TABLE row (cut to ``width``), normalised; counts the items it encodes."""

    def __init__(self, width: int = 3) -> None:
        self.width, self.encoded = width, 0

    def encode(self, inputs, *, template, batch_size, progress):
        self.encoded += len(inputs)
        return F.normalize(torch.tensor([TABLE[text][: self.width] for text, _ in inputs]), dim=1)


def mmeb_set() -> RetrievalSet:
    candidates = [Item(t) for t in ("p1", "n1", "p2", "n2")]
    return RetrievalSet(
        "Hand", "retrieval", Path("."), [Item("q1"), Item("q2")], candidates, [[0, 1], [2, 3]], [[0], [2]]
    )


def mbeir_benchmark() -> MBeirBenchmark:
    dids = ["d:p1", "d:n1", "d:p2", "d:n2"]
    pool = CandidatePool("hand_pool", dids, [Item(t) for t in ("p1", "n1", "p2", "n2")], ["text"] * 4,
                         {d: i for i, d in enumerate(dids)})  # fmt: skip
    task = MBeirTask("hand_task", 0, "hand_pool", (1, 2), 1, ["a", "b"], [Item("q1"), Item("q2")],
                     [["d:p1"], ["d:p2"]])  # fmt: skip
    return MBeirBenchmark(Path("."), [task], ("local",), {"hand_pool": pool}, None)


def test_mmeb_hits_per_width_are_the_hand_computed_ones_and_nothing_is_encoded_again():
    embedder = TableEmbedder()
    cache = EncodingCache(embedder, "{text}", 2)
    full = score_sets([mmeb_set()], None, [], cache, progress_every_s=30)
    encoded = embedder.encoded
    scored = score_dimensions([mmeb_set()], None, cache, [1, 2, 3], progress_every_s=30)
    assert full["mmeb"]["average"] == 1.0
    assert {d: s["mmeb"]["average"] for d, s in scored.items()} == {"1": 0.5, "2": 0.5, "3": 1.0}
    assert scored["2"]["mmeb"]["meta_tasks"] == {"retrieval": 0.5} and scored["2"]["mbeir"] is None
    assert embedder.encoded == encoded == 6  # the six texts, once: every width reads the same vectors


@pytest.mark.parametrize("width, recall", [(1, 0.0), (2, 0.0), (3, 0.5)])
def test_mbeir_at_a_width_is_the_score_of_vectors_cut_by_hand(width, recall):
    cache = EncodingCache(TableEmbedder(), "{text}", 2)
    scored = score_dimensions([], mbeir_benchmark(), cache, [width], progress_every_s=30)[str(width)]
    cut = score_sets([], mbeir_benchmark(), [], EncodingCache(TableEmbedder(width), "{text}", 2), progress_every_s=30)
    assert scored["mbeir"]["average"] == cut["mbeir"]["average"]
    # recall@1 in the pool of all four: q1 ranks p1 below p2 (0.707 > 0.633) at full width, and below n1 cut
    # to 1 or 2; q2 finds p2 only at full width (cut to 1 or 2, n1 is (1) or (1, 0) like p2: a tie counts against)
    assert scored["mbeir"]["average"] == {"local": recall}


def test_a_pool_on_disk_is_cut_as_it_is_read(tmp_path):
    vectors = F.normalize(torch.tensor([list(v) for v in TABLE.values()]), dim=1)
    on_disk = EncodedPool(tmp_path, list(TABLE), lambda items: vectors[: len(items)], key_parts=["m"], block_rows=4)
    for pool in (InMemoryPool(vectors, 4), on_disk):
        cut = PrefixPool(pool, 2)
        assert len(cut) == 6
        assert torch.cat(list(cut.blocks()))[3].tolist() == [1.0, 0.0]  # q2
        assert cut.rows([1]).flatten().tolist() == pytest.approx([-0.1 / math.hypot(0.1, 1), 1 / math.hypot(0.1, 1)])


def test_per_width_headline_metrics_and_the_report_table():
    model = {"mmeb": {"average": 1.0, "meta_tasks": {"retrieval": 1.0}, "datasets": {}}, "m3t_heldout": {},
             "dimensions": {"16": {"mmeb": {"average": 0.5, "meta_tasks": {"retrieval": 0.5}},
                                   "mbeir": {"average": {"local": 0.25}}}}}  # fmt: skip
    baseline = {**model, "dimensions": {"16": {"mmeb": {"average": 0.125, "meta_tasks": {"retrieval": 0.125}},
                                               "mbeir": None}}}  # fmt: skip
    metrics = compare(model, baseline, chance=0.0)
    assert {k: v for k, v in metrics["headline"].items() if "@" in k} == {
        "mmeb/average@16": 0.5,
        "mmeb/retrieval@16": 0.5,
        "mbeir/local/average@16": 0.25,
    }
    assert metrics["delta_vs_baseline"]["mmeb/average@16"] == 0.375
    table = dimension_table(model, baseline)
    assert "| 16 | 0.250 |  | 0.500 | 0.125 |" in table


def with_dimensions(value) -> dict:
    return load_params()["evaluate"] | {"dimensions": value}


def test_dimensions_are_off_by_default_and_checked():
    assert EvaluationConfig.from_dict(load_params()["evaluate"]).dimensions is None
    assert EvaluationConfig.from_dict(with_dimensions([16, 32, 128])).dimensions == [16, 32, 128]
    with pytest.raises(EvaluationConfigError, match=r"evaluate\.dimensions must be strictly increasing"):
        EvaluationConfig.from_dict(with_dimensions([32, 16]))
    with pytest.raises(EvaluationConfigError, match=r"evaluate\.dimensions\[1\] must be a positive integer"):
        EvaluationConfig.from_dict(with_dimensions([16, 0]))
    config = EvaluationConfig.from_dict(with_dimensions([16, 256]))
    with pytest.raises(EvaluationConfigError, match="at most the embedding width 128, got 256"):
        config.check_width(128)
