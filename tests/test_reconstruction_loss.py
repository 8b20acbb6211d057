"""CoCoA's reconstruction losses against slow references written position by position, and hand cases."""

from __future__ import annotations

import math

import pytest
import torch

from muco_flow.modeling.reconstruction_loss import (
    choose_masked_positions,
    masked_next_token_loss,
    masked_patch_loss,
    patch_targets,
)


def reference_next_token_loss(logits, target_ids, predict):
    """-log softmax(logits[b, i-1])[target[b, i]], averaged over the marked positions, one at a time."""
    losses = []
    for b in range(logits.shape[0]):
        for i in range(1, logits.shape[1]):
            if predict[b, i]:
                row = [float(v) for v in logits[b, i - 1]]
                log_total = math.log(sum(math.exp(v) for v in row))
                losses.append(log_total - row[int(target_ids[b, i])])
    return sum(losses) / len(losses)


def test_masked_next_token_loss_hand_case():
    # vocabulary of 2; position 1 (target 0) is predicted from the logits at position 0
    logits = torch.tensor([[[math.log(3.0), 0.0], [5.0, 5.0], [0.0, 0.0]]])
    target_ids = torch.tensor([[1, 0, 1]])
    predict = torch.tensor([[False, True, False]])
    # softmax([log 3, 0]) = [3/4, 1/4]: the loss is -log(3/4)
    assert masked_next_token_loss(logits, target_ids, predict).item() == pytest.approx(-math.log(0.75))


def test_masked_next_token_loss_matches_the_slow_reference():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator)
    target_ids = torch.randint(0, 11, (3, 7), generator=generator)
    predict = torch.rand(3, 7, generator=generator) < 0.5
    predict[:, 0] = False
    predict[2] = False  # a row with nothing to predict adds nothing
    predict[0, 3] = True
    loss = masked_next_token_loss(logits, target_ids, predict)
    assert loss.item() == pytest.approx(reference_next_token_loss(logits, target_ids, predict), rel=1e-6)


def test_masked_next_token_loss_refuses_position_zero_and_is_a_zero_with_nothing_marked():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    with pytest.raises(ValueError, match="position 0"):
        masked_next_token_loss(logits, torch.zeros(1, 3, dtype=torch.long), torch.tensor([[True, False, False]]))
    nothing = masked_next_token_loss(logits, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.bool))
    nothing.backward()
    assert nothing.item() == 0.0
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_choose_masked_positions_takes_the_ratio_of_each_rows_maskable_positions_only():
    maskable = torch.tensor([[False, True, True, True, True, True, True, True, True, True, True, False]] * 2)
    maskable[1, 5:] = False  # row 1: 4 maskable positions
    chosen = choose_masked_positions(maskable, 0.3, torch.Generator().manual_seed(0))
    assert chosen.sum(dim=-1).tolist() == [3, 1]  # round(0.3 * 10), round(0.3 * 4) = 1
    assert not (chosen & ~maskable).any()
    again = choose_masked_positions(maskable, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(chosen, again)
    other = [choose_masked_positions(maskable, 0.3, torch.Generator().manual_seed(s))[0] for s in range(1, 6)]
    assert any(not torch.equal(chosen[0], o) for o in other)  # the seed decides which


def test_choose_masked_positions_keeps_one_where_any_is_maskable_and_none_where_none_is():
    maskable = torch.tensor([[False, True, False], [False, False, False]])
    chosen = choose_masked_positions(maskable, 0.1, torch.Generator().manual_seed(0))
    assert chosen.tolist() == [[False, True, False], [False, False, False]]
    with pytest.raises(ValueError, match="mask ratio"):
        choose_masked_positions(maskable, 1.0, torch.Generator())


def test_patch_targets_concatenate_each_merged_tokens_patch_rows():
    # 8 patch rows of 3 values, merge 2: two language-model tokens of 4 rows each
    pixel_values = torch.arange(24.0).reshape(8, 3)
    targets = patch_targets(pixel_values, merge_size=2)
    assert targets.tolist() == [list(range(0, 12)), list(range(12, 24))]
    with pytest.raises(ValueError, match="whole groups of 4"):
        patch_targets(pixel_values[:6], merge_size=2)


def reference_patch_loss(predicted, targets, masked, normalize_targets):
    losses = []
    for n in range(targets.shape[0]):
        if not masked[n]:
            continue
        target = [float(v) for v in targets[n]]
        if normalize_targets:
            mean = sum(target) / len(target)
            variance = sum((v - mean) ** 2 for v in target) / (len(target) - 1)
            target = [(v - mean) / math.sqrt(variance + 1e-6) for v in target]
        losses.append(sum((float(p) - t) ** 2 for p, t in zip(predicted[n], target, strict=True)) / len(target))
    return sum(losses) / len(losses)


def test_masked_patch_loss_hand_case():
    predicted = torch.tensor([[1.0, 1.0], [9.0, 9.0], [0.0, 0.0]])
    targets = torch.tensor([[0.0, 3.0], [0.0, 0.0], [2.0, 2.0]])
    masked = torch.tensor([True, False, True])
    # token 0: ((1-0)^2 + (1-3)^2) / 2 = 2.5; token 2: (4 + 4) / 2 = 4; token 1 is visible
    assert masked_patch_loss(predicted, targets, masked, normalize_targets=False).item() == pytest.approx(3.25)


@pytest.mark.parametrize("normalize_targets", [False, True])
def test_masked_patch_loss_matches_the_slow_reference(normalize_targets):
    generator = torch.Generator().manual_seed(0)
    predicted = torch.randn(6, 16, generator=generator)
    targets = torch.randn(6, 16, generator=generator) * 3 + 1
    masked = torch.tensor([True, False, True, True, False, True])
    loss = masked_patch_loss(predicted, targets, masked, normalize_targets=normalize_targets)
    expected = reference_patch_loss(predicted, targets, masked, normalize_targets)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_masked_patch_loss_with_nothing_masked_is_a_zero_and_shapes_must_agree():
    predicted = torch.randn(2, 4, requires_grad=True)
    nothing = masked_patch_loss(predicted, torch.randn(2, 4), torch.zeros(2, dtype=torch.bool), normalize_targets=True)
    assert nothing.item() == 0.0
    with pytest.raises(ValueError, match="differ"):
        masked_patch_loss(predicted, torch.randn(2, 5), torch.ones(2, dtype=torch.bool), normalize_targets=False)
