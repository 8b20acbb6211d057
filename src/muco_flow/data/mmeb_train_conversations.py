"""MuCo's second-stage conversations, as text: the rules of naver-ai/muco ``src/loader.py``.

Per MMEB-train row (the loader's non-pretraining branch, lines 240-385):

- each side's user text: ``<|image_1|>`` becomes the vision block, which is
  removed when the side has no image (lines 274-307); empty text becomes
  ``"\\n"`` and a missing final newline is added (lines 350-362);
- its answer text for the other side: the user text with the vision block
  replaced by ``Image description: {sentence}`` (lines 364-370);
- the query conversation is ``TEMPLATE_TRAIN`` (lines 41-54) with the query's
  user text and the *target's* answer text, masked; the target conversation
  the same with the roles swapped (lines 382-383). Each holds two
  ``<|emb|>``: after the user turn (the main embedding) and after the
  reconstruction instruction (the auxiliary one);
- masking (lines 372-380, ``masking`` lines 406-415): with probability 0.5
  the whole answer is one ``<|mask|>``; otherwise each space-separated word
  becomes ``<|mask|>`` with probability 0.5, consecutive masks merged;
- the hard negative: one of the row's negatives drawn at random (line 255),
  as ``TEMPLATE_BASE`` (lines 34-39, 385); with an image and no marker, the
  vision block and a newline go in front (lines 314-315); a row without
  negatives gets the empty text ``"\\n"`` (lines 258-261, 354-355).

The loader draws the negative and the masks anew on every load. Here they are
drawn per epoch from a generator seeded by (seed, epoch, sample id), in the
loader's order (negative, then the query conversation's mask, then the
target's), so a resumed run and every rank see the same draws.

Two choices of ours: a query or target with an image but no marker gets the
vision block and a newline in front, as the loader does for negatives (the
loader would fail on such a row); templates and probabilities come from
``finetune_format`` (conf/base/parameters_finetune.yml).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from muco_flow.data.conversations import check_size_settings
from muco_flow.modeling import tokens

USER_SLOT = "{user_sentence}"
ANSWER_SLOT = "{gen_sentence}"
SENTENCE_SLOT = "{sentence}"
# The two <|emb|> of a stage-2 conversation, in sequence order.
EMBEDDINGS = ("main", "auxiliary")


@dataclass(frozen=True)
class FinetuneTemplates:
    """The `finetune_format.templates` parameters."""

    train: str  # TEMPLATE_TRAIN: one {user_sentence}, then one {gen_sentence}; two <|emb|>
    base: str  # TEMPLATE_BASE, for hard negatives: one {user_sentence}, one <|emb|>
    image: str  # what <|image_1|> becomes
    image_description: str  # what the image becomes in the answer; one {sentence}

    def __post_init__(self) -> None:
        train_ok = (
            self.train.count(USER_SLOT) == 1
            and self.train.count(ANSWER_SLOT) == 1
            and self.train.index(USER_SLOT) < self.train.index(ANSWER_SLOT)
            and self.train.count(tokens.EMB_TOKEN) == len(EMBEDDINGS)
            and self.train.index(tokens.EMB_TOKEN) < self.train.index(ANSWER_SLOT)
            and self.train.rindex(tokens.EMB_TOKEN) > self.train.index(ANSWER_SLOT)
        )
        if not train_ok:
            raise ValueError(
                f"finetune_format.templates.train must hold {USER_SLOT}, an {tokens.EMB_TOKEN}, {ANSWER_SLOT} "
                f"and a second {tokens.EMB_TOKEN}, in that order, each once: {self.train!r}"
            )
        if self.base.count(USER_SLOT) != 1 or self.base.count(tokens.EMB_TOKEN) != 1:
            raise ValueError(
                f"finetune_format.templates.base must hold one {USER_SLOT} and one {tokens.EMB_TOKEN}: {self.base!r}"
            )
        if tokens.IMAGE_PAD not in self.image:
            raise ValueError(f"finetune_format.templates.image must hold {tokens.IMAGE_PAD}: {self.image!r}")
        if self.image_description.count(SENTENCE_SLOT) != 1:
            raise ValueError(
                f"finetune_format.templates.image_description must hold one {SENTENCE_SLOT}: {self.image_description!r}"
            )

    def train_parts(self) -> tuple[str, str, str]:
        """TEMPLATE_TRAIN cut at its slots: before the user text, between user text and answer, after the answer."""
        head, rest = self.train.split(USER_SLOT)
        middle, tail = rest.split(ANSWER_SLOT)
        return head, middle, tail


@dataclass(frozen=True)
class MaskConfig:
    """The `finetune_format.mask` parameters (naver-ai/muco src/loader.py lines 372-380)."""

    whole_probability: float = 0.5  # the whole answer becomes one <|mask|>
    word_probability: float = 0.5  # otherwise, each word becomes <|mask|>

    def __post_init__(self) -> None:
        for name in ("whole_probability", "word_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"finetune_format.mask.{name} must be within [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class FinetuneFormatConfig:
    """The `finetune_format` parameters (conf/base/parameters_finetune.yml)."""

    templates: FinetuneTemplates
    mask: MaskConfig = field(default_factory=MaskConfig)
    hard_negatives: bool = True  # false: batches carry no hard negatives
    max_length: int = 1024  # tokens per sequence, for any draw of the masks
    image_short_side: int | None = None
    seed: int = 0
    rows_per_shard: int = 20000

    def __post_init__(self) -> None:
        check_size_settings("finetune_format", self.max_length, self.image_short_side)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> FinetuneFormatConfig:
        return cls(
            **{
                **params,
                "templates": FinetuneTemplates(**params["templates"]),
                "mask": MaskConfig(**params.get("mask", {})),
            }
        )

    def settings(self) -> dict[str, Any]:
        """What training needs to assemble the conversations, as the format manifest records it."""
        return {
            "mask": {"whole_probability": self.mask.whole_probability, "word_probability": self.mask.word_probability},
            "hard_negatives": self.hard_negatives,
            "max_length": self.max_length,
            "image_short_side": self.image_short_side,
            "seed": self.seed,
        }


def user_text(text: str, has_image: bool, image: str) -> str:
    """A side's user text: the image marker as the vision block (or nothing), ending in a newline."""
    text = text.replace(tokens.IMAGE_1, image)
    if not has_image:
        text = text.replace(image, "")
    elif image not in text:
        text = f"{image}\n{text}"
    if not text.endswith("\n"):
        text += "\n"  # an empty text becomes "\n", as the loader's two steps give
    return text


