"""The Qwen2-VL backbone: the tiny preset, and one loader for every checkpoint.

The tiny preset is an ordinary Hugging Face model directory (random weights,
a byte-level BPE tokenizer trained on the sample's text), so the code that
loads it is the code that loads ``Qwen/Qwen2-VL-2B-Instruct`` on a cluster.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from muco_flow.modeling import tokens

logger = logging.getLogger(__name__)

# ChatML, as Qwen2-VL writes it; kept with the tokenizer so that the preset is
# usable with `apply_chat_template` like any Qwen2-VL checkpoint.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Backbone:
    model: Qwen2VLForConditionalGeneration
    tokenizer: PreTrainedTokenizerFast
    image_processor: Qwen2VLImageProcessorPil


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen2-VL's and MuCo's special tokens.

    Byte-level means any string encodes (no unknown token), as with Qwen's.
    """
    special = [*tokens.QWEN2_VL_SPECIAL_TOKENS, *tokens.MUCO_TOKENS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=tokens.IM_END,
        pad_token=tokens.PAD_TOKEN,
        additional_special_tokens=special,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_qwen2_vl_config(tokenizer: PreTrainedTokenizerFast, preset: dict[str, Any]) -> Qwen2VLConfig:
    """A small Qwen2-VL configuration whose token ids match ``tokenizer``."""
    text, vision = preset["text"], preset["vision"]
    ids = functools.partial(tokens.token_id, tokenizer)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # M-RoPE splits each head's rotary half into (temporal, height, width).
    if sum(text["mrope_section"]) != head_dim // 2:
        raise ValueError(
            f"tiny preset: text.mrope_section {text['mrope_section']} must sum to head_dim/2 = {head_dim // 2}"
        )
    return Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": text["hidden_size"],
            "intermediate_size": text["intermediate_size"],
            "num_hidden_layers": text["num_hidden_layers"],
            "num_attention_heads": text["num_attention_heads"],
            "num_key_value_heads": text["num_key_value_heads"],
            "max_position_embeddings": text.get("max_position_embeddings", 4096),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": text["mrope_section"]},
            "bos_token_id": ids(tokens.PAD_TOKEN),
            "eos_token_id": ids(tokens.IM_END),
            "pad_token_id": ids(tokens.PAD_TOKEN),
        },
        vision_config={
            "depth": vision["depth"],
            "embed_dim": vision["embed_dim"],
            "hidden_size": text["hidden_size"],
            "num_heads": vision["num_heads"],
            "mlp_ratio": vision["mlp_ratio"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids(tokens.IMAGE_PAD),
        video_token_id=ids(tokens.VIDEO_PAD),
        vision_start_token_id=ids(tokens.VISION_START),
        vision_end_token_id=ids(tokens.VISION_END),
    )


def build_tiny_backbone(texts: Iterable[str], preset: dict[str, Any]) -> dict[str, bytes]:
    """Builds the tiny preset and returns its model directory as ``{file name: bytes}``."""
    tokenizer = train_bpe_tokenizer(texts, preset["vocab_size"])
    config = tiny_qwen2_vl_config(tokenizer, preset)
    torch.manual_seed(preset["seed"])
    model = Qwen2VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=preset["image"]["min_pixels"], max_pixels=preset["image"]["max_pixels"]
    )
    logger.info("tiny Qwen2-VL preset: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_backbone(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    image_limits: PixelLimits | None = None,
) -> Backbone:
    """Loads model, tokenizer and image processor from a directory or a hub id.

    A local directory is read with ``local_files_only``; only a name of the
    form ``org/model`` that is not a local path may reach the hub. Weights
    load from safetensors only: a checkpoint that has only pickled weights
    (``pytorch_model.bin``) is refused rather than unpickled.

    Any Qwen2-VL layout loads: this preset's, the published
    ``Qwen/Qwen2-VL-2B-Instruct`` (flat config, sharded safetensors under the
    legacy key names ``model.layers.*``/``visual.*``, which transformers maps
    to its modules) and a merged MuCo release. A weight the checkpoint lacks
    is an error, not a random initialisation.
    """
    source, local_only = resolve_checkpoint(name_or_path)
    if local_only and (missing := missing_weight_files(Path(source))):
        raise FileNotFoundError(f"checkpoint '{name_or_path}' lacks its weights: {', '.join(missing)}")
    tokenizer, image_processor = load_processors(
        name_or_path, trust_remote_code=trust_remote_code, image_limits=image_limits
    )
    # from_pretrained's annotation omits the (model, loading info) pair that output_loading_info returns
    loaded: Any = Qwen2VLForConditionalGeneration.from_pretrained(
        source,
        dtype=dtype,
        attn_implementation=attn_implementation,
        local_files_only=local_only,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        output_loading_info=True,
    )
    model: Qwen2VLForConditionalGeneration = loaded[0]
    _check_loading(name_or_path, loaded[1])
    return Backbone(model=model, tokenizer=tokenizer, image_processor=image_processor)


