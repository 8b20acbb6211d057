"""Hard-negative mining: the false-negative rules on hand-worked rankings, mining against a brute-force reference,
resuming after an interruption, and the lineage a mined folder hands to stage 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from muco_flow.evaluation.encoding import EncodingCache
from muco_flow.mining.config import MiningConfig, MiningConfigError
from muco_flow.mining.filters import NegativeFilter, normalised_text, select_negatives
from muco_flow.mining.lineage import MANIFEST_FILE, mined_negatives_lineage
from muco_flow.mining.mine import TrainingFile, mine_hard_negatives

NV_RETRIEVER = NegativeFilter(drop_duplicates_of_positive=True, max_fraction_of_positive=0.95, skip_top=0, keep=2)


def never(_: int) -> bool:
    return False


# --- the rules, on rankings worked by hand -----------------------------------------------------


def test_the_positive_itself_and_its_exact_duplicate_are_never_negatives():
    # candidate 7 is the positive; candidate 3 is the same target under another id
    ranked = [(7, 0.90), (3, 0.90), (5, 0.50), (6, 0.40), (8, 0.30)]
    dropped: dict[str, int] = {}
    chosen = select_negatives(ranked, 7, 0.90, NV_RETRIEVER, duplicates_positive=lambda c: c == 3, dropped=dropped)
    assert chosen == [5, 6]
    assert dropped == {"positive": 1, "duplicate_of_positive": 1, "beyond_keep": 1}


def test_a_near_duplicate_scoring_above_95_percent_of_the_positive_is_dropped_and_a_true_hard_negative_kept():
    # positive scores 0.80: the threshold is 0.76; 0.79 (a near-duplicate) goes, 0.76 (not above) stays
    ranked = [(1, 0.79), (0, 0.80), (2, 0.76), (3, 0.10)]
    dropped: dict[str, int] = {}
    chosen = select_negatives(ranked, 0, 0.80, NV_RETRIEVER, duplicates_positive=never, dropped=dropped)
    assert chosen == [2, 3]
    assert dropped == {"above_fraction_of_positive": 1, "positive": 1}


def test_without_a_threshold_the_near_duplicate_is_the_first_negative():
    rule = NegativeFilter(drop_duplicates_of_positive=True, max_fraction_of_positive=None, skip_top=0, keep=1)
    assert select_negatives([(1, 0.79), (0, 0.80), (2, 0.76)], 0, 0.80, rule, duplicates_positive=never) == [1]


def test_duplicates_are_kept_when_that_rule_is_off():
    rule = NegativeFilter(drop_duplicates_of_positive=False, max_fraction_of_positive=None, skip_top=0, keep=3)
    chosen = select_negatives([(3, 0.9), (7, 0.9), (5, 0.5)], 7, 0.9, rule, duplicates_positive=lambda c: c == 3)
    assert chosen == [3, 5]


def test_the_rank_window_skips_the_top_survivors_and_keeps_the_next_n():
    # survivors in order: 4, 5, 6, 8, 9 (2 is the positive, 3 above 0.95 x 0.5 = 0.475)
    ranked = [(2, 0.50), (3, 0.49), (4, 0.40), (5, 0.30), (6, 0.20), (8, 0.10), (9, 0.05)]
    rule = NegativeFilter(drop_duplicates_of_positive=True, max_fraction_of_positive=0.95, skip_top=2, keep=2)
    dropped: dict[str, int] = {}
    assert select_negatives(ranked, 2, 0.50, rule, duplicates_positive=never, dropped=dropped) == [6, 8]
    assert dropped == {"positive": 1, "above_fraction_of_positive": 1, "skipped_top": 2, "beyond_keep": 1}


def test_normalised_text_ignores_case_width_and_spacing_only():
    assert normalised_text("  A  Cat\non ＭＡＴ ") == "a cat on mat"
    assert normalised_text("a cat") != normalised_text("a cats")


def test_mining_settings_are_checked_with_their_dotted_key():
    values = {
        "model": None,
        "batch_size": 4,
        "pool_cache_dir": "x",
        "pool_block_rows": 4,
        "query_block_rows": 4,
        "search_depth": 8,
        "filter": {"drop_duplicates_of_positive": True, "max_fraction_of_positive": 0.95, "skip_top": 0, "keep": 0},
    }
    with pytest.raises(MiningConfigError, match=r"mine\.filter\.keep"):
        MiningConfig.from_dict(values)
