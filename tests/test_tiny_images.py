"""Tiny images follow MuCo: either side under 28 px -> stretched to 56 x 56; 28 px and more -> unchanged.

naver-ai/muco src/loader.py lines 286-287 (training) and src/model/processor.py
lines 99-102 (evaluation): ``if image.size[0] < 28 or image.size[1] < 28:
image = image.resize((56, 56))``.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from muco_flow.data.images import check_image
from muco_flow.modeling.image_sizing import upscale_tiny_image
from muco_flow.modeling.inputs import image_inputs

# MuCo's official limits (src/arguments.py lines 65-67): 256 to 1280 merged 28 x 28 tiles
OFFICIAL = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 256, max_pixels=28 * 28 * 1280)


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(20, 12), (27, 400), (400, 27), (1, 1)])
def test_ingest_stretches_an_image_with_a_side_under_28_px_to_56_x_56(size):
    checked = check_image(png(*size), 40_000_000)
    assert (checked.width, checked.height, checked.upscaled) == (56, 56, True)
    assert Image.open(io.BytesIO(checked.data)).size == (56, 56)


@pytest.mark.parametrize("size", [(28, 28), (28, 40), (47, 28), (300, 200)])
def test_images_of_28_px_and_more_are_kept_as_they_are(size):
    data = png(*size)
    checked = check_image(data, 40_000_000)
    assert (checked.width, checked.height, checked.upscaled, checked.data) == (*size, False, data)
    image = Image.open(io.BytesIO(data))
    assert upscale_tiny_image(image) is image


def test_a_20_x_12_image_takes_256_visual_tokens_at_muco_s_limits():
    # 56 x 56 = 3136 pixels, under min_pixels 200704: both sides scale by sqrt(200704 / 3136) = 8 to 448,
    # a 32 x 32 grid of 14 px patches, 2 x 2 merged: 256 tokens. Scaled with its aspect kept to 47 x 28
    # instead, it would be 588 x 364, 42 x 26 patches: 273 tokens.
    _, grid, tokens = image_inputs(OFFICIAL, [Image.new("RGB", (20, 12))])
    assert grid.tolist() == [[1, 32, 32]] and tokens == [256]
    _, grid, tokens = image_inputs(OFFICIAL, [Image.new("RGB", (47, 28))])
    assert grid.tolist() == [[1, 26, 42]] and tokens == [273]