def _check_loading(name_or_path: str, loading: dict[str, Any]) -> None:
    """Refuses weights that were missing or of the wrong shape; logs unused ones.

    The LM head is exempt: embeddings are hidden states, and Qwen2-VL-2B ties
    it to the input embeddings (its safetensors hold no ``lm_head.weight``).
    """
    missing = sorted(k for k in loading["missing_keys"] if not k.startswith("lm_head."))
    mismatched = sorted(str(k) for k in loading["mismatched_keys"])
    if missing or mismatched:
        raise ValueError(
            f"checkpoint '{name_or_path}' does not fit Qwen2VLForConditionalGeneration: "
            f"{len(missing)} weights missing (first: {missing[:5]}), "
            f"{len(mismatched)} of another shape (first: {mismatched[:5]})"
        )
    if loading["unexpected_keys"]:
        unexpected = sorted(loading["unexpected_keys"])
        logger.warning("checkpoint '%s': %d weights unused (first: %s)", name_or_path, len(unexpected), unexpected[:5])


def resolve_checkpoint(name_or_path: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it must stay local)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path), True
    if _is_hub_id(name_or_path):
        return name_or_path, False
    raise FileNotFoundError(
        f"backbone '{name_or_path}' is neither a local model directory nor a hub id (org/name); "
        "run `kedro run --pipelines=backbone` to build the tiny preset"
    )


PROCESSOR_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
SHARD_INDEX = "model.safetensors.index.json"


def missing_weight_files(directory: Path) -> list[str]:
    """Weight files a local model directory lacks: ``model.safetensors``, or the index and every shard it names.

    A download cut short (one shard of two) is caught here, with the file's name.
    """
    if (directory / "adapter_config.json").is_file() and not (directory / "config.json").is_file():
        raise ValueError(
            f"{directory} is a PEFT adapter, not a model: merge it into its base model first "
            "(naver-ai/muco's src/merge.py writes such a merged directory)"
        )
    if (directory / "model.safetensors").is_file():
        return []
    index = directory / SHARD_INDEX
    if not index.is_file():
        return [f"model.safetensors (or {SHARD_INDEX} and its shards)"]
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{index} is not a safetensors index (a JSON object with weight_map): {err}") from None
    return [name for name in shards if not (directory / name).is_file()]


def missing_checkpoint_files(directory: Path) -> list[str]:
    """Files a local Hugging Face Qwen2-VL directory needs and lacks (empty: complete)."""
    weights = missing_weight_files(directory)
    return [name for name in PROCESSOR_FILES if not (directory / name).is_file()] + weights


