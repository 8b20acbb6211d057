"""The causal, bidirectional and truncated (EOS-bridged) masks on hand-drawn cases, and on a tiny Qwen2-VL:
sdpa and eager agree on them, and the reconstruction sees the input only through the bridge token."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration
from transformers.masking_utils import create_bidirectional_mask

from muco_flow.modeling.attention_masks import (
    additive,
    attn_implementation_for,
    pattern_mask,
    per_layer_type,
    truncated_mask,
)
from muco_flow.modeling.backbone import tiny_model_config, train_bpe_tokenizer
from muco_flow.modeling.families import family_named
from muco_flow.modeling.reconstruction_loss import masked_next_token_loss

# The tiny preset's configuration builder at half its width, so the gradient tests stay quick
TINY = {
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "mrope_section": [2, 3, 3],
    },
    "vision": {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2},
}


def drawn(*rows: str) -> torch.Tensor:
    """A [1, 1, T, T] mask from rows of 1 (attends) and 0 (does not), as drawn by hand."""
    return torch.tensor([[int(c) for c in row] for row in rows], dtype=torch.bool)[None, None]


def test_causal_mask_hand_case_with_right_padding():
    mask = pattern_mask(torch.tensor([[1, 1, 1, 1, 0]]), "causal")
    expected = drawn(
        "10000",
        "11000",
        "11100",
        "11110",
        "11110",  # the padding row: it sees the real tokens, never the padding key
    )
    assert torch.equal(mask, expected)


def test_causal_mask_with_left_padding_keeps_the_empty_row_on_its_own_position():
    mask = pattern_mask(torch.tensor([[0, 1, 1]]), "causal")
    expected = drawn(
        "100",  # no real key at or before it: its own position, so SDPA gives no NaN
        "010",
        "011",
    )
    assert torch.equal(mask, expected)
    query = torch.randn(1, 1, 3, 4)
    out = torch.nn.functional.scaled_dot_product_attention(query, query, query, attn_mask=mask)
    assert torch.isfinite(out).all()


def test_bidirectional_mask_hand_case_per_row_padding():
    mask = pattern_mask(torch.tensor([[1, 1, 1], [1, 1, 0]]), "bidirectional")
    assert torch.equal(mask[0:1], drawn("111", "111", "111"))
    assert torch.equal(mask[1:2], drawn("110", "110", "110"))


def test_bidirectional_mask_is_what_the_embedder_builds_today():
    # embedder._bidirectional_inputs uses transformers' create_bidirectional_mask for sdpa
    tokenizer = train_bpe_tokenizer(["a red circle"], vocab_size=300)
    config = tiny_model_config(tokenizer, family_named("qwen2_vl"), TINY).get_text_config()
    config._attn_implementation = "sdpa"
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    theirs = create_bidirectional_mask(config=config, inputs_embeds=torch.zeros(2, 4, 1), attention_mask=attention_mask)
    assert torch.equal(pattern_mask(attention_mask, "bidirectional"), theirs)


def test_truncated_mask_hand_cases_one_bridge_per_row():
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0]])
    # row 0: input 0..2 (bridge 2), reconstruction 3..5, padding 6
    bidirectional_input = truncated_mask(
        attention_mask, torch.tensor([2, 1]), input_pattern="bidirectional", reconstruction_pattern="causal"
    )
    assert torch.equal(
        bidirectional_input[0:1],
        drawn(
            "1110000",
            "1110000",
            "1110000",  # the bridge sees the whole input, never the reconstruction
            "0011000",  # reconstruction: the bridge, then itself and what it reconstructed before
            "0011100",
            "0011110",
            "0011110",  # padding row in the reconstruction segment; padding key excluded
        ),
    )
    # row 1: bridge at 1, so input 0..1 and reconstruction 2..5
    assert torch.equal(
        bidirectional_input[1:2],
        drawn("1100000", "1100000", "0110000", "0111000", "0111100", "0111110", "0111110"),
    )
    causal_input = truncated_mask(
        attention_mask, torch.tensor([1, 1]), input_pattern="causal", reconstruction_pattern="bidirectional"
    )
    expected = drawn("1000000", "1100000", "0111110", "0111110", "0111110", "0111110", "0111110")
    assert torch.equal(causal_input, expected.expand(2, -1, -1, -1))


def test_truncated_mask_asks_one_bridge_per_row_and_a_known_pattern():
    with pytest.raises(ValueError, match="one bridge position per row"):
        truncated_mask(torch.ones(2, 4), torch.tensor([1]), input_pattern="causal", reconstruction_pattern="causal")
    with pytest.raises(ValueError, match="attention pattern"):
        pattern_mask(torch.ones(1, 3), "sliding")  # type: ignore[arg-type]


def test_additive_is_zero_where_allowed_and_the_minimum_elsewhere():
    bias = additive(drawn("10", "11"), torch.float16)
    low = torch.finfo(torch.float16).min
    assert bias.dtype == torch.float16
    assert bias.tolist() == [[[[0.0, low], [0.0, 0.0]]]]


def test_only_the_truncated_mask_falls_back_from_flash_attention():
    assert attn_implementation_for(True, "flash_attention_2") == "sdpa"
    assert attn_implementation_for(False, "flash_attention_2") == "flash_attention_2"
    assert attn_implementation_for(True, "eager") == "eager"


# -- on a tiny Qwen2-VL language model ----------------------------------------------------------------

BRIDGE, LENGTH = 4, 8  # input 0..4 (bridge 4), reconstruction 5..7


@pytest.fixture(scope="module")
def tiny_model():
    tokenizer = train_bpe_tokenizer(["a red circle", "a blue square"], vocab_size=300)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(tiny_model_config(tokenizer, family_named("qwen2_vl"), TINY)).eval()
    return model


def run_language_model(model, embeds, mask, attn_implementation):
    model.set_attn_implementation(attn_implementation)
    language = model.model.language_model
    masks = per_layer_type(mask, language.config, attn_implementation=attn_implementation, dtype=embeds.dtype)
    positions = torch.arange(embeds.shape[1])[None].expand(embeds.shape[0], -1)
    return language(inputs_embeds=embeds, attention_mask=masks, position_ids=positions).last_hidden_state


def truncated(batch: int = 1) -> torch.Tensor:
    return truncated_mask(
        torch.ones(batch, LENGTH, dtype=torch.long),
        torch.full((batch,), BRIDGE),
        input_pattern="bidirectional",
        reconstruction_pattern="causal",
    )


def test_sdpa_and_eager_agree_on_the_truncated_mask(tiny_model):
    embeds = torch.randn(2, LENGTH, 64)
    sdpa = run_language_model(tiny_model, embeds, truncated(2), "sdpa")
    eager = run_language_model(tiny_model, embeds, truncated(2), "eager")
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)


def reconstruction_gradient(model, mask, *, cut_bridge: bool) -> torch.Tensor:
    """d(text reconstruction loss)/d(input embeddings); with ``cut_bridge`` the bridge's states are detached
    at every layer's entrance, so only a path that bypasses the bridge can carry a gradient to the input."""
    torch.manual_seed(1)
    embeds = torch.randn(1, LENGTH, 64, requires_grad=True)
    target_ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, LENGTH))
    # predict reconstruction tokens 6 and 7 from the logits at 5 and 6: outputs of the reconstruction segment
    predict = torch.zeros(1, LENGTH, dtype=torch.bool)
    predict[:, BRIDGE + 2 :] = True
    at_bridge = (torch.arange(LENGTH) == BRIDGE)[None, :, None]

    def detach_bridge(_module, args):
        return (torch.where(at_bridge, args[0].detach(), args[0]), *args[1:])

    hooks = [layer.register_forward_pre_hook(detach_bridge) for layer in model.model.language_model.layers]
    try:
        if not cut_bridge:
            for hook in hooks:
                hook.remove()
        hidden = run_language_model(model, embeds, mask, "sdpa")
        masked_next_token_loss(model.lm_head(hidden), target_ids, predict).backward()
    finally:
        for hook in hooks:
            hook.remove()
    assert embeds.grad is not None
    return embeds.grad[0].abs().sum(dim=-1)  # one gradient size per position


def test_the_reconstruction_sees_the_input_only_through_the_bridge(tiny_model):
    cut = reconstruction_gradient(tiny_model, truncated(), cut_bridge=True)
    assert torch.equal(cut[:BRIDGE], torch.zeros(BRIDGE))  # no input token reaches it but through the bridge
    assert (cut[BRIDGE + 1 : LENGTH - 1] > 0).all()  # the reconstruction tokens the logits come from do
    assert cut[LENGTH - 1] == 0  # the last one is only a target: causal, nothing before it sees it
    # ...and through the bridge the input does get a gradient: the encoder learns to compress into it
    whole = reconstruction_gradient(tiny_model, truncated(), cut_bridge=False)
    assert (whole[: BRIDGE + 1] > 0).all()


def test_without_truncation_the_input_reaches_the_reconstruction_directly(tiny_model):
    # the same cut under a plain bidirectional mask: the input tokens now have their own path
    bidirectional = pattern_mask(torch.ones(1, LENGTH, dtype=torch.long), "bidirectional")
    cut = reconstruction_gradient(tiny_model, bidirectional, cut_bridge=True)
    assert (cut[:BRIDGE] > 0).all()