def answer_text(user: str, sentence: str | None, templates: FinetuneTemplates) -> str:
    """The text the other side reconstructs: its image (if any) replaced by the image's description."""
    if not sentence:
        return user  # a side without an image has no vision block left
    return user.replace(templates.image, templates.image_description.replace(SENTENCE_SLOT, sentence))


def answer_words(text: str) -> list[str]:
    """The units masking works on: split at single spaces, as the loader's ``sentence.split(' ')``."""
    return text.split(" ")


@dataclass(frozen=True)
class MaskDraw:
    """One draw of the masks over an answer: all of it, or these words."""

    whole: bool
    words: tuple[bool, ...]  # per word: masked; empty when whole


def draw_masks(rng: random.Random, words: int, mask: MaskConfig) -> MaskDraw:
    """The loader's draws, in its order: first whole-or-not, then one per word."""
    if rng.random() < mask.whole_probability:
        return MaskDraw(True, ())
    return MaskDraw(False, tuple(rng.random() < mask.word_probability for _ in range(words)))


def masked_answer(text: str, draw: MaskDraw) -> str:
    """``text`` under ``draw``: consecutive masked words become one ``<|mask|>``."""
    if draw.whole:
        return tokens.MASK_TOKEN
    kept: list[str] = []
    for word, masked in zip(answer_words(text), draw.words, strict=True):
        if masked:
            if kept and kept[-1] == tokens.MASK_TOKEN:
                continue
            kept.append(tokens.MASK_TOKEN)
        else:
            kept.append(word)
    return " ".join(kept)


@dataclass(frozen=True)
class SamplePlan:
    """One epoch's draws for a sample."""

    negative: int | None  # which hard negative; None: the row has none
    in_query: MaskDraw  # masks over the target's answer, inside the query conversation
    in_target: MaskDraw  # masks over the query's answer, inside the target conversation


def plan_sample(
    sample_id: str,
    negatives: int,
    target_answer_words: int,
    query_answer_words: int,
    epoch: int,
    *,
    seed: int,
    mask: MaskConfig,
) -> SamplePlan:
    """The negative and the masks of ``sample_id`` in ``epoch``; the same on every rank and every run."""
    rng = random.Random(f"muco-finetune:{seed}:{epoch}:{sample_id}")
    negative = rng.randrange(negatives) if negatives else None
    in_query = draw_masks(rng, target_answer_words, mask)
    in_target = draw_masks(rng, query_answer_words, mask)
    return SamplePlan(negative, in_query, in_target)


def train_conversation(user: str, answer: str, templates: FinetuneTemplates) -> str:
    """TEMPLATE_TRAIN filled in (each slot once, whatever the texts hold)."""
    head, middle, tail = templates.train_parts()
    return head + user + middle + answer + tail


def negative_conversation(text: str, has_image: bool, templates: FinetuneTemplates) -> str:
    """TEMPLATE_BASE with a hard negative's text."""
    before, after = templates.base.split(USER_SLOT)
    return before + user_text(text, has_image, templates.image) + after


@dataclass(frozen=True)
class Stage2Texts:
    """A sample's three sequences in one epoch, as text."""

    query: str
    target: str
    negative: str | None  # None: finetune_format.hard_negatives is false


def stage2_texts(
    sample: dict[str, Any], epoch: int, config: FinetuneFormatConfig, sample_id: str | None = None
) -> Stage2Texts:
    """The sample's conversations in ``epoch``, straight from its texts: the reference the token pieces follow.

    ``sample`` holds qry, pos_text, qry_sentence, pos_sentence, neg_text and
    whether each side has an image (query_image, target_image, negative_images).
    """
    t = config.templates
    query_user = user_text(sample["qry"], sample["query_image"], t.image)
    target_user = user_text(sample["pos_text"], sample["target_image"], t.image)
    query_answer = answer_text(query_user, sample["qry_sentence"] if sample["query_image"] else None, t)
    target_answer = answer_text(target_user, sample["pos_sentence"] if sample["target_image"] else None, t)
    negatives = sample["neg_text"] if config.hard_negatives else []
    plan = plan_sample(
        sample_id or sample["sample_id"],
        len(negatives),
        len(answer_words(target_answer)),
        len(answer_words(query_answer)),
        epoch,
        seed=config.seed,
        mask=config.mask,
    )
    if not config.hard_negatives:
        negative = None
    elif plan.negative is None:
        negative = negative_conversation("", False, t)
    else:
        negative = negative_conversation(negatives[plan.negative], sample["negative_images"][plan.negative], t)
    return Stage2Texts(
        query=train_conversation(query_user, masked_answer(target_answer, plan.in_query), t),
        target=train_conversation(target_user, masked_answer(query_answer, plan.in_target), t),
        negative=negative,
    )