def add_muco_tokens(tokenizer: PreTrainedTokenizerFast) -> int:
    """Adds <|emb|> and <|mask|> where missing (a stock Qwen2-VL tokenizer); returns how many.

    A MuCo release already has both (after <|video_pad|>); they stay where they are.
    """
    missing = [t for t in tokens.MUCO_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return len(missing)


@dataclass(frozen=True)
class PixelLimits:
    """The `backbone.image` parameters: pixels per image after resizing; None keeps the checkpoint's.

    Qwen2-VL resizes each image to between ``min_pixels`` and ``max_pixels``
    (sides multiples of 28); one visual token is 28 x 28 pixels, so MuCo's
    256 to 1280 visual tokens are 200704 to 1003520 pixels.
    """

    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 28 * 28):
                raise ValueError(f"backbone.image.{name} must be an integer of at least 784 (28 x 28), got {value!r}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(
                f"backbone.image.min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})"
            )

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> PixelLimits:
        params = params or {}
        unknown = set(params) - {"min_pixels", "max_pixels"}
        if unknown:
            raise ValueError(f"backbone.image has unknown keys {sorted(unknown)}; known: min_pixels, max_pixels")
        return cls(**params)

    def apply(self, image_processor: Qwen2VLImageProcessorPil) -> None:
        size = image_processor.size
        shortest = self.min_pixels if self.min_pixels is not None else size["shortest_edge"]
        longest = self.max_pixels if self.max_pixels is not None else size["longest_edge"]
        if shortest > longest:
            raise ValueError(
                f"backbone.image: min_pixels {shortest} would exceed max_pixels {longest} (the checkpoint's)"
            )
        # transformers annotates ``size`` by its class default (a dict); instances hold a SizeDict
        image_processor.size = SizeDict(shortest_edge=shortest, longest_edge=longest)  # type: ignore[assignment]


def load_processors(
    name_or_path: str, *, trust_remote_code: bool = False, image_limits: PixelLimits | None = None
) -> tuple[PreTrainedTokenizerFast, Qwen2VLImageProcessorPil]:
    """Tokenizer (with MuCo's tokens) and image processor, without the model weights.

    ``image_limits`` overrides the checkpoint's pixel range where set.
    """
    source, local_only = resolve_checkpoint(name_or_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(
        source, local_files_only=local_only, trust_remote_code=trust_remote_code
    )
    if added := add_muco_tokens(tokenizer):
        logger.info(
            "checkpoint '%s' has no MuCo tokens: added %d (%s), whose embedding rows are untrained",
            name_or_path,
            added,
            ", ".join(f"{t} = {tokenizer.convert_tokens_to_ids(t)}" for t in tokens.MUCO_TOKENS),
        )
    # The PIL backend, whatever class the checkpoint names: the torchvision
    # backend cannot run on every machine, and both give the same pixels.
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(
        source, local_files_only=local_only, trust_remote_code=trust_remote_code
    )
    if image_limits is not None:
        image_limits.apply(image_processor)
    return tokenizer, image_processor


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class BackboneConfig:
    """The `backbone` parameters (conf/*/parameters_backbone.yml), checked on creation.

    Which checkpoint is the catalog's `backbone_checkpoint`, not a parameter.
    """

    precision: str = "fp32"
    attn_implementation: str = "auto"
    trust_remote_code: bool = False
    image: PixelLimits = field(default_factory=PixelLimits)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"backbone.precision must be one of {PRECISIONS}, got '{self.precision}'")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"backbone.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got '{self.attn_implementation}'"
            )

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> BackboneConfig:
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "image": PixelLimits.from_params(params.get("image"))})

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def resolve_attn_implementation(requested: str) -> str:
    """flash_attention_2 when asked for (or 'auto') and usable here, else sdpa."""
    import importlib.util

    flash_usable = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if flash_usable else "sdpa"
    if requested == "flash_attention_2" and not flash_usable:
        raise RuntimeError(
            "backbone.attn_implementation is flash_attention_2, but it needs CUDA and the flash-attn package "
            "(pip install -e '.[gpu]'); use 'auto' to fall back to sdpa"
        )
    return requested
