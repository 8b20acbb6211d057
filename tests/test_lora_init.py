"""`training.embedder.lora.init`: PEFT's Kaiming-uniform default, or MuCo's Gaussian."""

from __future__ import annotations

import math

import pytest
import torch

from muco_flow.modeling.backbone import load_backbone
from muco_flow.modeling.embedder import EmbedderSettings, LoraSettings, MuCoEmbedder


def adapter_weights(directory, init: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The lora_A and lora_B matrices of an embedder built with ``init``."""
    torch.manual_seed(0)
    model = MuCoEmbedder(load_backbone(str(directory)), EmbedderSettings(lora=LoraSettings(init=init)))
    named = dict(model.model.named_parameters())
    a = [w.detach() for name, w in named.items() if "lora_A" in name]
    b = [w.detach() for name, w in named.items() if "lora_B" in name]
    assert a and len(a) == len(b)
    return a, b


def test_kaiming_draws_a_within_the_kaiming_uniform_bound(tiny_backbone_dir):
    a, b = adapter_weights(tiny_backbone_dir, "kaiming")
    for weight in a:
        # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std bound/sqrt(3)
        bound = 1 / math.sqrt(weight.shape[1])
        assert weight.abs().max() <= bound
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    assert all(torch.count_nonzero(weight) == 0 for weight in b)


def test_gaussian_draws_a_with_std_one_over_r(tiny_backbone_dir):
    a, b = adapter_weights(tiny_backbone_dir, "gaussian")
    values = torch.cat([weight.flatten() for weight in a])
    assert values.std().item() == pytest.approx(1 / 16, rel=0.05)  # r = 16
    assert values.mean().item() == pytest.approx(0.0, abs=0.005)
    # a normal's tails pass the uniform's bound, 1/sqrt(128) for the 128-wide inputs
    assert values.abs().max().item() > 1 / math.sqrt(128)
    assert all(torch.count_nonzero(weight) == 0 for weight in b)


def test_an_unknown_init_is_named():
    with pytest.raises(ValueError, match=r"training\.embedder\.lora\.init must be one of"):
        LoraSettings(init="pissa")
