"""Who may attend to whom: the causal, bidirectional and truncated (EOS-bridged) masks, built in one place.

Every mask here is 4-D, ``[batch, 1, query, key]``, boolean, True where the
query may attend to the key: the form SDPA takes, and the form Qwen2-VL's
language model takes per layer type (``per_layer_type``). ``additive`` turns
one into the float bias the eager implementation adds to its scores.

Padding (``attention_mask`` 0) is excluded as a key everywhere. A query row
left with no key at all (a padding row under causal attention with left
padding) keeps its own position, so SDPA returns numbers rather than NaN
there; such a row is padding, and its output is never read.

The truncated mask is CoCoA's EOS-bridged reconstruction (docs/cocoa.md):
the sequence is an input segment ending at the bridge (the ``<EOS>`` or
``<|emb|>`` token, inclusive) followed by a reconstruction segment. The
input segment attends within itself; the reconstruction segment attends to
the bridge and within itself, never to any other input token, and no input
token attends to the reconstruction. So everything the reconstruction
learns about the input passes through the bridge token's states.

flash-attention-2 takes no arbitrary mask (only causal or not, per packed
segment), so the truncated pattern has no direct form there:
``attn_implementation_for`` answers sdpa for it.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

Pattern = Literal["causal", "bidirectional"]
PATTERNS: tuple[Pattern, ...] = ("causal", "bidirectional")


def _within(pattern: Pattern, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """True where ``query`` may attend to ``key`` (broadcast positions) under ``pattern``."""
    if pattern == "causal":
        return key <= query
    if pattern == "bidirectional":
        return torch.ones_like(key <= query)
    raise ValueError(f"attention pattern must be one of {PATTERNS}, got {pattern!r}")


def _finish(allowed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``allowed`` [B, T, T] with padding keys removed and no empty row, as [B, 1, T, T]."""
    allowed = allowed & attention_mask.bool()[:, None, :]
    empty = ~allowed.any(dim=-1, keepdim=True)
    diagonal = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    return (allowed | (empty & diagonal)).unsqueeze(1)


def _positions(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    length = attention_mask.shape[-1]
    positions = torch.arange(length, device=attention_mask.device)
    return positions[:, None], positions[None, :]


def pattern_mask(attention_mask: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The plain causal or bidirectional mask for a padded batch (``attention_mask`` [B, T], 1 = token)."""
    query, key = _positions(attention_mask)
    allowed = _within(pattern, query, key).expand(attention_mask.shape[0], -1, -1)
    return _finish(allowed, attention_mask)


def truncated_mask(
    attention_mask: torch.Tensor,
    bridge_positions: torch.Tensor,
    *,
    input_pattern: Pattern,
    reconstruction_pattern: Pattern,
) -> torch.Tensor:
    """The EOS-bridged mask: positions after ``bridge_positions[b]`` see row b's input only through the bridge.

    ``input_pattern`` is the attention among the input segment (positions up
    to and including the bridge); ``reconstruction_pattern`` the attention
    among the reconstruction segment (causal for next-token reconstruction of
    text, bidirectional for reconstructing masked image patches at once).
    """
    if bridge_positions.shape != attention_mask.shape[:1]:
        raise ValueError(
            f"one bridge position per row: got {tuple(bridge_positions.shape)} for a batch of {attention_mask.shape[0]}"
        )
    query, key = _positions(attention_mask)
    bridge = bridge_positions.to(attention_mask.device)[:, None, None]
    query_in_input, key_in_input = query <= bridge, key <= bridge
    allowed = torch.where(
        query_in_input,
        key_in_input & _within(input_pattern, query, key),
        (key == bridge) | (~key_in_input & _within(reconstruction_pattern, query, key)),
    )
    return _finish(allowed, attention_mask)


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask as the additive bias eager attention takes: 0 where allowed, the dtype's minimum elsewhere."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask, torch.finfo(dtype).min)


def per_layer_type(
    mask: torch.Tensor,
    text_config: Any,
    *,
    attn_implementation: str,
    dtype: torch.dtype,
    padding_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None] | torch.Tensor:
    """The mask as a family's language model takes a prepared one, in the form ``attn_implementation``
    reads (boolean for sdpa, additive in ``dtype`` for eager).

    Qwen2-VL and Qwen2.5-VL: one entry per layer type. Qwen3-VL (no layer
    types): the 4-D mask itself, which it uses as given. Qwen3.5: its
    linear-attention (Gated DeltaNet) layers are recurrent, causal by
    construction, and take the 2-D ``padding_mask`` (None when nothing is
    padding) as the model would; only its attention layers follow ``mask``.
    """
    if attn_implementation == "eager":
        mask = additive(mask, dtype)
    elif attn_implementation != "sdpa":
        raise ValueError(f"a 4-D attention mask needs sdpa or eager attention, not {attn_implementation!r}")
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is None:
        return mask
    masks: dict[str, torch.Tensor | None] = {layer_type: mask for layer_type in set(layer_types)}
    if "linear_attention" in masks:
        if padding_mask is None:
            raise ValueError("a model with linear-attention layers needs the 2-D padding mask too")
        masks["linear_attention"] = None if bool(padding_mask.all()) else padding_mask
    return masks


def attn_implementation_for(truncated: bool, requested: str) -> str:
    """The attention implementation a pass with (``truncated``) or without the EOS-bridged mask runs on.

    flash-attention-2 expresses causal and bidirectional attention (its
    causal flag) but no truncation, so a truncated pass falls back to sdpa.
    """
    if truncated and requested == "flash_attention_2":
        logger.info("the truncated (EOS-bridged) mask is not expressible in flash-attention-2: using sdpa")
        return "sdpa"
    return requested
