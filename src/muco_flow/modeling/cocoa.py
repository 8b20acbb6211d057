"""CoCoA's stage 0 on a MuCo embedder (docs/cocoa.md): one module whose forward is a reconstruction step's loss.

Two phases, chosen per step by the training loop:

- ``warmup``: bidirectional attention over the whole conversation; some text
  tokens and some image tokens are hidden (their input embedding replaced by
  ``<|mask|>``'s); hidden text is predicted by masked next-token prediction
  through the language-model head, hidden image tokens' pixels are regressed
  by ``image_head`` (masked auto-encoding).
- ``bridged``: each row becomes its input (up to and including its last
  ``<|emb|>``, the bridge), then a reconstruction segment holding the input's
  text tokens again; under ``truncated_mask`` the reconstruction sees the
  input only through the bridge, and is predicted token by token (the first
  from the bridge's own output).

``image_head`` (hidden -> one image token's patch pixels) exists only here:
``save_merged`` writes the embedder alone, so the saved model is a plain
MuCo backbone that `train` can start from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from muco_flow.modeling import tokens
from muco_flow.modeling.attention_masks import attn_implementation_for, pattern_mask, per_layer_type, truncated_mask
from muco_flow.modeling.embedder import MuCoEmbedder
from muco_flow.modeling.inputs import collate
from muco_flow.modeling.reconstruction_loss import (
    choose_masked_positions,
    masked_next_token_loss,
    masked_patch_loss,
    patch_targets,
)

WARMUP, BRIDGED = "warmup", "bridged"
PHASES = (WARMUP, BRIDGED)
# the loss terms each phase returns (the training loop logs them as cocoa/<name>)
TERMS = {WARMUP: ("text_loss", "image_loss"), BRIDGED: ("bridged_loss",)}
# Qwen2-VL's pixel rows hold 3 colour channels (x temporal patch x patch x patch values)
CHANNELS = 3


def special_token_ids(tokenizer: Any) -> list[int]:
    """The ids that are structure, never content to reconstruct: Qwen2-VL's special tokens and MuCo's two."""
    return [tokens.token_id(tokenizer, t) for t in (*tokens.QWEN2_VL_SPECIAL_TOKENS, *tokens.MUCO_TOKENS)]


def text_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """[B, T] True at the content text tokens: not padding, not a special (role, vision, MuCo) token."""
    special = torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))
    return attention_mask.bool() & ~special


def warmup_masks(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    image_pad_id: int,
    special_ids: list[int],
    text_ratio: float,
    image_ratio: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The warm-up's hidden positions, [B, T] each: (text tokens, image tokens), drawn from ``generator``.

    Text: ``text_ratio`` of each row's content text tokens, never position 0
    (no earlier position predicts it). Images: ``image_ratio`` of each row's
    image tokens; a row without an image hides none.
    """
    text = text_positions(input_ids, attention_mask, special_ids)
    text[:, 0] = False
    image = (input_ids == image_pad_id) & attention_mask.bool()
    return (
        choose_masked_positions(text, text_ratio, generator),
        choose_masked_positions(image, image_ratio, generator),
    )


