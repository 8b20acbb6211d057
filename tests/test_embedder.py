"""MuCoEmbedder on each family's tiny preset: pooling at <|emb|>, attention direction, what trains, merged save."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from muco_flow.modeling import tokens
from muco_flow.modeling.backbone import load_backbone
from muco_flow.modeling.embedder import EmbedderSettings, LoraSettings, MuCoEmbedder
from muco_flow.modeling.families import FAMILIES
from muco_flow.modeling.inputs import build_model_inputs

TURN = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>\n"
ENCODE_TEMPLATE = "<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>"


@pytest.fixture(params=list(FAMILIES))
def backbone_dir(request, family_backbone_dir):
    """Each family's tiny preset (built once per session): MuCo's additions must hold on every one."""
    return family_backbone_dir(request.param)


def embedder(directory, **settings) -> MuCoEmbedder:
    torch.manual_seed(0)
    model = MuCoEmbedder(load_backbone(str(directory)), EmbedderSettings(**settings))
    return model.eval()


def two_conversations(model):
    picture = Image.new("RGB", (112, 140), (200, 30, 30))
    first = TURN.format(tokens.VISION_BLOCK + "What color?") + TURN.format("How many?")
    second = TURN.format(tokens.VISION_BLOCK + "What color?") + TURN.format("How many shapes are there?")
    batch = build_model_inputs(model.tokenizer, model.image_processor, [first, second], [picture, picture])
    return batch, (batch["input_ids"] == model.emb_token_id).nonzero()


@pytest.mark.parametrize("bidirectional", [False, True])
def test_attention_direction(backbone_dir, bidirectional):
    model = embedder(backbone_dir, bidirectional=bidirectional)
    batch, emb_index = two_conversations(model)
    with torch.no_grad():
        vectors = model(**batch, emb_index=emb_index)
    assert vectors.shape == (4, model.hidden_size)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(4))
    # Turn 1 is identical in both conversations; only turn 2's text differs.
    first_turn_change = (vectors[0] - vectors[2]).abs().max().item()
    if bidirectional:
        assert first_turn_change > 1e-4  # turn 1 sees the later text
    else:
        assert first_turn_change < 1e-6  # causal: the future cannot reach turn 1
    assert (vectors[1] - vectors[3]).abs().max().item() > 1e-4


def test_pooling_matches_hidden_states_at_emb_positions(backbone_dir):
    model = embedder(backbone_dir, lora=LoraSettings(enabled=False))
    batch, emb_index = two_conversations(model)
    with torch.no_grad():
        pooled = model(**batch, emb_index=emb_index)
        hidden = model.model(**batch, output_hidden_states=True).hidden_states[-1]
    expected = torch.nn.functional.normalize(hidden[emb_index[:, 0], emb_index[:, 1]], dim=-1)
    torch.testing.assert_close(pooled, expected)


def test_only_lora_and_the_added_token_rows_train(backbone_dir):
    model = embedder(backbone_dir)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("visual" in name for name in trainable)
    assert all("lora_" in name or "trainable_tokens" in name for name in trainable)
    assert any("lora_magnitude" in name for name in trainable)  # DoRA
    # The trainable token rows are exactly <|emb|> and <|mask|>.
    adapter = next(m for n, m in model.named_modules() if n.endswith("embed_tokens.token_adapter"))
    assert sorted(adapter.token_indices["default"]) == sorted(model.special_token_ids)


def test_one_training_step_reaches_the_adapters_and_the_emb_row_but_not_the_vision_tower(backbone_dir):
    model = embedder(backbone_dir, gradient_checkpointing=True).train()
    batch, emb_index = two_conversations(model)
    vectors = model(**batch, emb_index=emb_index)
    (vectors[0] @ vectors[2] - vectors[1] @ vectors[3]).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(grad is not None for grad in grads.values())
    assert all(p.grad is None for name, p in model.named_parameters() if "visual" in name)
    assert any(grad.abs().sum() > 0 for name, grad in grads.items() if "lora_B" in name)  # B starts at zero, A's is 0
    # the trainable token rows: <|emb|> is in the batch and gets a gradient, <|mask|> is not and gets none
    adapter = next(m for n, m in model.named_modules() if n.endswith("embed_tokens.token_adapter"))
    rows = adapter.token_indices["default"]
    delta = adapter.trainable_tokens_delta["default"].grad
    assert delta[rows.index(model.emb_token_id)].abs().sum() > 0
    assert delta[rows.index(model.special_token_ids[1])].abs().sum() == 0


def test_a_bidirectional_vector_does_not_depend_on_the_padding_of_its_batch(backbone_dir):
    model = embedder(backbone_dir, bidirectional=True, lora=LoraSettings(enabled=False))
    picture = Image.new("RGB", (140, 112), (30, 200, 30))
    items = [("a green square on a white background, seen from above, with two circles", picture), ("short", None)]
    together = model.encode(items, template=ENCODE_TEMPLATE, batch_size=2, progress=False)
    alone = torch.cat([model.encode([item], template=ENCODE_TEMPLATE, progress=False) for item in items])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_encode_and_the_merged_model_agree(backbone_dir, tmp_path):
    model = embedder(backbone_dir)
    # make the adapters matter: LoRA B starts at zero
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    picture = Image.new("RGB", (168, 112), (30, 30, 200))
    items = [("a blue square", None), ("", picture), ("what is shown?", picture)]
    vectors = model.encode(items, template=ENCODE_TEMPLATE, batch_size=2, progress=False)
    assert vectors.shape == (3, model.hidden_size)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3))
    model.save_merged(tmp_path / "merged", ENCODE_TEMPLATE)
    plain = embedder(tmp_path / "merged", lora=LoraSettings(enabled=False))
    again = plain.encode(items, template=ENCODE_TEMPLATE, batch_size=3, progress=False)
    torch.testing.assert_close(again, vectors, atol=1e-4, rtol=1e-4)


def test_encode_needs_one_emb_token_per_item(tiny_backbone_dir):
    model = embedder(tiny_backbone_dir)
    with pytest.raises(ValueError, match="exactly one \\{text\\} and one <\\|emb\\|>"):
        model.encode([("x", None)], template="<|im_start|>user\n{text}<|im_end|>", progress=False)


@pytest.mark.parametrize("lora", [True, False])
def test_each_parameter_is_registered_once(backbone_dir, lora):
    """DeepSpeed's zero_to_fp32 --safe_serialization refuses tensors that share memory under two names."""
    model = embedder(backbone_dir, lora=LoraSettings(enabled=lora))
    every = list(model.named_parameters(remove_duplicate=False))
    assert len(every) == len({id(p) for _, p in every}) == len(dict(model.named_parameters()))
    assert all(name.startswith("model.") for name, _ in every)
    storages = [t.untyped_storage().data_ptr() for t in model.state_dict().values()]
    assert len(storages) == len(set(storages))
    assert model.vlm.config.text_config.hidden_size == model.hidden_size  # still reachable for forward
