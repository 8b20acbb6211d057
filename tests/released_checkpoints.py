"""Model directories laid out as the released checkpoints are, at tiny width.

Written file by file with ``tokenizers`` and ``safetensors`` (never through
transformers' ``save_pretrained``), so loading them tests muco-flow against
the published layouts, not against its own writer.

``Qwen/Qwen2-VL-2B-Instruct`` (the files as published on the hub):
  config.json                       legacy flat layout: text fields at the top level,
                                    ``vision_config`` nested, ``rope_scaling: {type: mrope}``,
                                    ``tie_word_embeddings: true`` (so no ``lm_head.weight``),
                                    ``vocab_size`` 151936 > the tokenizer's 151657 tokens
  generation_config.json
  chat_template.json                and the same template in tokenizer_config.json
  tokenizer.json, vocab.json, merges.txt, tokenizer_config.json
                                    Qwen's 14 special tokens right after the BPE vocabulary
                                    (<|endoftext|> 151643 ... <|video_pad|> 151656)
  preprocessor_config.json          Qwen2VLImageProcessor, min_pixels 3136, max_pixels 12845056
  model-0000N-of-00002.safetensors  legacy key names: model.embed_tokens.weight,
  model.safetensors.index.json      model.layers.N.*, model.norm.weight, visual.blocks.N.*,
                                    visual.merger.*, visual.patch_embed.proj.weight

``naver-ai/MuCo-2B``: what naver-ai/muco ``src/merge.py`` writes — the LoRA merged
into full weights (``save_pretrained`` of transformers 4.52.3: legacy key names,
a config with nested ``text_config`` whose every ``model_type`` merge.py rewrites
to ``qwen2_vl``, ``architectures`` naming its CustomQwen2VLForConditionalGeneration),
and the processor saved after ``<|emb|>`` and ``<|mask|>`` were added: they
follow <|video_pad|> (151657, 151658), inside the padded embedding matrix,
whose rows at those ids were trained.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
MUCO_ADDED_TOKENS = ("<|emb|>", "<|mask|>")

# Qwen2's pre-tokenizer split (tokenizer.json of the Qwen2 family).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2-VL-2B-Instruct's chat template (chat_template.json and tokenizer_config.json).
QWEN_INSTRUCT_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "a red circle on a white background",
    "How many shapes are in the picture? There are three blue squares.",
    "Represent the given image for classification",
    "Find me an everyday image that matches the given caption:",
    "What color is the triangle? green yellow purple orange",
] * 4


def _bpe_tokenizer(bpe_vocab_size: int, added: tuple[str, ...]) -> Tokenizer:
    """Byte-level BPE shaped as Qwen2's tokenizer.json, ``added`` special tokens after the vocabulary."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    return tokenizer


def _added_tokens_decoder(tokenizer: Tokenizer, added: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in added
    }


