"""How a single query or candidate is put to the model: MuCo's one-turn conversation.

MuCo evaluates every query and every candidate as its own conversation ending
in one ``<|emb|>`` (naver-ai/muco ``eval_mmeb.py`` lines 79-90, with
``TEMPLATE_BASE`` from ``src/loader.py`` lines 34-39). The user text is
normalised first, exactly as there: a trailing newline is added, runs of
newlines collapse into one, and the image marker becomes Qwen2-VL's vision
block (or disappears when there is no image).
"""

from __future__ import annotations

import re

from muco_flow.modeling import tokens

TEXT_SLOT = "{text}"
_NEWLINES = re.compile(r"\n+")


def check_single_turn_template(template: str) -> str:
    """``template`` if it holds one ``{text}`` slot and one ``<|emb|>``; else ValueError naming it."""
    if template.count(TEXT_SLOT) != 1 or template.count(tokens.EMB_TOKEN) != 1:
        raise ValueError(
            f"a single-turn template needs exactly one {TEXT_SLOT} and one {tokens.EMB_TOKEN}: {template!r}"
        )
    return template


def single_turn_text(text: str, has_image: bool, template: str) -> str:
    """The whole conversation for one item.

    ``text`` marks where the image goes with ``<|image_1|>``, ``<|image_pad|>``
    or the vision block. An item with an image but no marker gets the vision
    block and a newline in front (as MuCo's loader does for a hard negative's
    image, src/loader.py line 315); MuCo's own evaluation texts always have one.
    """
    if text and not text.endswith("\n"):
        text += "\n"
    text = _NEWLINES.sub("\n", text)
    # one spelling first, so that no marker is replaced twice
    text = text.replace(tokens.VISION_BLOCK, tokens.IMAGE_PAD).replace(tokens.IMAGE_1, tokens.IMAGE_PAD)
    if not has_image:
        text = text.replace(tokens.IMAGE_PAD, "")
    elif tokens.IMAGE_PAD not in text:
        text = f"{tokens.IMAGE_PAD}\n{text}"
    elif text.count(tokens.IMAGE_PAD) > 1:
        raise ValueError(f"one image but {text.count(tokens.IMAGE_PAD)} image markers in {text!r}")
    text = text.replace(tokens.IMAGE_PAD, tokens.VISION_BLOCK)
    return template.replace(TEXT_SLOT, text)
