"""The backbone: the tiny preset of each family, and one loader for every checkpoint.

The tiny preset is an ordinary Hugging Face model directory (random weights,
a byte-level BPE tokenizer trained on the sample's text), so the code that
loads it is the code that loads ``Qwen/Qwen2-VL-2B-Instruct`` on a cluster.
Which transformers classes run a checkpoint is its ``model_type``'s row in
``modeling.families``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from muco_flow.modeling import tokens
from muco_flow.modeling.families import DEFAULT_FAMILY, Family, family_named, family_of, tiny_config, vision_sizes

logger = logging.getLogger(__name__)


@dataclass
class Backbone:
    model: PreTrainedModel  # the family's ...ForConditionalGeneration
    tokenizer: PreTrainedTokenizerFast
    image_processor: Qwen2VLImageProcessorPil
    family: Family


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen's and MuCo's special tokens.

    Byte-level means any string encodes (no unknown token), as with Qwen's.
    ``chat_template`` (the family's; default Qwen2-VL's) is kept with it, so
    that the preset works with ``apply_chat_template`` like a released checkpoint.
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
    tokenizer.chat_template = chat_template or family_named(DEFAULT_FAMILY).chat_template
    return tokenizer


def family_preset(preset: dict[str, Any], family: str) -> dict[str, Any]:
    """``backbone.tiny_preset`` resolved for one family: the shared keys and that family's block.

    The block's keys (text, vision, image) replace the shared ones of the same name.
    """
    family_named(family)  # an unknown family is named with the supported ones
    blocks = preset["families"]
    if family not in blocks:
        raise ValueError(f"backbone.tiny_preset.families has no block for '{family}'; it has {sorted(blocks)}")
    return {k: v for k, v in preset.items() if k != "families"} | blocks[family]


def tiny_model_config(tokenizer: PreTrainedTokenizerFast, family: Family, preset: dict[str, Any]) -> PreTrainedConfig:
    """A small configuration of ``family`` (a resolved ``family_preset``) whose token ids match ``tokenizer``."""
    token_ids = {t: tokens.token_id(tokenizer, t) for t in tokens.QWEN2_VL_SPECIAL_TOKENS}
    return tiny_config(family, preset, token_ids, vocab_size=len(tokenizer))


def build_tiny_backbone(texts: Iterable[str], preset: dict[str, Any], family: str = DEFAULT_FAMILY) -> dict[str, bytes]:
    """Builds ``family``'s tiny preset and returns its model directory as ``{file name: bytes}``.

    ``preset`` is the whole ``backbone.tiny_preset`` block; the image
    processor's patch, merge and temporal sizes are the model config's.
    """
    chosen = family_named(family)
    resolved = family_preset(preset, family)
    tokenizer = train_bpe_tokenizer(texts, resolved["vocab_size"], chosen.chat_template)
    config = tiny_model_config(tokenizer, chosen, resolved)
    torch.manual_seed(resolved["seed"])
    model = chosen.model_class(config)
    processor_settings: dict[str, Any] = {**vision_sizes(config), **chosen.image_normalisation}
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=resolved["image"]["min_pixels"], max_pixels=resolved["image"]["max_pixels"], **processor_settings
    )
    logger.info("tiny %s preset: %.2fM parameters", chosen.title, sum(p.numel() for p in model.parameters()) / 1e6)
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

    The model class is the family's (``modeling.families``) that the
    checkpoint's ``model_type`` names. Any layout of a family loads: this
    preset's, the published ``Qwen/Qwen2-VL-2B-Instruct`` (flat config,
    sharded safetensors under the legacy key names ``model.layers.*``/
    ``visual.*``, which transformers maps to its modules) and a merged MuCo
    release. A weight the checkpoint lacks is an error, not a random
    initialisation; so is an image processor whose patch grid is not the model's.
    """
    source, local_only = resolve_checkpoint(name_or_path)
    if local_only and (missing := missing_weight_files(Path(source))):
        raise FileNotFoundError(f"checkpoint '{name_or_path}' lacks its weights: {', '.join(missing)}")
    family = checkpoint_family(name_or_path, trust_remote_code=trust_remote_code)
    tokenizer, image_processor = load_processors(
        name_or_path, trust_remote_code=trust_remote_code, image_limits=image_limits
    )
    # from_pretrained's annotation omits the (model, loading info) pair that output_loading_info returns
    loaded: Any = family.model_class.from_pretrained(
        source,
        dtype=dtype,
        attn_implementation=attn_implementation,
        local_files_only=local_only,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        output_loading_info=True,
    )
    model: PreTrainedModel = loaded[0]
    _check_loading(name_or_path, loaded[1], family)
    check_image_processor_fits(name_or_path, image_processor, model.config)
    return Backbone(model=model, tokenizer=tokenizer, image_processor=image_processor, family=family)


def checkpoint_family(name_or_path: str, *, trust_remote_code: bool = False) -> Family:
    """The family that the checkpoint's config.json names (``model_type``)."""
    source, local_only = resolve_checkpoint(name_or_path)
    config, _ = PreTrainedConfig.get_config_dict(
        source, local_files_only=local_only, trust_remote_code=trust_remote_code
    )
    try:
        return family_of(config)
    except ValueError as err:
        raise ValueError(f"checkpoint '{name_or_path}': {err}") from None


def check_image_processor_fits(
    name_or_path: str, image_processor: Qwen2VLImageProcessorPil, config: PreTrainedConfig
) -> None:
    """The image processor cuts the patches the vision tower embeds (preprocessor_config.json fits config.json)."""
    expected = vision_sizes(config)
    actual = {name: getattr(image_processor, name) for name in expected}
    if actual != expected:
        raise ValueError(
            f"checkpoint '{name_or_path}': preprocessor_config.json cuts patches {actual}, "
            f"but config.json's vision tower takes {expected}"
        )


def _check_loading(name_or_path: str, loading: dict[str, Any], family: Family) -> None:
    """Refuses weights that were missing or of the wrong shape; logs unused ones.

    The LM head is exempt: embeddings are hidden states, and Qwen2-VL-2B ties
    it to the input embeddings (its safetensors hold no ``lm_head.weight``).
    """
    missing = sorted(k for k in loading["missing_keys"] if not k.startswith("lm_head."))
    mismatched = sorted(str(k) for k in loading["mismatched_keys"])
    if missing or mismatched:
        raise ValueError(
            f"checkpoint '{name_or_path}' does not fit {family.model_class.__name__}: "
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
    """Files a local Hugging Face model directory of any family needs and lacks (empty: complete)."""
    weights = missing_weight_files(directory)
    return [name for name in PROCESSOR_FILES if not (directory / name).is_file()] + weights


def add_muco_tokens(tokenizer: PreTrainedTokenizerFast) -> int:
    """Adds <|emb|> and <|mask|> where missing (a stock Qwen tokenizer); returns how many.

    A MuCo release already has both (after <|video_pad|>); they stay where they are.
    """
    missing = [t for t in tokens.MUCO_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return len(missing)


@dataclass(frozen=True)
class PixelLimits:
    """The `backbone.image` parameters: pixels per image after resizing; None keeps the checkpoint's.

    The image processor resizes each image to between ``min_pixels`` and
    ``max_pixels`` (sides multiples of patch x merge: 28 for Qwen2-VL and
    Qwen2.5-VL, 32 for Qwen3-VL and Qwen3.5); one visual token is 28 x 28
    pixels in Qwen2-VL, so MuCo's 256 to 1280 visual tokens are 200704 to
    1003520 pixels (262144 to 1310720 at 32 x 32).
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
