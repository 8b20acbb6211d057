"""How MuCo sizes an image before Qwen2-VL's processor sees it: tiny images stretched, the short side scaled.

Plain PIL (no torch), so that ingest, formatting and the model's inputs share
one rule without the data layer importing the model's.
"""

from __future__ import annotations

from PIL import Image

# Qwen2-VL's smallest grid is 28 px (two 14 px patches). MuCo stretches an
# image with either side under it to 56 x 56, aspect ratio not kept, rather
# than dropping it: in training (naver-ai/muco src/loader.py lines 286-287,
# 299-300, 312-313) and in evaluation (src/model/processor.py lines 99-102).
MIN_IMAGE_SIDE = 28
TINY_IMAGE_SIZE = (56, 56)


def tiny_image_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) as MuCo gives them to the model: TINY_IMAGE_SIZE if a side is under MIN_IMAGE_SIDE."""
    return TINY_IMAGE_SIZE if min(width, height) < MIN_IMAGE_SIDE else (width, height)


def upscale_tiny_image(image: Image.Image) -> Image.Image:
    """``image`` stretched to TINY_IMAGE_SIZE if it is tiny (``tiny_image_size``), else ``image`` itself.

    Bicubic, Pillow's default filter for the RGB images MuCo resizes.
    """
    size = tiny_image_size(*image.size)
    return image if size == image.size else image.convert("RGB").resize(size, Image.Resampling.BICUBIC)


def short_side_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) after scaling the short side to ``short_side`` (None: unchanged).

    As MuCo's pre-training loader (naver-ai/muco src/loader.py lines 424-439):
    the long side is truncated to an integer, and a square counts as landscape.
    """
    if short_side is None:
        return width, height
    if width < height:
        return short_side, int(height * (short_side / width))
    return int(width * (short_side / height)), short_side


def resize_short_side(image: Image.Image, short_side: int | None) -> Image.Image:
    size = short_side_size(*image.size, short_side)
    return image if size == image.size else image.resize(size, resample=Image.Resampling.LANCZOS)
