"""Model inputs from text and images, without ``Qwen2VLProcessor``.

transformers' processor needs torchvision; this does the same job with the
image processor's PIL backend: each ``<|image_pad|>`` in the text becomes as
many tokens as the image has merged patches, and ``mm_token_type_ids`` marks
them, which Qwen2-VL needs to place its multimodal rotary positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from muco_flow.modeling import tokens
from muco_flow.modeling.image_sizing import resize_short_side, upscale_tiny_image


def image_inputs(
    image_processor: Qwen2VLImageProcessorPil, images: Sequence[Image.Image], short_side: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Pixel patches, their (t, h, w) grids, and the LLM tokens each image takes.

    Tiny images are stretched first, as MuCo's loader and evaluation processor do
    (``upscale_tiny_image``); ingested ones already are, evaluation images are not.
    """
    images = [resize_short_side(upscale_tiny_image(image), short_side) for image in images]
    features = image_processor(images=images, return_tensors="pt")
    grid = features["image_grid_thw"]
    merge = image_processor.merge_size**2
    return features["pixel_values"], grid, [int(n) // merge for n in grid.prod(dim=-1)]


def expand_image_pads(token_ids: Sequence[int], image_pad_id: int, tokens_per_image: Sequence[int]) -> list[int]:
    """Replaces the i-th ``<|image_pad|>`` with ``tokens_per_image[i]`` copies."""
    expanded: list[int] = []
    images = iter(tokens_per_image)
    for token in token_ids:
        if token == image_pad_id:
            try:
                expanded.extend([image_pad_id] * next(images))
            except StopIteration:
                raise ValueError("text has more <|image_pad|> placeholders than images") from None
        else:
            expanded.append(token)
    if next(images, None) is not None:
        raise ValueError("text has fewer <|image_pad|> placeholders than images")
    return expanded


def collate(sequences: Sequence[Sequence[int]], pad_id: int, image_pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads token sequences into a batch with attention and modality masks."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    mm_token_type_ids = (input_ids == image_pad_id).to(torch.int)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}


def build_model_inputs(
    tokenizer: PreTrainedTokenizerFast,
    image_processor: Qwen2VLImageProcessorPil,
    texts: Sequence[str],
    images: Sequence[Image.Image | None],
) -> dict[str, torch.Tensor]:
    """A padded batch: ``texts[i]`` holds one ``tokens.VISION_BLOCK`` iff ``images[i]`` is set."""
    if len(texts) != len(images):
        raise ValueError(f"got {len(texts)} texts but {len(images)} images")
    image_pad_id = tokens.token_id(tokenizer, tokens.IMAGE_PAD)
    present = [im for im in images if im is not None]
    batch: dict[str, torch.Tensor] = {}
    counts: list[int] = []
    if present:
        batch["pixel_values"], batch["image_grid_thw"], counts = image_inputs(image_processor, present)
    count_iter = iter(counts)
    sequences = []
    for text, image in zip(texts, images, strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        sequences.append(expand_image_pads(ids, image_pad_id, [next(count_iter)] if image is not None else []))
    return collate(sequences, tokenizer.pad_token_id, image_pad_id) | batch
