"""The backbone families muco-flow trains, one row each, chosen by a checkpoint's ``model_type``.

Every code path that builds or loads a model asks this table (``family_of``)
which transformers classes to use; nothing else names a family's classes. A
family is never a setting: it is what the checkpoint's ``config.json`` says,
so the two cannot disagree. Patch, merge and temporal sizes are the
checkpoint's (its ``config.json`` and ``preprocessor_config.json``); the table
only holds what a checkpoint does not say.

The transformers files followed, per family (transformers 5.23):
``models/<model_type>/configuration_*.py``, ``modeling_*.py`` and
``processing_*.py``; every family's image processor is
``models/qwen2_vl/image_processing_pil_qwen2_vl.py`` (``auto/image_processing_auto.py``
maps all four to ``Qwen2VLImageProcessor``/``Qwen2VLImageProcessorPil``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from muco_flow.modeling import tokens

# What each family's chat template writes for a conversation without a
# system message: Qwen2-VL and Qwen2.5-VL add a default system prompt,
# Qwen3-VL and Qwen3.5 add none (their tokenizer_config.json / chat_template.jinja).
_QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_HALF_NORMALISATION = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


@dataclass(frozen=True)
class Family:
    """One backbone family: the transformers classes that run it, and what its checkpoints leave unsaid.

    ``vision_output_key`` names the vision config's field that must equal the
    language model's width (Qwen2-VL calls it ``hidden_size``, later families
    ``out_hidden_size``). ``rope_theta`` is the released models' base, used
    by the tiny preset only.
    """

    model_type: str
    title: str
    model_class: type[PreTrainedModel]
    config_class: Callable[..., PreTrainedConfig]  # the family's config class
    base_model_class_name: str  # the model without its LM head, found by class name inside PEFT wrapping
    processor_class_name: str  # transformers' processor, which muco-flow's inputs must equal
    vision_output_key: str
    rope_theta: float
    chat_template: str
    # the image processor's mean and std where the family's differ from the
    # processor's defaults (CLIP's): Qwen3-VL's and Qwen3.5's preprocessor_config.json use 0.5
    image_normalisation: dict[str, list[float]] = field(default_factory=dict)
    vision_tokens: tuple[str, str, str] = (tokens.VISION_START, tokens.IMAGE_PAD, tokens.VISION_END)


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family(
            model_type="qwen2_vl",
            title="Qwen2-VL",
            model_class=Qwen2VLForConditionalGeneration,
            config_class=Qwen2VLConfig,
            base_model_class_name="Qwen2VLModel",
            processor_class_name="Qwen2VLProcessor",
            vision_output_key="hidden_size",
            rope_theta=10000.0,
            chat_template=_QWEN2_CHAT_TEMPLATE,
        ),
        Family(
            model_type="qwen2_5_vl",
            title="Qwen2.5-VL",
            model_class=Qwen2_5_VLForConditionalGeneration,
            config_class=Qwen2_5_VLConfig,
            base_model_class_name="Qwen2_5_VLModel",
            processor_class_name="Qwen2_5_VLProcessor",
            vision_output_key="out_hidden_size",
            rope_theta=1000000.0,
            chat_template=_QWEN2_CHAT_TEMPLATE,
        ),
        Family(
            model_type="qwen3_vl",
            title="Qwen3-VL",
            model_class=Qwen3VLForConditionalGeneration,
            config_class=Qwen3VLConfig,
            base_model_class_name="Qwen3VLModel",
            processor_class_name="Qwen3VLProcessor",
            vision_output_key="out_hidden_size",
            rope_theta=5000000.0,
            chat_template=_QWEN3_CHAT_TEMPLATE,
            image_normalisation=_HALF_NORMALISATION,
        ),
        Family(
            model_type="qwen3_5",
            title="Qwen3.5",
            model_class=Qwen3_5ForConditionalGeneration,
            config_class=Qwen3_5Config,
            base_model_class_name="Qwen3_5Model",
            # transformers' processing_auto.py maps qwen3_5 to Qwen3-VL's processor
            processor_class_name="Qwen3VLProcessor",
            vision_output_key="out_hidden_size",
            rope_theta=10000000.0,
            chat_template=_QWEN3_CHAT_TEMPLATE,
            image_normalisation=_HALF_NORMALISATION,
        ),
    )
}
DEFAULT_FAMILY = "qwen2_vl"


def family_named(model_type: str) -> Family:
    """The family whose ``model_type`` this is; any other is an error naming the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"model_type '{model_type}' is not a supported backbone family; supported: {', '.join(FAMILIES)}"
        ) from None


