"""Multi-turn conversations: MuCo's query and target sides, as text.

A sample with K turns becomes a query conversation (the system block, then
one turn per query, each answered by one ``<|emb|>``) and K targets. This is
naver-ai/muco's ``TEMPLATE_PRETRAIN`` (src/loader.py lines 101-130): turns
joined by a newline, no newline after the last. Which query goes first, and
which phrasing each turn uses, is drawn again for every epoch, as the official
loader draws them on every load (src/loader.py lines 216-227); the draw is
seeded by (seed, epoch, sample), so a step still maps to one batch.

The published phrasings mark the image with ``<|image_1|>``. As in the
official loader (lines 263-273, 289-291), the first turn gets the vision block
in its place and the other turns drop ``<|image_1|>\\n``; a sample without an
image drops the marker everywhere.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from muco_flow.modeling import tokens
from muco_flow.modeling.prompt import TEXT_SLOT, check_single_turn_template

MODES = ("multi_turn", "single_turn")
# How the K targets are laid out: each as its own one-turn conversation, as
# evaluation encodes them, or all in one conversation where each sees the
# earlier ones (which lets the loss match whole conversations, not answers).
TARGET_LAYOUTS = ("independent", "conversation")
CONTENT_SLOT = "{content}"


@dataclass(frozen=True)
class ChatTemplates:
    """The `format.templates` parameters: every string a conversation is made of."""

    system: str  # the whole system block, newline included
    turn: str  # one user turn and its answer; "{content}" is the user text
    turn_separator: str  # between turns
    image: str  # what replaces the image marker in the first turn

    def __post_init__(self) -> None:
        if self.turn.count(CONTENT_SLOT) != 1 or self.turn.count(tokens.EMB_TOKEN) != 1:
            raise ValueError(
                f"format.templates.turn must hold one {CONTENT_SLOT} and one {tokens.EMB_TOKEN}: {self.turn!r}"
            )
        if tokens.IMAGE_PAD not in self.image:
            raise ValueError(f"format.templates.image must hold {tokens.IMAGE_PAD}: {self.image!r}")

    def single_turn(self) -> str:
        """A one-turn conversation with a ``{text}`` slot: how evaluation encodes one item."""
        return check_single_turn_template(self.system + self.turn.replace(CONTENT_SLOT, TEXT_SLOT))


def check_size_settings(section: str, max_length: int, image_short_side: int | None) -> None:
    """Refuses sequences too short to hold a turn, and a resize below Qwen2-VL's 28-pixel minimum."""
    if max_length < 8:
        raise ValueError(f"{section}.max_length must be at least 8, got {max_length}")
    if image_short_side is not None and image_short_side < 28:
        raise ValueError(f"{section}.image_short_side must be null or at least 28, got {image_short_side}")


@dataclass(frozen=True)
class FormatConfig:
    """The `format` parameters (conf/base/parameters_format.yml)."""

    templates: ChatTemplates
    mode: str = "multi_turn"
    turns_per_conversation: int | None = None  # None: all K turns in one conversation
    # None: every conversation of a sample each epoch; n: its first n, whose turns follow the
    # epoch's drawn order (single_turn and 1: one (image, query) pair per image per epoch, as many
    # images per step as multi_turn; docs/recipe.md, "Multi-turn against single-turn, measured")
    conversations_per_sample: int | None = None
    target_field: str = "pos_text"
    target_layout: str = "independent"
    shuffle_turns: bool = True
    # True: turn order and phrasing drawn anew each epoch (MuCo's loader);
    # False: one draw per sample for the whole run
    resample_each_epoch: bool = True
    # also tokenize neg_text, one hard negative per turn (training.hard_negatives)
    hard_negatives: bool = False
    # end every user text with a newline, as MuCo's evaluation (eval_mmeb.py lines 82-83) and its
    # stage-2 loader (src/loader.py lines 357-362) do, so that a trained target is token for token
    # what evaluation encodes; false: TEMPLATE_PRETRAIN's text exactly, which evaluation then
    # meets with one newline more
    user_text_newline: bool = True
    max_length: int = 2048
    # None: images at their own size; n: the short side resized to n first (MuCo: 640)
    image_short_side: int | None = None
    seed: int = 0
    # processes formatting ingest shards at once (one shard each); not a setting of the result
    num_workers: int = 1

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"format.num_workers must be at least 1, got {self.num_workers}")
        if self.mode not in MODES:
            raise ValueError(f"format.mode must be one of {MODES}, got '{self.mode}'")
        if self.turns_per_conversation is not None and self.turns_per_conversation < 1:
            raise ValueError(f"format.turns_per_conversation must be at least 1, got {self.turns_per_conversation}")
        if self.conversations_per_sample is not None and self.conversations_per_sample < 1:
            raise ValueError(
                f"format.conversations_per_sample must be null or at least 1, got {self.conversations_per_sample}"
            )
        if self.target_field not in ("pos_text", "pos_sentence"):
            raise ValueError(f"format.target_field must be pos_text or pos_sentence, got '{self.target_field}'")
        if self.target_layout not in TARGET_LAYOUTS:
            raise ValueError(f"format.target_layout must be one of {TARGET_LAYOUTS}, got '{self.target_layout}'")
        check_size_settings("format", self.max_length, self.image_short_side)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> FormatConfig:
        return cls(**{**params, "templates": ChatTemplates(**params["templates"])})

    @property
    def chunk_size(self) -> int | None:
        return 1 if self.mode == "single_turn" else self.turns_per_conversation

    def settings(self) -> dict[str, Any]:
        """What training needs to assemble conversations, as the format manifest records it."""
        return {
            "mode": self.mode,
            "turns_per_conversation": self.turns_per_conversation,
            "conversations_per_sample": self.conversations_per_sample,
            "target_field": self.target_field,
            "target_layout": self.target_layout,
            "max_length": self.max_length,
            "image_short_side": self.image_short_side,
            "seed": self.seed,
            "shuffle_turns": self.shuffle_turns,
            "resample_each_epoch": self.resample_each_epoch,
            "hard_negatives": self.hard_negatives,
            "user_text_newline": self.user_text_newline,
        }


