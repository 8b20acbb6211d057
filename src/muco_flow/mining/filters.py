"""Which of a query's ranked candidates may become its hard negatives: the false-negative rules.

A candidate is a (text, image) pair. In ranking order (best first), the rules
drop, each configurable (`mine.filter`, docs/training.md "Mined hard negatives"):

1. the positive itself (always: Tevatron's ``hn_mining.py`` keeps a retrieved
   document only ``if docid not in positive_ids``), and, with
   ``drop_duplicates_of_positive``, every exact duplicate of it: the same
   normalised text and the same image bytes (a pool may hold one target
   under two ids or two file names);
2. with ``max_fraction_of_positive``, every candidate scoring above that
   fraction of the positive's score: NV-Retriever's positive-aware
   "TopK-PercPos" (Moreira et al. 2024, arXiv:2407.15831), whose chosen
   margin, 95% of the positive's score, is the default;
3. the rank window over what is left: the first ``skip_top`` are skipped (the
   "top-k shifted by N" baseline of the same paper), the next ``keep`` kept.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from muco_flow.settings_schema import setting

# the order the rules apply in, as the counts name them
RULES = ("positive", "duplicate_of_positive", "above_fraction_of_positive", "skipped_top", "beyond_keep")


@dataclass(frozen=True)
class NegativeFilter:
    """The `mine.filter` parameters; conf/base/parameters_mine.yml says what each one does."""

    drop_duplicates_of_positive: bool
    max_fraction_of_positive: float | None = field(metadata=setting(minimum=0))
    skip_top: int = field(metadata=setting(minimum=0))
    keep: int = field(metadata=setting(minimum=1))


def normalised_text(text: str) -> str:
    """The text two candidates must share to be duplicates: NFKC, case-folded, whitespace runs as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def select_negatives(
    ranked: Iterable[tuple[int, float]],
    positive: int,
    positive_score: float,
    rule: NegativeFilter,
    *,
    duplicates_positive: Callable[[int], bool],
    dropped: dict[str, int] | None = None,
) -> list[int]:
    """The hard negatives of one query: candidate ids from ``ranked`` ((id, score), best first) the rules keep.

    ``duplicates_positive(id)``: whether that candidate is an exact duplicate
    of the positive (asked only of candidates the positive rule left and only
    when duplicates are dropped). ``dropped``, when given, counts each
    candidate that a rule removed under that rule's name (RULES).
    """
    counts = dropped if dropped is not None else {}
    threshold = None if rule.max_fraction_of_positive is None else rule.max_fraction_of_positive * positive_score
    survivors = 0
    chosen: list[int] = []
    for candidate, score in ranked:
        if candidate == positive:
            reason = "positive"
        elif rule.drop_duplicates_of_positive and duplicates_positive(candidate):
            reason = "duplicate_of_positive"
        elif threshold is not None and score > threshold:
            reason = "above_fraction_of_positive"
        else:
            survivors += 1
            if survivors <= rule.skip_top:
                reason = "skipped_top"
            elif len(chosen) < rule.keep:
                chosen.append(candidate)
                continue
            else:
                reason = "beyond_keep"
        counts[reason] = counts.get(reason, 0) + 1
    return chosen
