"""Row checks that do not depend on the column layout: types, texts, ids, invisible text, length and count limits.

The formats' row rules (``m3t_ingest.py``, ``mmeb_train_ingest.py``) know
their columns and call these on each field; the limits walk whatever fields a
row rule validated, so they hold when a schema changes. Every limit is an
``ingest`` setting and its message names it.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterator
from typing import Any

from muco_flow.modeling import tokens

# The most turns and phrasings a setting may allow. Format tokenizes every
# phrasing of every turn (twice: as the first turn and as a later one) and a
# conversation holds all of a sample's turns, so a row far beyond M3T's 7
# turns of a few phrasings is malformed, and would cost memory, not add data.
TURNS_LIMIT = 127
PHRASINGS_LIMIT = 32767

# Characters that show nothing: Unicode's format (Cf: zero-width space,
# joiners, BOM, word joiner, soft hyphen, bidi marks, tags), control (Cc) and
# separator (Z*) categories, plus the Hangul fillers and the blank Braille
# pattern (letters or symbols that render as blank), the combining grapheme
# joiner and the variation selectors (marks that change nothing on their own).
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})
_BLANK_SYMBOLS = frozenset(
    "\u115f\u1160\u3164\uffa0\u2800\u034f"
    + "".join(map(chr, range(0xFE00, 0xFE10)))
    + "".join(map(chr, range(0xE0100, 0xE01F0)))
)


class Reject(Exception):
    """A row that ingestion keeps out, with its reason code and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def is_blank(text: str) -> bool:
    """Whether ``text`` shows nothing: empty, or only whitespace and invisible characters."""
    return not any(ch not in _BLANK_SYMBOLS and unicodedata.category(ch) not in _INVISIBLE_CATEGORIES for ch in text)


def is_missing(value: Any) -> bool:
    """Whether a field is absent: null, or NaN (as pandas writes a missing value)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def string_list(value: Any, name: str) -> list[str]:
    """``value`` as a list of strings, or Reject (WRONG_TYPE) naming the field ``name``."""
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise Reject("WRONG_TYPE", f"{name} must be a list of strings, got {type(value).__name__}")
    return list(value)


CONTROL_TOKENS = (*tokens.QWEN2_VL_SPECIAL_TOKENS, *tokens.MUCO_TOKENS)

PLACEHOLDER_PATTERN = re.compile(r"<\|image_\d+\|>")


def check_text(text: str, name: str, limit: int, *, allow_empty: bool = False) -> None:
    """Reject if ``text`` cannot be put into a conversation; ``allow_empty``: an image may stand alone."""
    if not allow_empty and is_blank(text.replace(tokens.IMAGE_1, "")):
        raise Reject("EMPTY_TEXT", f"{name} is empty or only invisible characters")
    placeholders = PLACEHOLDER_PATTERN.findall(text)
    if len(placeholders) > 1 or any(p != tokens.IMAGE_1 for p in placeholders):
        raise Reject("IMAGE_PLACEHOLDER", f"{name} holds {', '.join(placeholders)}; at most one {tokens.IMAGE_1}")
    if len(text) > limit:
        raise Reject("TEXT_TOO_LONG", f"{name} has {len(text)} characters, the limit is {limit}")
    # A control token in the data would add turns or image slots the
    # conversation does not have.
    found = next((tok for tok in CONTROL_TOKENS if tok in text), None)
    if found:
        raise Reject("SPECIAL_TOKEN_IN_TEXT", f"{name} contains the control token {found}")


def internal_error(err: BaseException) -> Reject:
    """A reject for a failure no check foresaw; the row is kept out, the run goes on."""
    return Reject("INTERNAL_ERROR", f"unexpected {type(err).__name__} while checking the row: {err}"[:2000])


def normalise_sample_id(sample_id: str, max_chars: int) -> str:
    """The id as stored and compared for duplicates: NFC, without surrounding whitespace.

    Case is kept, and ids differing only in case are different samples:
    many id schemes (base64, YouTube-style, content hashes in mixed case)
    are case-sensitive, and folding would merge distinct samples.
    """
    normal = unicodedata.normalize("NFC", sample_id).strip()
    if is_blank(normal):
        raise Reject("MISSING_FIELD", f"sample id {sample_id[:40]!r} is empty once surrounding whitespace is removed")
    if len(normal) > max_chars:
        raise Reject("TEXT_TOO_LONG", f"sample id has {len(normal)} characters, ingest.max_id_chars is {max_chars}")
    return normal


def _texts(value: Any, name: str) -> Iterator[tuple[str, str]]:
    """Every string inside ``value`` (nested lists included), with where it is."""
    if isinstance(value, str):
        yield name, value
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _texts(item, f"{name}[{i}]")


def check_row_limits(
    fields: dict[str, Any],
    *,
    query_field: str | None,
    path_fields: tuple[str, ...],
    max_text_chars: int,
    max_path_chars: int,
    max_turns: int,
    max_phrasings_per_turn: int,
) -> None:
    """Raises Reject if a validated row exceeds a limit.

    ``fields`` maps our column names to validated values; ``query_field`` is
    the list of turns, each a list of phrasings; ``path_fields`` hold paths
    and URLs (limited by ``max_path_chars``); every other string is text
    (``max_text_chars``), wherever it is nested.
    """
    turns = (fields.get(query_field) if query_field else None) or []
    if len(turns) > max_turns:
        raise Reject("TOO_MANY_TURNS", f"{query_field} has {len(turns)} turns, ingest.max_turns is {max_turns}")
    for k, phrasings in enumerate(turns):
        if isinstance(phrasings, list | tuple) and len(phrasings) > max_phrasings_per_turn:
            raise Reject(
                "TOO_MANY_PHRASINGS",
                f"{query_field} turn {k} has {len(phrasings)} phrasings, "
                f"ingest.max_phrasings_per_turn is {max_phrasings_per_turn}",
            )
    for name, value in fields.items():
        limit, setting = (
            (max_path_chars, "max_path_chars") if name in path_fields else (max_text_chars, "max_text_chars")
        )
        for where, text in _texts(value, name):
            if len(text) > limit:
                raise Reject("TEXT_TOO_LONG", f"{where} has {len(text)} characters, ingest.{setting} is {limit}")


def check_limit_settings(max_turns: int, max_phrasings_per_turn: int) -> None:
    """Refuses limits the formatted conversations could not store."""
    if not 1 <= max_turns <= TURNS_LIMIT:
        raise ValueError(f"ingest.max_turns must be within [1, {TURNS_LIMIT}], got {max_turns}")
    if not 1 <= max_phrasings_per_turn <= PHRASINGS_LIMIT:
        raise ValueError(
            f"ingest.max_phrasings_per_turn must be within [1, {PHRASINGS_LIMIT}], got {max_phrasings_per_turn}"
        )