def family_of(config: PreTrainedConfig | dict[str, Any] | str | Path) -> Family:
    """The family of a model config, a config.json's contents, or a local checkpoint directory."""
    model_type: Any
    if isinstance(config, PreTrainedConfig):
        model_type = config.model_type
    elif isinstance(config, dict):
        model_type = config.get("model_type")
    else:
        config_file = Path(config) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config} has no config.json, so its backbone family is unknown")
        model_type = json.loads(config_file.read_text()).get("model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"config has no model_type; supported: {', '.join(FAMILIES)}")
    return family_named(model_type)


def _rotary_half(text: dict[str, Any]) -> int:
    """Rotary frequencies per head: what M-RoPE's (temporal, height, width) sections split."""
    head_dim = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
    return int(head_dim * text.get("partial_rotary_factor", 1.0)) // 2


def tiny_config(family: Family, preset: dict[str, Any], token_ids: dict[str, int], vocab_size: int) -> PreTrainedConfig:
    """A small configuration of ``family`` from one family block of ``backbone.tiny_preset``.

    The block's ``text`` and ``vision`` keys are the family's own config fields
    (passed through, so each family's knobs are spelled as transformers spells
    them); ``text.mrope_section`` and ``text.partial_rotary_factor`` go into the
    rotary parameters. Sizes the block leaves out (patch, merge, temporal
    patch) are the family's defaults in transformers, those of its released models.
    """
    text = dict(preset["text"])
    mrope_section = list(text.pop("mrope_section"))
    rotary_half = _rotary_half(text)
    if sum(mrope_section) != rotary_half:
        raise ValueError(
            f"tiny preset ({family.model_type}): text.mrope_section {mrope_section} must sum to "
            f"the rotary half of a head, {rotary_half}"
        )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": family.rope_theta, "mrope_section": mrope_section}
    if "partial_rotary_factor" in text:
        rope["partial_rotary_factor"] = text.pop("partial_rotary_factor")
    if "mrope_interleaved" in text:
        rope["mrope_interleaved"] = text.pop("mrope_interleaved")
    text_config = {
        "max_position_embeddings": 4096,
        **text,
        "vocab_size": vocab_size,
        "rope_parameters": rope,
        "bos_token_id": token_ids[tokens.PAD_TOKEN],
        "eos_token_id": token_ids[tokens.IM_END],
        "pad_token_id": token_ids[tokens.PAD_TOKEN],
    }
    vision_config = {**preset["vision"], family.vision_output_key: text["hidden_size"]}
    return family.config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_ids[tokens.IMAGE_PAD],
        video_token_id=token_ids[tokens.VIDEO_PAD],
        vision_start_token_id=token_ids[tokens.VISION_START],
        vision_end_token_id=token_ids[tokens.VISION_END],
    )


def vision_sizes(config: PreTrainedConfig) -> dict[str, int]:
    """The checkpoint's patch, merge and temporal-patch sizes, as its image processor names them."""
    vision = config.vision_config
    return {
        "patch_size": int(vision.patch_size),
        "merge_size": int(vision.spatial_merge_size),
        "temporal_patch_size": int(vision.temporal_patch_size),
    }
