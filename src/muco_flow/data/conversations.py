"""Multi-turn conversations: MuCo's query and target sides, as text and as tokens.

A sample with K turns becomes a query conversation (system prompt, then the
image with query 1, then queries 2..K, each answered by one ``<|emb|>``) and a
target conversation with the K targets in the same order. Turn order and the
phrasing of each query are drawn from a generator seeded by the sample id, so
a sample always formats the same way for a given seed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from muco_flow.data.schema import M3T_TURN_TYPES

MODES = ("multi_turn", "single_turn")
# How the K targets are laid out: each as its own one-turn conversation, as
# evaluation encodes them, or all in one conversation where each sees the
# earlier ones (which lets the loss match whole conversations, not answers).
TARGET_LAYOUTS = ("independent", "conversation")
UNKNOWN_TURN_TYPE = -1


@dataclass(frozen=True)
class ChatTemplates:
    """The `format.templates` parameters: every string a conversation is made of."""

    system: str
    message: str  # "{role}" and "{content}"
    image: str
    query_first: str  # "{image}" and "{query}"
    query: str  # "{query}"
    target: str  # "{target}"
    assistant: str  # the whole assistant answer: "<|emb|>"

    def __post_init__(self) -> None:
        required = {
            "message": ("{role}", "{content}"),
            "query_first": ("{image}", "{query}"),
            "query": ("{query}",),
            "target": ("{target}",),
        }
        for name, fields in required.items():
            for f in fields:
                if f not in getattr(self, name):
                    raise ValueError(f"format.templates.{name} must contain {f}: '{getattr(self, name)}'")


@dataclass(frozen=True)
class FormatConfig:
    """The `format` parameters (conf/base/parameters_format.yml)."""

    templates: ChatTemplates
    mode: str = "multi_turn"
    turns_per_conversation: int | None = None  # None: all K turns in one conversation
    target_field: str = "pos_text"
    target_layout: str = "independent"
    hard_negatives: bool = False  # also tokenize neg_text, each as its own one-turn target conversation
    shuffle_turns: bool = True
    max_length: int = 2048
    seed: int = 0
    rows_per_shard: int = 20000

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"format.mode must be one of {MODES}, got '{self.mode}'")
        if self.turns_per_conversation is not None and self.turns_per_conversation < 1:
            raise ValueError(f"format.turns_per_conversation must be at least 1, got {self.turns_per_conversation}")
        if self.target_field not in ("pos_text", "pos_sentence"):
            raise ValueError(f"format.target_field must be pos_text or pos_sentence, got '{self.target_field}'")
        if self.target_layout not in TARGET_LAYOUTS:
            raise ValueError(f"format.target_layout must be one of {TARGET_LAYOUTS}, got '{self.target_layout}'")
        if self.max_length < 8:
            raise ValueError(f"format.max_length must be at least 8, got {self.max_length}")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> FormatConfig:
        return cls(**{**params, "templates": ChatTemplates(**params["templates"])})

    @property
    def chunk_size(self) -> int | None:
        return 1 if self.mode == "single_turn" else self.turns_per_conversation


@dataclass(frozen=True)
class ConversationPlan:
    """Which turns, in which order and phrasing, one conversation holds."""

    sample_id: str
    part: int
    turn_index: tuple[int, ...]  # the M3T turn each position holds
    turn_type: tuple[int, ...]
    queries: tuple[str, ...]
    targets: tuple[str, ...]
    phrasing: tuple[int, ...] = field(default=())
    negatives: tuple[str, ...] = ()  # a wrong answer per turn, in the same order (hard negatives)


def plan_conversations(
    sample_id: str,
    qry: Sequence[Sequence[str]],
    targets: Sequence[str],
    config: FormatConfig,
    negatives: Sequence[str] | None = None,
) -> list[ConversationPlan]:
    """The sample's conversations: turns shuffled, one phrasing each, split into chunks.

    ``negatives`` (M3T's ``neg_text``, one per turn) follow their turns.
    """
    if negatives is not None and len(negatives) != len(qry):
        raise ValueError(f"sample {sample_id}: {len(negatives)} hard negatives for {len(qry)} turns")
    rng = random.Random(f"muco-format:{config.seed}:{sample_id}")
    order = list(range(len(qry)))
    if config.shuffle_turns:
        rng.shuffle(order)
    phrasing = [rng.randrange(len(qry[k])) for k in order]
    types = M3T_TURN_TYPES if len(qry) == len(M3T_TURN_TYPES) else None
    size = config.chunk_size or len(order)
    plans = []
    for part, start in enumerate(range(0, len(order), size)):
        turns = order[start : start + size]
        chosen = phrasing[start : start + size]
        plans.append(
            ConversationPlan(
                sample_id=sample_id,
                part=part,
                turn_index=tuple(turns),
                turn_type=tuple(int(types[k]) if types else UNKNOWN_TURN_TYPE for k in turns),
                queries=tuple(qry[k][p] for k, p in zip(turns, chosen, strict=True)),
                targets=tuple(targets[k] for k in turns),
                phrasing=tuple(chosen),
                negatives=tuple(negatives[k] for k in turns) if negatives is not None else (),
            )
        )
    return plans


def target_key(text: str) -> int:
    """A signed 64-bit id, equal for target texts that differ only in case and spacing.

    The loss uses it to tell repeated answers ("red", "three") apart from real negatives.
    """
    digest = hashlib.blake2b(" ".join(text.split()).casefold().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _segments(user_contents: Sequence[str], t: ChatTemplates, system_every_turn: bool = False) -> list[str]:
    """One text segment per turn: the user message and its ``<|emb|>`` answer.

    The system prompt opens the first segment (every segment with
    ``system_every_turn``, which makes each one a whole conversation).
    Segments end at special tokens, so tokenizing them one by one equals
    tokenizing the whole text.
    """
    segments = []
    for i, content in enumerate(user_contents):
        opens = i == 0 or system_every_turn
        head = t.message.format(role="system", content=t.system) if opens and t.system else ""
        user = t.message.format(role="user", content=content)
        segments.append(head + user + t.message.format(role="assistant", content=t.assistant))
    return segments


def query_segments(plan: ConversationPlan, t: ChatTemplates) -> list[str]:
    """The query side; the image goes with the first query."""
    contents = [
        t.query_first.format(image=t.image, query=q) if i == 0 else t.query.format(query=q)
        for i, q in enumerate(plan.queries)
    ]
    return _segments(contents, t)


def target_segments(plan: ConversationPlan, t: ChatTemplates, independent: bool = False) -> list[str]:
    """The target side: text only, in the query side's turn order; ``independent``: one conversation each."""
    return _segments([t.target.format(target=x) for x in plan.targets], t, system_every_turn=independent)


def negative_segments(plan: ConversationPlan, t: ChatTemplates) -> list[str]:
    """The hard negatives, each its own one-turn conversation, as independent targets are."""
    return _segments([t.target.format(target=x) for x in plan.negatives], t, system_every_turn=True)


def single_turn_template(t: ChatTemplates) -> str:
    """A one-turn conversation with ``{image}`` and ``{text}`` slots, for encoding single items.

    This is how MuCo evaluates: each query and each candidate is its own
    conversation ending in one ``<|emb|>``.
    """

    def literal(text: str) -> str:
        return text.replace("{", "{{").replace("}", "}}")

    head = literal(t.message.format(role="system", content=t.system)) if t.system else ""
    user = literal(t.message.format(role="user", content="\x00")).replace("\x00", "{image}{text}")
    return head + user + literal(t.message.format(role="assistant", content=t.assistant))
