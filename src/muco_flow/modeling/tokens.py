"""Special tokens: Qwen2-VL's own (every supported family spells its vision tokens the same), and the two MuCo adds."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# MuCo's embedding token: the final hidden state at each of these is one
# turn's embedding. <|mask|> is reserved by MuCo for masked-token objectives.
EMB_TOKEN = "<|emb|>"
MASK_TOKEN = "<|mask|>"
MUCO_TOKENS = (EMB_TOKEN, MASK_TOKEN)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Qwen2-VL's vision block: the image processor's patches go where <|image_pad|> is.
VISION_BLOCK = f"{VISION_START}{IMAGE_PAD}{VISION_END}"
# Where the image goes in M3T phrasings and MMEB texts: Phi-3-V's spelling,
# which MuCo's and VLM2Vec's loaders replace by the backbone's own.
IMAGE_1 = "<|image_1|>"

# In Qwen2-VL's vocabulary order, so the tiny preset's ids line up with the
# real tokenizer's relative order.
QWEN2_VL_SPECIAL_TOKENS = (
    PAD_TOKEN,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    "<|vision_pad|>",
    IMAGE_PAD,
    VIDEO_PAD,
)


def token_id(tokenizer: PreTrainedTokenizerBase, token: str | None) -> int:
    """The id of ``token`` in ``tokenizer``'s vocabulary; a token it lacks (or None: no padding token set) is an error.

    ``convert_tokens_to_ids`` answers a missing token with the unknown token's
    id, or None where there is none (Qwen2-VL's byte-level tokenizer).
    """
    found = tokenizer.convert_tokens_to_ids(token) if isinstance(token, str) else None
    if not isinstance(found, int) or (found == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(
            f"the tokenizer has no {token or 'padding'} token; was it saved by muco-flow's backbone pipeline?"
        )
    return found
