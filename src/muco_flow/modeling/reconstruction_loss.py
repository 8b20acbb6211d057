"""CoCoA's reconstruction objectives (docs/cocoa.md): text by masked next-token prediction, images by
masked auto-encoding of their patches.

Text: some input tokens are hidden (replaced by a mask token, under
bidirectional attention) and each is predicted from the logits one position
earlier, as the language-model head was trained to (masked next-token
prediction). The same loss, with every reconstruction-segment token to
predict, is the EOS-bridged stage's text reconstruction.

Images: Qwen2-VL's language model sees one token per ``merge x merge``
vision patches (the merger concatenates ``merge**2`` consecutive rows of
``pixel_values``), so the target of an image token is those rows
concatenated (``patch_targets``); the loss is the mean squared error over the
masked tokens only, optionally against per-target normalised pixels (MAE's
``norm_pix_loss``, He et al. 2022).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# MAE's epsilon in the per-patch normalisation of the targets
TARGET_NORM_EPS = 1e-6


def choose_masked_positions(maskable: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Per row, ``round(ratio * n)`` of the row's ``n`` maskable positions (at least one where n > 0), uniformly.

    ``maskable`` [B, T] excludes what must stay visible: padding, special
    tokens, the embedding token, and the first position (which has no
    earlier position to be predicted from).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    scores = torch.rand(maskable.shape, generator=generator, device=generator.device).to(maskable.device)
    scores = scores.masked_fill(~maskable, float("inf"))
    available = maskable.sum(dim=-1)
    counts = torch.where(available > 0, (available * ratio).round().clamp(min=1), 0).long()
    ranks = scores.argsort(dim=-1).argsort(dim=-1)  # each position's rank among its row's scores
    return ranks < counts[:, None]


def masked_next_token_loss(logits: torch.Tensor, target_ids: torch.Tensor, predict: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``target_ids[b, i]`` under ``logits[b, i - 1]``, over the positions ``predict`` marks.

    ``logits`` [B, T, V]; ``target_ids`` and ``predict`` [B, T]. Position 0
    has no earlier position, so it may not be marked. With nothing marked the
    loss is a zero that keeps the graph (a batch may hold no text to predict).
    """
    if predict[:, 0].any():
        raise ValueError("position 0 cannot be predicted from the position before it")
    chosen = predict[:, 1:]
    if not chosen.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1][chosen].float(), target_ids[:, 1:][chosen])


def patch_targets(pixel_values: torch.Tensor, merge_size: int) -> torch.Tensor:
    """One target per language-model image token: its ``merge_size**2`` consecutive patch rows, concatenated.

    ``pixel_values`` [patches, channels * temporal * patch * patch] as
    Qwen2-VL's image processor writes them (each merged token's patches
    adjacent), all images of a batch one after another.
    """
    group = merge_size * merge_size
    if pixel_values.shape[0] % group:
        raise ValueError(f"{pixel_values.shape[0]} patches do not form whole groups of {group}")
    return pixel_values.reshape(pixel_values.shape[0] // group, group * pixel_values.shape[1])


def masked_patch_loss(
    predicted: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, *, normalize_targets: bool
) -> torch.Tensor:
    """Mean over the ``masked`` image tokens of each token's mean squared error against its target.

    ``predicted`` and ``targets`` [tokens, D]; ``masked`` [tokens]. With
    ``normalize_targets`` each target is standardised by its own mean and
    (unbiased) variance first. With nothing masked the loss is a zero that
    keeps the graph.
    """
    if predicted.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predicted.shape)} and targets {tuple(targets.shape)} differ")
    if not masked.any():
        return predicted.sum() * 0.0
    chosen_targets = targets[masked].float()
    if normalize_targets:
        mean = chosen_targets.mean(dim=-1, keepdim=True)
        variance = chosen_targets.var(dim=-1, keepdim=True)
        chosen_targets = (chosen_targets - mean) / (variance + TARGET_NORM_EPS).sqrt()
    return ((predicted[masked].float() - chosen_targets) ** 2).mean(dim=-1).mean()
