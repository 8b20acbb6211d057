"""MuCoEmbedder: a vision-language backbone of any family that returns one embedding per ``<|emb|>`` token.

The final-layer hidden state at each ``<|emb|>`` position, L2-normalised, is
that turn's embedding; a conversation with K turns gives K embeddings from
one forward pass.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from muco_flow.modeling import tokens
from muco_flow.modeling.backbone import Backbone, PixelLimits, add_muco_tokens
from muco_flow.modeling.inputs import build_model_inputs
from muco_flow.modeling.prompt import check_single_turn_template, single_turn_text

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)

EMBEDDER_FILE = "muco_embedder.json"

# The language model's linear layers; the vision tower's are named differently.
LANGUAGE_LINEAR_LAYERS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


# How PEFT initialises the adapters (B is zero in both, so training starts
# from the backbone): "kaiming", PEFT's default (A Kaiming-uniform), or
# "gaussian" (A normal with std 1/r), MuCo's (naver-ai/muco src/model/model.py:151)
LORA_INITS: dict[str, bool | Literal["gaussian"]] = {"kaiming": True, "gaussian": "gaussian"}


@dataclass(frozen=True)
class LoraSettings:
    """The `training.embedder.lora` parameters; MuCo's reference values are the defaults, but for `init`."""

    enabled: bool = True
    r: int = 16
    alpha: int = 64
    dropout: float = 0.1
    use_dora: bool = True
    target_modules: str = LANGUAGE_LINEAR_LAYERS
    init: str = "kaiming"

    def __post_init__(self) -> None:
        if self.init not in LORA_INITS:
            raise ValueError(f"training.embedder.lora.init must be one of {tuple(LORA_INITS)}, got {self.init!r}")


@dataclass(frozen=True)
class EmbedderSettings:
    bidirectional: bool = False
    gradient_checkpointing: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EmbedderSettings:
        return cls(
            bidirectional=params.get("bidirectional", False),
            gradient_checkpointing=params.get("gradient_checkpointing", False),
            lora=LoraSettings(**params.get("lora", {})),
        )