def _write_tokenizer(directory: Path, tokenizer: Tokenizer, added: tuple[str, ...], extra: dict[str, Any]) -> None:
    tokenizer.save(str(directory / "tokenizer.json"))
    vocab_file, merges_file = tokenizer.model.save(str(directory))
    assert Path(vocab_file).name == "vocab.json" and Path(merges_file).name == "merges.txt"
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(tokenizer, added),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        **extra,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _weights(preset: dict[str, Any], vocab_rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every tensor of Qwen2-VL under the key names of the published safetensors."""
    text, vision = preset["text"], preset["vision"]
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    head_dim = hidden // text["num_attention_heads"]
    q_out, kv_out = text["num_attention_heads"] * head_dim, text["num_key_value_heads"] * head_dim
    embed, mlp = vision["embed_dim"], vision["embed_dim"] * vision["mlp_ratio"]
    merged = embed * 4  # spatial_merge_size 2: four patches per merged token

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.05).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(vocab_rows, hidden), "model.norm.weight": ones(hidden)}
    for i in range(text["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": ones(hidden),
            p + "post_attention_layernorm.weight": ones(hidden),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "self_attn.q_proj.weight": rand(q_out, hidden),
            p + "self_attn.q_proj.bias": rand(q_out),
            p + "self_attn.k_proj.weight": rand(kv_out, hidden),
            p + "self_attn.k_proj.bias": rand(kv_out),
            p + "self_attn.v_proj.weight": rand(kv_out, hidden),
            p + "self_attn.v_proj.bias": rand(kv_out),
            p + "self_attn.o_proj.weight": rand(hidden, q_out),
        }
    for i in range(vision["depth"]):
        p = f"visual.blocks.{i}."
        tensors |= {
            p + "norm1.weight": ones(embed),
            p + "norm1.bias": rand(embed),
            p + "norm2.weight": ones(embed),
            p + "norm2.bias": rand(embed),
            p + "attn.qkv.weight": rand(3 * embed, embed),
            p + "attn.qkv.bias": rand(3 * embed),
            p + "attn.proj.weight": rand(embed, embed),
            p + "attn.proj.bias": rand(embed),
            p + "mlp.fc1.weight": rand(mlp, embed),
            p + "mlp.fc1.bias": rand(mlp),
            p + "mlp.fc2.weight": rand(embed, mlp),
            p + "mlp.fc2.bias": rand(embed),
        }
    tensors |= {
        "visual.patch_embed.proj.weight": rand(embed, 3, 2, 14, 14),
        "visual.merger.ln_q.weight": ones(embed),
        "visual.merger.ln_q.bias": rand(embed),
        "visual.merger.mlp.0.weight": rand(merged, merged),
        "visual.merger.mlp.0.bias": rand(merged),
        "visual.merger.mlp.2.weight": rand(hidden, merged),
        "visual.merger.mlp.2.bias": rand(hidden),
    }
    return tensors


def _write_sharded(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Two shards as the hub has them: the vision tower and most layers in the first, the rest in the second."""
    names = sorted(tensors)
    second = {n for n in names if n == "model.norm.weight" or n.startswith("model.layers.3.")}
    shards = {
        "model-00001-of-00002.safetensors": {n: tensors[n] for n in names if n not in second},
        "model-00002-of-00002.safetensors": {n: tensors[n] for n in names if n in second},
    }
    weight_map = {}
    for file_name, shard in shards.items():
        save_file({n: t.contiguous() for n, t in shard.items()}, str(directory / file_name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file_name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _flat_text_fields(preset: dict[str, Any], vocab_rows: int, ids: dict[str, int]) -> dict[str, Any]:
    text = preset["text"]
    return {
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": text["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": text["intermediate_size"],
        "max_position_embeddings": 32768,
        "max_window_layers": text["num_hidden_layers"],
        "num_attention_heads": text["num_attention_heads"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_key_value_heads": text["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_rows,
    }


def _vision_fields(preset: dict[str, Any]) -> dict[str, Any]:
    vision = preset["vision"]
    return {
        "depth": vision["depth"],
        "embed_dim": vision["embed_dim"],
        "mlp_ratio": vision["mlp_ratio"],
        "num_heads": vision["num_heads"],
        "in_chans": 3,
        "hidden_size": preset["text"]["hidden_size"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    }


def _token_id_fields(ids: dict[str, int]) -> dict[str, int]:
    return {
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }


def _preprocessor_config(min_pixels: int, max_pixels: int) -> dict[str, Any]:
    return {
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }


def _padded(n: int, multiple: int = 64) -> int:
    """Qwen pads its embedding matrix past the tokenizer (151936 rows for 151657 tokens)."""
    return int(math.ceil(n / multiple) * multiple)


def write_qwen2_vl_instruct(
    directory: Path, preset: dict[str, Any], *, bpe_vocab_size: int = 320, pad_vocab: bool = True, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A ``Qwen/Qwen2-VL-2B-Instruct``-shaped directory; returns the tensors written, by stored key."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _bpe_tokenizer(bpe_vocab_size, QWEN_SPECIAL_TOKENS)
    ids = {t: tokenizer.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
    size = tokenizer.get_vocab_size()
    vocab_rows = _padded(size) if pad_vocab else size
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        **_flat_text_fields(preset, vocab_rows, ids),
        **_token_id_fields(ids),
        "model_type": "qwen2_vl",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "vision_config": _vision_fields(preset),
        "rope_scaling": {"type": "mrope", "mrope_section": list(preset["text"]["mrope_section"])},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    generation = {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "repetition_penalty": 1.05,
        "temperature": 0.1,
        "top_k": 1,
        "top_p": 0.001,
        "transformers_version": "4.37.0",
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_INSTRUCT_CHAT_TEMPLATE}, indent=2))
    _write_tokenizer(
        directory,
        tokenizer,
        QWEN_SPECIAL_TOKENS,
        {"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:]), "chat_template": QWEN_INSTRUCT_CHAT_TEMPLATE},
    )
    (directory / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(3136, 12845056), indent=2))
    tensors = _weights(preset, vocab_rows, torch.Generator().manual_seed(seed))
    _write_sharded(directory, tensors)
    return tensors


def write_muco(
    directory: Path, preset: dict[str, Any], *, bpe_vocab_size: int = 320, seed: int = 1
) -> dict[str, torch.Tensor]:
    """A ``naver-ai/MuCo-2B``-shaped directory (merged weights, <|emb|>/<|mask|> present)."""
    directory.mkdir(parents=True, exist_ok=True)
    added = (*QWEN_SPECIAL_TOKENS, *MUCO_ADDED_TOKENS)
    tokenizer = _bpe_tokenizer(bpe_vocab_size, added)
    ids = {t: tokenizer.token_to_id(t) for t in added}
    vocab_rows = _padded(tokenizer.get_vocab_size())
    flat = _flat_text_fields(preset, vocab_rows, ids)
    text_config = {
        **flat,
        "rope_scaling": {
            "type": "default",
            "rope_type": "default",
            "mrope_section": list(preset["text"]["mrope_section"]),
        },
        "model_type": "qwen2_vl",  # merge.py's fix_model_type rewrites "qwen2_vl_text"
        "torch_dtype": "bfloat16",
    }
    config = {
        "architectures": ["CustomQwen2VLForConditionalGeneration"],
        **flat,
        **_token_id_fields(ids),
        "model_type": "qwen2_vl",
        "text_config": text_config,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.52.3",
        "vision_config": {**_vision_fields(preset), "model_type": "qwen2_vl", "torch_dtype": "bfloat16"},
        "rope_scaling": text_config["rope_scaling"],
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    # the processor's save: the template as chat_template.jinja, the eval-time pixel limits
    (directory / "chat_template.jinja").write_text(QWEN_INSTRUCT_CHAT_TEMPLATE)
    # add_special_tokens({'additional_special_tokens': [...]}) replaced the list in transformers 4.52
    _write_tokenizer(directory, tokenizer, added, {"additional_special_tokens": list(MUCO_ADDED_TOKENS)})
    (directory / "preprocessor_config.json").write_text(
        json.dumps(_preprocessor_config(28 * 28 * 256, 28 * 28 * 1280), indent=2)
    )
    tensors = _weights(preset, vocab_rows, torch.Generator().manual_seed(seed))
    _write_sharded(directory, tensors)
    return tensors