def query_turn_content(phrasing: str, first: bool, has_image: bool, image: str) -> str:
    """A phrasing as the user text of a turn: the image in the first turn only."""
    if first:
        text = phrasing.replace(tokens.IMAGE_1, image if has_image else "")
        # our addition: a first phrasing without the marker still shows the sample's image
        return text if not has_image or image in text else f"{image}\n{text}"
    # the official loader removes "<|image_1|>\n" only; a bare marker would stay as text
    return phrasing.replace(f"{tokens.IMAGE_1}\n", "").replace(tokens.IMAGE_1, "")


def target_turn_content(target: str) -> str:
    """A target as user text: targets have no image (stage 1 ingests none)."""
    return query_turn_content(target, first=True, has_image=False, image="")


def render_turn(content: str, t: ChatTemplates, *, first: bool, newline: bool = False) -> str:
    """One turn's text; turns after the first start with the separator; ``newline``: the text ends with one."""
    if newline and not content.endswith("\n"):
        content += "\n"
    return ("" if first else t.turn_separator) + t.turn.replace(CONTENT_SLOT, content)


@dataclass(frozen=True)
class TurnPlan:
    """One epoch's draw for a sample: the turn order and each turn's phrasing."""

    order: tuple[int, ...]  # M3T turn indices, in conversation order
    phrasing: tuple[int, ...]  # phrasing index of each turn in ``order``


def plan_turns(
    sample_id: str, phrasings_per_turn: Sequence[int], epoch: int, *, seed: int, shuffle: bool, resample: bool
) -> TurnPlan:
    """The turn order and phrasings of ``sample_id`` in ``epoch``; the same on every rank and every run."""
    rng = random.Random(f"muco-turns:{seed}:{epoch if resample else 0}:{sample_id}")
    order = list(range(len(phrasings_per_turn)))
    if shuffle:
        rng.shuffle(order)
    return TurnPlan(tuple(order), tuple(rng.randrange(phrasings_per_turn[k]) for k in order))


def part_turns(turns: int, chunk_size: int | None, fitting: int) -> list[int]:
    """How many turns each conversation of a sample holds.

    The sample's turns (in the epoch's order) are cut into chunks of
    ``chunk_size`` (all in one with None); each keeps its first ``fitting``
    turns, the most that fit ``max_length`` whatever the draw.
    """
    size = chunk_size or turns
    return [min(size, turns - start, fitting) for start in range(0, turns, size)]


def target_key(text: str, image_sha256: str | None = None) -> int:
    """A signed 64-bit id, equal for target texts that differ only in case and spacing (and, given, in nothing else).

    The loss uses it to tell repeated answers ("red", "three") apart from real negatives.
    ``image_sha256``: the target's image (stage 2), so that two targets with one
    text ("Represent the given image.") and different images are different
    targets; None (no image) gives the text's own key.
    """
    normalised = " ".join(text.split()).casefold()
    if image_sha256:
        # a NUL cannot occur in a checked text (data/row_checks.py), so no text collides with text + image
        normalised += "\0" + image_sha256
    digest = hashlib.blake2b(normalised.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)