def bridged_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    emb_id: int,
    pad_id: int,
    image_pad_id: int,
    special_ids: list[int],
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The EOS-bridged rows: (model inputs, bridge position per row [B], positions to predict [B, T']).

    Row b is its tokens up to its last ``<|emb|>`` (the bridge, inclusive),
    then its content text tokens from that span again, in order; padding
    goes on the right. Every image token must lie before the bridge (its
    pixels are the batch's, unchanged).
    """
    text = text_positions(input_ids, attention_mask, special_ids)
    sequences, bridges, lengths = [], [], []
    for row in range(input_ids.shape[0]):
        embs = (input_ids[row] == emb_id).nonzero().flatten()
        if not len(embs):
            raise ValueError(f"row {row} holds no {tokens.EMB_TOKEN} to bridge through")
        bridge = int(embs[-1])
        after = (input_ids[row, bridge + 1 :] == image_pad_id) & attention_mask[row, bridge + 1 :].bool()
        if after.any():
            raise ValueError(f"row {row} has image tokens after its last {tokens.EMB_TOKEN}")
        kept = input_ids[row, : bridge + 1]
        reconstruction = kept[text[row, : bridge + 1]]
        sequences.append(kept.tolist() + reconstruction.tolist())
        bridges.append(bridge)
        lengths.append(len(reconstruction))
    inputs = collate(sequences, pad_id, image_pad_id)
    positions = torch.arange(inputs["input_ids"].shape[1])
    bridge_positions = torch.tensor(bridges)
    predict = (positions[None] > bridge_positions[:, None]) & (
        positions[None] <= (bridge_positions + torch.tensor(lengths))[:, None]
    )
    device = input_ids.device
    return {k: v.to(device) for k, v in inputs.items()}, bridge_positions.to(device), predict.to(device)


def mask_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one rank's masks at one step: the same after a resume, different across steps and ranks."""
    return (seed * 1_000_003 + step) * 1_009 + rank


class CocoaObjective(nn.Module):
    """The embedder with CoCoA's image head; ``forward(phase, mask_seed, **batch side)`` -> (loss, its terms)."""

    def __init__(
        self,
        embedder: MuCoEmbedder,
        *,
        text_mask_ratio: float,
        image_mask_ratio: float,
        normalize_targets: bool,
        loss_weights: Mapping[str, float],
    ) -> None:
        super().__init__()
        self.embedder = embedder
        self.text_mask_ratio, self.image_mask_ratio = text_mask_ratio, image_mask_ratio
        self.normalize_targets = normalize_targets
        self.loss_weights = dict(loss_weights)
        processor = embedder.image_processor
        self.merge_size = processor.merge_size
        patch_values = CHANNELS * processor.temporal_patch_size * processor.patch_size**2
        # one language-model image token stands for merge_size**2 patches (patch_targets)
        self.image_head = nn.Linear(embedder.hidden_size, patch_values * self.merge_size**2)
        tokenizer = embedder.tokenizer
        self.special_ids = special_token_ids(tokenizer)
        self.mask_id = tokens.token_id(tokenizer, tokens.MASK_TOKEN)
        self.pad_id = tokens.token_id(tokenizer, tokens.PAD_TOKEN)
        self.image_pad_id = tokens.token_id(tokenizer, tokens.IMAGE_PAD)
        vlm = embedder.vlm
        requested = vlm.config._attn_implementation
        self.attn_implementation = attn_implementation_for(True, requested)  # the bridged phase's mask
        if self.attn_implementation != requested:
            vlm.set_attn_implementation(self.attn_implementation)

    def save_merged(self, directory: Any, encode_template: str) -> None:
        """The embedder's model directory (``MuCoEmbedder.save_merged``); the image head is left out."""
        self.embedder.save_merged(directory, encode_template)

    def forward(
        self,
        phase: str,
        mask_seed: int,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mm_token_type_ids: torch.Tensor,
        emb_index: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted loss of ``phase`` on one batch side and its unweighted terms (``TERMS[phase]``)."""
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids,
            "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw,
        }
        generator = torch.Generator().manual_seed(mask_seed)
        if phase == WARMUP:
            return self._warmup(inputs, generator)
        if phase == BRIDGED:
            return self._bridged(inputs)
        raise ValueError(f"CoCoA phase must be one of {PHASES}, got {phase!r}")

    def _warmup(
        self, inputs: dict[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        text_masked, image_masked = warmup_masks(
            input_ids,
            attention_mask,
            image_pad_id=self.image_pad_id,
            special_ids=self.special_ids,
            text_ratio=self.text_mask_ratio,
            image_ratio=self.image_mask_ratio,
            generator=generator,
        )
        hidden = self._hidden(inputs, pattern_mask(attention_mask, "bidirectional"), text_masked | image_masked)
        text_loss = masked_next_token_loss(self._logits(hidden), input_ids, text_masked)
        image_tokens = input_ids == self.image_pad_id
        predicted = self.image_head(hidden[image_tokens])
        if inputs["pixel_values"] is None:  # no image in this batch: a zero that keeps the head in the graph
            image_loss = predicted.sum() * 0.0
        else:
            targets = patch_targets(inputs["pixel_values"], self.merge_size)
            image_loss = masked_patch_loss(
                predicted, targets, image_masked[image_tokens], normalize_targets=self.normalize_targets
            )
        total = self.loss_weights["text"] * text_loss + self.loss_weights["image"] * image_loss
        return total, {"text_loss": text_loss, "image_loss": image_loss}

    def _bridged(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows, bridges, predict = bridged_batch(
            inputs["input_ids"],
            inputs["attention_mask"],
            emb_id=self.embedder.emb_token_id,
            pad_id=self.pad_id,
            image_pad_id=self.image_pad_id,
            special_ids=self.special_ids,
        )
        bridged_inputs = {**inputs, **rows}
        mask = truncated_mask(
            rows["attention_mask"], bridges, input_pattern="bidirectional", reconstruction_pattern="causal"
        )
        hidden = self._hidden(bridged_inputs, mask, None)
        bridged_loss = masked_next_token_loss(self._logits(hidden), rows["input_ids"], predict)
        # the image head has no part in this phase: a zero gradient, so ZeRO reduces every trainable parameter
        unused = sum(parameter.sum() for parameter in self.image_head.parameters()) * 0.0
        return self.loss_weights["bridged"] * bridged_loss + unused, {"bridged_loss": bridged_loss}

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embedder.model.get_output_embeddings()(hidden)

    def _hidden(
        self, inputs: dict[str, Any], mask: torch.Tensor, hidden_positions: torch.Tensor | None
    ) -> torch.Tensor:
        """The last hidden states under the 4-D ``mask``, ``hidden_positions`` [B, T] input as ``<|mask|>``."""
        vlm = self.embedder.vlm
        masks = per_layer_type(
            mask,
            vlm.config.get_text_config(),
            attn_implementation=self.attn_implementation,
            dtype=vlm.dtype,
            padding_mask=inputs["attention_mask"],
        )
        position_ids = self.embedder.mrope_positions(inputs)
        with self._masked_inputs(hidden_positions):
            return vlm(**inputs | {"attention_mask": masks, "position_ids": position_ids}).last_hidden_state

    @contextmanager
    def _masked_inputs(self, hidden_positions: torch.Tensor | None) -> Iterator[None]:
        """Replaces the language model's input embeddings at ``hidden_positions`` by ``<|mask|>``'s.

        At the language model's entrance, after each family has put its image
        features in place: an image token is hidden as a text token is. Qwen3-VL
        adds image features again in its first layers (deepstack): those of a
        hidden image token are zeroed too, so nothing of it leaks back.
        """
        if hidden_positions is None:
            yield
            return
        vlm = self.embedder.vlm

        def replace(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            embeds = kwargs["inputs_embeds"]
            mask_id = torch.tensor([self.mask_id], device=embeds.device)
            mask_row = vlm.get_input_embeddings()(mask_id).to(embeds.dtype)
            kwargs["inputs_embeds"] = torch.where(hidden_positions[..., None], mask_row, embeds)
            if kwargs.get("deepstack_visual_embeds") is not None:
                kept = ~hidden_positions[kwargs["visual_pos_masks"]][:, None]
                kwargs["deepstack_visual_embeds"] = [e * kept for e in kwargs["deepstack_visual_embeds"]]
            return args, kwargs

        handle = vlm.language_model.register_forward_pre_hook(replace, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