class MuCoEmbedder(nn.Module):
    def __init__(self, backbone: Backbone, settings: EmbedderSettings | None = None) -> None:
        super().__init__()
        settings = settings or EmbedderSettings()
        self.settings = settings
        self.tokenizer, self.image_processor = backbone.tokenizer, backbone.image_processor
        self.family = backbone.family
        model: PreTrainedModel | PeftModel = backbone.model
        add_muco_tokens(self.tokenizer)
        # As MuCo does: resize only past the end of the matrix. Qwen2-VL's is
        # padded (151936 rows for 151657 tokens), so the added tokens take
        # rows it already has; a MuCo release keeps its trained rows.
        embeddings = backbone.model.get_input_embeddings()
        if not isinstance(embeddings, nn.Embedding):
            raise TypeError(f"{type(backbone.model).__name__}'s input embeddings are not an nn.Embedding")
        rows = embeddings.num_embeddings
        if len(self.tokenizer) > rows:
            logger.info("embedding matrix resized from %d to %d rows for MuCo's tokens", rows, len(self.tokenizer))
            backbone.model.resize_token_embeddings(len(self.tokenizer))
        self.emb_token_id = tokens.token_id(self.tokenizer, tokens.EMB_TOKEN)
        self.special_token_ids = [tokens.token_id(self.tokenizer, t) for t in tokens.MUCO_TOKENS]

        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if settings.lora.enabled:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=settings.lora.r,
                    lora_alpha=settings.lora.alpha,
                    lora_dropout=settings.lora.dropout,
                    use_dora=settings.lora.use_dora,
                    target_modules=settings.lora.target_modules,
                    init_lora_weights=LORA_INITS[settings.lora.init],
                    # Only the rows of the added tokens train, not the whole vocabulary.
                    trainable_token_indices={"embed_tokens": self.special_token_ids},
                ),
            )
        else:
            language = _vlm(model, self.family.base_model_class_name).language_model
            for parameter in language.parameters():
                parameter.requires_grad_(True)
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        self.model = model
        # The family's base model (Qwen2VLModel, Qwen3VLModel, ...) inside any PEFT wrapping (no LM head), held
        # outside the module tree: every parameter is registered once, under model.*, as DeepSpeed's export requires.
        self._vlm = (_vlm(model, self.family.base_model_class_name),)
        if settings.bidirectional:
            # flash-attention decides causality from this flag alone; SDPA and
            # eager read it too, with the mask built in _bidirectional_inputs
            for module in self.vlm.language_model.modules():
                if hasattr(module, "is_causal"):
                    module.is_causal = False

    @property
    def vlm(self) -> Any:  # the family's ...Model: Qwen2VLModel, Qwen2_5_VLModel, Qwen3VLModel, Qwen3_5Model
        return self._vlm[0]

    @property
    def hidden_size(self) -> int:
        return self.vlm.config.get_text_config().hidden_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mm_token_type_ids: torch.Tensor,
        emb_index: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L2-normalised hidden states at ``emb_index`` ([n, 2]: batch row, position), in that order."""
        inputs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids,
            "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw,
        }
        if self.settings.bidirectional:
            inputs = self._bidirectional_inputs(inputs)
        hidden = self.vlm(**inputs).last_hidden_state
        return F.normalize(hidden[emb_index[:, 0], emb_index[:, 1]].float(), dim=-1)

    def _bidirectional_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Inputs that let every text token attend to every other (padding excluded).

        The model would build a causal mask; a prepared 4D mask, which every
        family's text model takes as it is, replaces it in its attention
        layers. Qwen3.5's linear-attention (Gated DeltaNet) layers are
        recurrent, causal by construction: there, only the attention layers
        (every fourth) see both directions; padding is on the right, after
        every ``<|emb|>``, so their recurrence never reads it before one.
        Positions are computed here because the model computes them from the
        2D mask, which this replaces.
        """
        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        shape_only = torch.empty(*input_ids.shape, 1, dtype=self.vlm.dtype, device=input_ids.device)
        text_config = self.vlm.config.get_text_config()
        full = create_bidirectional_mask(
            config=text_config, inputs_embeds=shape_only, attention_mask=mask, allow_is_bidirectional_skip=False
        )
        return {**inputs, "attention_mask": full, "position_ids": self.mrope_positions(inputs)}

    def mrope_positions(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The family's (multimodal RoPE) position ids of ``inputs`` (input_ids, 2-D attention_mask, image
        grid, mm_token_type_ids): what the model computes itself unless it is handed a prepared 4-D mask."""
        input_ids = inputs["input_ids"]
        shape_only = torch.empty(*input_ids.shape, 1, dtype=self.vlm.dtype, device=input_ids.device)
        return self.vlm.compute_3d_position_ids(
            input_ids=input_ids,
            inputs_embeds=shape_only,
            image_grid_thw=inputs["image_grid_thw"],
            video_grid_thw=None,  # Qwen2.5-VL's signature has no defaults for these two
            past_key_values=None,
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )

    @torch.inference_mode()
    def encode(
        self,
        items: Sequence[tuple[str, Image.Image | None]],
        *,
        template: str,
        batch_size: int = 32,
        progress: bool = True,
    ) -> torch.Tensor:
        """One normalised vector per (text, optional image), each its own one-turn conversation.

        ``template`` is that conversation with one ``{text}`` slot and one
        ``<|emb|>``; the text is put in as MuCo's evaluation does
        (modeling.prompt.single_turn_text).
        """
        check_single_turn_template(template)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        vectors = []
        try:
            for start in tqdm(range(0, len(items), batch_size), desc="encode", unit="batch", disable=not progress):
                chunk = items[start : start + batch_size]
                texts = [single_turn_text(t, img is not None, template) for t, img in chunk]
                batch = build_model_inputs(self.tokenizer, self.image_processor, texts, [img for _, img in chunk])
                batch = {k: v.to(device) for k, v in batch.items()}
                emb_index = (batch["input_ids"] == self.emb_token_id).nonzero()
                if emb_index.shape[0] != len(chunk):
                    raise ValueError(f"the encode template must hold exactly one {tokens.EMB_TOKEN}")
                vectors.append(self(**batch, emb_index=emb_index).cpu())
        finally:
            self.train(was_training)
        return torch.cat(vectors) if vectors else torch.empty(0, self.hidden_size)

    def save_merged(self, directory: str | Path, encode_template: str) -> None:
        """A plain Hugging Face model directory: LoRA merged in, tokenizer and image processor beside it.

        ``muco_embedder.json`` records how to encode with it (attention direction, template).
        """
        model = self.model
        if not isinstance(model, PreTrainedModel):  # PEFT-wrapped: a merged copy, the adapters kept for training
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        metadata = {"bidirectional": self.settings.bidirectional, "encode_template": encode_template}
        (Path(directory) / EMBEDDER_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def build_training_embedder(
    checkpoint: str, backbone: dict[str, Any], embedder: dict[str, Any], *, seed: int
) -> MuCoEmbedder:
    """The embedder training starts from, from the `backbone` and `training.embedder` parameters.

    The adapters are initialised from ``seed``, so every process that passes
    the same seed starts from the same weights.
    """
    from muco_flow.modeling.backbone import BackboneConfig, load_backbone, resolve_attn_implementation

    settings = BackboneConfig.from_params(backbone)
    loaded = load_backbone(
        checkpoint,
        dtype=settings.dtype,
        attn_implementation=resolve_attn_implementation(settings.attn_implementation),
        trust_remote_code=settings.trust_remote_code,
        image_limits=settings.image,
    )
    torch.manual_seed(seed)
    return MuCoEmbedder(loaded, EmbedderSettings.from_params(embedder))


def _vlm(model: nn.Module, class_name: str) -> Any:
    """The family's base model (``class_name``) under its ...ForConditionalGeneration, PEFT-wrapped or not."""
    for module in model.modules():
        if type(module).__name__ == class_name:  # by name: a trust_remote_code copy of the class is one too
            return module
    raise TypeError(f"{type(model).__name__} holds no {class_name}")


def load_embedder(
    directory: str,
    *,
    default_template: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    image_limits: PixelLimits | None = None,
) -> tuple[MuCoEmbedder, str]:
    """An embedder for inference from a model directory, and its encode template.

    A directory written by training says how it encodes (muco_embedder.json).
    Any other (the untrained baseline, a stock checkpoint, a released MuCo such
    as naver-ai/MuCo-2B) uses ``default_template`` with causal attention,
    pooling the last hidden state at ``<|emb|>``: how MuCo's eval_mmeb.py
    encodes with its released models (no ``--use_bidirectional``; pooling at
    the ``<|emb|>`` id). ``image_limits`` overrides the directory's pixel range.
    """
    from muco_flow.modeling.backbone import load_backbone

    metadata_file = Path(directory) / EMBEDDER_FILE
    metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    settings = EmbedderSettings(bidirectional=metadata.get("bidirectional", False), lora=LoraSettings(enabled=False))
    backbone = load_backbone(directory, dtype=dtype, attn_implementation=attn_implementation, image_limits=image_limits)
    embedder = MuCoEmbedder(backbone, settings).eval()
    return embedder, metadata.get("encode_template", default_template)
