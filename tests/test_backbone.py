"""The tiny Qwen2-VL preset: tokenizer, save/load round trip, and a multimodal forward pass."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration

from muco_flow.modeling import tokens
from muco_flow.modeling.backbone import (
    BackboneConfig,
    load_backbone,
    tiny_model_config,
    train_bpe_tokenizer,
)
from muco_flow.modeling.families import family_named
from muco_flow.modeling.inputs import build_model_inputs, expand_image_pads

ALL_SPECIAL = (*tokens.QWEN2_VL_SPECIAL_TOKENS, *tokens.MUCO_TOKENS)


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir):
    return load_backbone(str(tiny_backbone_dir))


def test_every_special_token_is_one_token(backbone):
    for token in ALL_SPECIAL:
        assert len(backbone.tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    # ...also inside running text, where BPE merges could swallow it
    text = f"What color?{tokens.IM_END}\n{tokens.IM_START}assistant\n{tokens.EMB_TOKEN}{tokens.MASK_TOKEN}"
    ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    for token in (tokens.IM_END, tokens.IM_START, tokens.EMB_TOKEN, tokens.MASK_TOKEN):
        assert ids.count(backbone.tokenizer.convert_tokens_to_ids(token)) == 1
    assert backbone.tokenizer.decode(ids) == text


def test_tokenizer_is_byte_level_and_never_unknown():
    tokenizer = train_bpe_tokenizer(["a red circle", "a blue square"], vocab_size=400)
    text = "Ünïcödé 🙂 and words it never saw"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_a_token_id_is_its_vocabulary_entry_and_a_missing_token_is_named():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_bpe_tokenizer(["a red circle", "a blue square"], vocab_size=400)
    # the BPE trainer gives the special tokens the first ids, in the order they are passed
    assert [tokens.token_id(tokenizer, t) for t in ALL_SPECIAL] == list(range(len(ALL_SPECIAL)))
    # byte-level: no unknown token, so convert_tokens_to_ids answers None for a missing one
    with pytest.raises(ValueError, match=re.escape("<|not_a_token|>")):
        tokens.token_id(tokenizer, "<|not_a_token|>")
    # with an unknown token, a missing token would silently be the unknown token's id
    word_level = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "red": 1}, unk_token="[UNK]")), unk_token="[UNK]"
    )
    assert (tokens.token_id(word_level, "red"), tokens.token_id(word_level, "[UNK]")) == (1, 0)
    with pytest.raises(ValueError, match="blue"):
        tokens.token_id(word_level, "blue")


def test_saved_preset_reloads_to_the_same_weights(tiny_backbone_dir, tiny_preset, backbone):
    # Rebuild the model from the same seed, independently of the saved files.
    torch.manual_seed(tiny_preset["seed"])
    reference = Qwen2VLForConditionalGeneration(
        tiny_model_config(backbone.tokenizer, family_named("qwen2_vl"), tiny_preset)
    )
    loaded = backbone.model.state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    n_params = sum(p.numel() for p in backbone.model.parameters())
    assert 5e5 < n_params < 1e7
    assert {p.name for p in tiny_backbone_dir.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    }


def test_forward_pass_gives_one_hidden_state_per_emb_token(backbone, tiny_preset):
    emb = tokens.EMB_TOKEN
    turn = "<|im_start|>{role}\n{content}<|im_end|>\n"
    query = (
        turn.format(role="user", content=f"{tokens.VISION_BLOCK}What is the main object?")
        + turn.format(role="assistant", content=emb)
        + turn.format(role="user", content="How many shapes?")
        + turn.format(role="assistant", content=emb)
        + turn.format(role="user", content="What color is the background?")
        + turn.format(role="assistant", content=emb)
    )
    target = turn.format(role="user", content="red circle") + turn.format(role="assistant", content=emb)
    # 112 x 112 px is 8 x 8 patches of 14 px, merged 2 x 2: 16 image tokens.
    picture = Image.new("RGB", (112, 112), (220, 40, 40))
    batch = build_model_inputs(backbone.tokenizer, backbone.image_processor, [query, target], [picture, None])

    image_pad = backbone.tokenizer.convert_tokens_to_ids(tokens.IMAGE_PAD)
    assert (batch["input_ids"][0] == image_pad).sum() == 16
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == image_pad).int())
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # right padding

    with torch.no_grad():
        hidden = backbone.model(**batch, output_hidden_states=True).hidden_states[-1]
    emb_id = backbone.tokenizer.convert_tokens_to_ids(emb)
    rows, cols = (batch["input_ids"] == emb_id).nonzero(as_tuple=True)
    assert rows.tolist() == [0, 0, 0, 1]
    states = hidden[rows, cols]
    assert states.shape == (4, tiny_preset["text"]["hidden_size"])
    assert torch.isfinite(states).all()
    # Different inputs before each <|emb|> give different states.
    assert torch.linalg.matrix_rank(states) == 4


def test_image_pad_expansion_checks_counts():
    assert expand_image_pads([5, 9, 5, 7], image_pad_id=9, tokens_per_image=[3]) == [5, 9, 9, 9, 5, 7]
    with pytest.raises(ValueError, match="more <\\|image_pad\\|> placeholders than images"):
        expand_image_pads([9, 9], image_pad_id=9, tokens_per_image=[1])
    with pytest.raises(ValueError, match="fewer"):
        expand_image_pads([1], image_pad_id=9, tokens_per_image=[1])


def test_a_missing_local_model_is_not_looked_up_on_a_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local model directory nor a hub id"):
        load_backbone(str(tmp_path / "no" / "such" / "model"))


@pytest.mark.parametrize("field, value", [("precision", "fp16"), ("attn_implementation", "flash")])
def test_backbone_config_rejects_unknown_values(field, value):
    with pytest.raises(ValueError, match=f"backbone.{field}"):
        BackboneConfig(**{field: value})
