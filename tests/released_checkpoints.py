"""Model directories laid out as the released checkpoints are, at tiny width.

Written file by file with ``tokenizers`` and ``safetensors`` (never through
transformers' ``save_pretrained``), so loading them tests muco-flow against
the published layouts, not against its own writer.

One writer, ``write_release(directory, family, preset)``, writes each family's
released 2B-class repository (``RELEASES``; benchmarks/published_backbones.json
cites the same repositories) at the width of that family's tiny preset:

``Qwen/Qwen2-VL-2B-Instruct`` and ``Qwen/Qwen2.5-VL-3B-Instruct``
  config.json                       legacy flat layout: text fields at the top level,
                                    ``vision_config`` nested, ``rope_scaling: {type: mrope}``,
                                    ``tie_word_embeddings: true`` (so no ``lm_head.weight``),
                                    ``vocab_size`` 151936 > the tokenizer's tokens
  generation_config.json, chat_template.json (and the template in tokenizer_config.json)
  tokenizer.json, vocab.json, merges.txt, tokenizer_config.json
                                    Qwen's special tokens right after the BPE vocabulary
                                    (<|endoftext|> 151643 ... <|video_pad|> 151656; Qwen2.5
                                    adds <tool_call> ... <|file_sep|> up to 151664)
  preprocessor_config.json          Qwen2VLImageProcessor, min_pixels 3136, max_pixels 12845056
  model-0000N-of-00002.safetensors  legacy key names: model.embed_tokens.weight,
  model.safetensors.index.json      model.layers.N.*, model.norm.weight, visual.blocks.N.*,
                                    visual.merger.*, visual.patch_embed.proj.weight

``Qwen/Qwen3-VL-2B-Instruct`` and ``Qwen/Qwen3.5-0.8B``
  config.json                       nested ``text_config`` (Qwen3-VL: ``rope_scaling`` with
                                    ``mrope_interleaved`` and a separate ``rope_theta``, as
                                    transformers 4.57 wrote it; Qwen3.5: ``rope_parameters``,
                                    ``layer_types`` of Gated DeltaNet and gated full attention,
                                    ``mtp_num_hidden_layers: 1``), tied embeddings
  tokenizer files                   Qwen3's 26 added tokens (to </think> 151668); Qwen3.5's
                                    33 (from <|endoftext|> 248044 to <|audio_pad|> 248076) and
                                    its own pre-tokenizer split (``\\p{M}`` joins letters)
  preprocessor_config.json          ``size: {shortest_edge: 65536, longest_edge: 16777216}``,
                                    patch 16, merge 2, mean/std 0.5; video_preprocessor_config.json
  chat_template.json (Qwen3-VL) / chat_template.jinja (Qwen3.5)
  weights                           current key names: model.language_model.*, model.visual.*
                                    (pos_embed, deepstack_merger_list for Qwen3-VL), and for
                                    Qwen3.5 the multi-token-prediction head ``mtp.*``, which
                                    transformers does not load (``_keys_to_ignore_on_load_unexpected``)

Where the names come from: the legacy names are those transformers 5.23 maps
for ``Qwen2VLForConditionalGeneration`` (conversion_mapping.py:
``^visual`` -> ``model.visual``, ``^model`` -> ``model.language_model``), which
``Qwen2_5_VLForConditionalGeneration`` shares (its ``Qwen2VLForConditionalGeneration``
alias there); Qwen3-VL and Qwen3.5 have no conversion entry, so their released
names are the modules' own (``model.visual.deepstack_merger_list.0.norm.weight``,
``model.language_model.layers.0.linear_attn.in_proj_qkv.weight`` ... as the
published ``model.safetensors.index.json`` files list them), and
``Qwen3_5Model._keys_to_ignore_on_load_unexpected = [r"^mtp.*"]`` is the MTP
head those files carry (``mtp.fc``, ``mtp.pre_fc_norm_{embedding,hidden}``,
``mtp.norm``, ``mtp.layers.0.*``). Module structure per family:
``models/<model_type>/modeling_*.py``. The config.json fields are those of the
published files (Qwen2.5-VL-3B's and Qwen3-VL-2B's as transcribed in public
projects, Qwen3.5-0.8B's as benchmarks/published_backbones.json cites it), the
added-token order that of the released tokenizer_config.json files (Qwen3.5's
33 as public Qwen3.5-family tokenizer listings give them), the preprocessor
files verbatim. Not reproduced: the full chat templates (tools, thinking) and
generation settings, which muco-flow never reads.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX as QWEN3_5_SPLIT_PATTERN

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
# Added after <|video_pad|> by Qwen2.5 (tool calls, fill-in-the-middle, repository
# tokens) and Qwen3 (tool responses, thinking); stored with "special": false.
QWEN2_5_TEXT_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN3_TEXT_TOKENS = (*QWEN2_5_TEXT_TOKENS, "<tool_response>", "</tool_response>", "<think>", "</think>")
# Qwen3.5's audio and speech tokens after </think> (248070 ... 248076), special.
QWEN3_5_AUDIO_TOKENS = (
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
)
MUCO_ADDED_TOKENS = ("<|emb|>", "<|mask|>")

# Qwen2's pre-tokenizer split (tokenizer.json of the Qwen2, Qwen2.5 and Qwen3 families).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2-VL-2B-Instruct's chat template (chat_template.json and tokenizer_config.json);
# Qwen2.5-VL-3B-Instruct publishes the same one.
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
# The part of Qwen3-VL's and Qwen3.5's templates that lays out a conversation
# (no default system prompt; the published files add tools and thinking,
# which muco-flow never renders: it formats text with its own templates).
QWEN3_INSTRUCT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CLIP_NORMALISATION = {
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
HALF_NORMALISATION = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


@dataclass(frozen=True)
class Release:
    """What one family's released repository holds, where the families differ."""

    repo: str
    architecture: str
    text_tokens: tuple[str, ...]  # added after Qwen's 14 special tokens, "special": false
    extra_special_tokens: tuple[str, ...]  # added after those, "special": true
    split_pattern: str
    legacy_names: bool  # model.layers.* / visual.* rather than model.language_model.* / model.visual.*
    chat_template: str
    chat_template_file: str  # chat_template.json (a JSON object) or chat_template.jinja
    preprocessor: dict[str, Any]
    tokenizer_extra: dict[str, Any]
    model_max_length: int
    transformers_version: str

    @property
    def added_tokens(self) -> tuple[str, ...]:
        return (*QWEN_SPECIAL_TOKENS, *self.text_tokens, *self.extra_special_tokens)


def _qwen2_preprocessor(processor_class: str) -> dict[str, Any]:
    return {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        **CLIP_NORMALISATION,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": processor_class,
    }


# Qwen3-VL's and Qwen3.5's preprocessor_config.json (the same in both): limits as ``size``
_QWEN3_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    **HALF_NORMALISATION,
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}

RELEASES: dict[str, Release] = {
    "qwen2_vl": Release(
        repo="Qwen/Qwen2-VL-2B-Instruct",
        architecture="Qwen2VLForConditionalGeneration",
        text_tokens=(),
        extra_special_tokens=(),
        split_pattern=QWEN_SPLIT_PATTERN,
        legacy_names=True,
        chat_template=QWEN_INSTRUCT_CHAT_TEMPLATE,
        chat_template_file="chat_template.json",
        preprocessor=_qwen2_preprocessor("Qwen2VLProcessor"),
        tokenizer_extra={"chat_template": QWEN_INSTRUCT_CHAT_TEMPLATE},
        model_max_length=32768,
        transformers_version="4.41.2",
    ),
    "qwen2_5_vl": Release(
        repo="Qwen/Qwen2.5-VL-3B-Instruct",
        architecture="Qwen2_5_VLForConditionalGeneration",
        text_tokens=QWEN2_5_TEXT_TOKENS,
        extra_special_tokens=(),
        split_pattern=QWEN_SPLIT_PATTERN,
        legacy_names=True,
        chat_template=QWEN_INSTRUCT_CHAT_TEMPLATE,
        chat_template_file="chat_template.json",
        preprocessor=_qwen2_preprocessor("Qwen2_5_VLProcessor"),
        tokenizer_extra={"chat_template": QWEN_INSTRUCT_CHAT_TEMPLATE},
        model_max_length=131072,
        transformers_version="4.41.2",
    ),
    "qwen3_vl": Release(
        repo="Qwen/Qwen3-VL-2B-Instruct",
        architecture="Qwen3VLForConditionalGeneration",
        text_tokens=QWEN3_TEXT_TOKENS,
        extra_special_tokens=(),
        split_pattern=QWEN_SPLIT_PATTERN,
        legacy_names=False,
        chat_template=QWEN3_INSTRUCT_CHAT_TEMPLATE,
        chat_template_file="chat_template.json",
        preprocessor=_QWEN3_PREPROCESSOR,
        tokenizer_extra={},
        model_max_length=262144,
        transformers_version="4.57.0.dev0",
    ),
    "qwen3_5": Release(
        repo="Qwen/Qwen3.5-0.8B",
        architecture="Qwen3_5ForConditionalGeneration",
        text_tokens=QWEN3_TEXT_TOKENS,
        extra_special_tokens=QWEN3_5_AUDIO_TOKENS,
        split_pattern=QWEN3_5_SPLIT_PATTERN,
        legacy_names=False,
        chat_template=QWEN3_INSTRUCT_CHAT_TEMPLATE,
        chat_template_file="chat_template.jinja",
        preprocessor=_QWEN3_PREPROCESSOR,
        # the hub file names Qwen2Tokenizer, which transformers overrides for qwen3_5
        # (tokenization_auto.py's MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)
        tokenizer_extra={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "processor_class": "Qwen3VLProcessor",
        },
        model_max_length=262144,
        transformers_version="5.2.0.dev0",  # not established here (transformers does not read it)
    ),
}

CORPUS = [
    "a red circle on a white background",
    "How many shapes are in the picture? There are three blue squares.",
    "Represent the given image for classification",
    "Find me an everyday image that matches the given caption:",
    "What color is the triangle? green yellow purple orange",
] * 4


def _bpe_tokenizer(
    bpe_vocab_size: int,
    added: tuple[str, ...],
    split_pattern: str = QWEN_SPLIT_PATTERN,
    text_tokens: tuple[str, ...] = (),
) -> Tokenizer:
    """Byte-level BPE shaped as Qwen's tokenizer.json, ``added`` tokens after the vocabulary in that order."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    for token in added:  # one at a time: the ids follow the order given
        tokenizer.add_tokens([AddedToken(token, special=token not in text_tokens, normalized=False)])
    return tokenizer


def _added_tokens_decoder(
    tokenizer: Tokenizer, added: tuple[str, ...], text_tokens: tuple[str, ...] = ()
) -> dict[str, dict[str, Any]]:
    return {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t not in text_tokens,
        }
        for t in added
    }


def _write_tokenizer(
    directory: Path,
    tokenizer: Tokenizer,
    added: tuple[str, ...],
    extra: dict[str, Any],
    text_tokens: tuple[str, ...] = (),
    model_max_length: int = 32768,
) -> None:
    tokenizer.save(str(directory / "tokenizer.json"))
    vocab_file, merges_file = tokenizer.model.save(str(directory))
    assert Path(vocab_file).name == "vocab.json" and Path(merges_file).name == "merges.txt"
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(tokenizer, added, text_tokens),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        **extra,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _text_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's fields: the nested ``text_config``, or the top level of a flat config."""
    return config.get("text_config", config)


def _rotary_sections(preset: dict[str, Any]) -> dict[str, Any]:
    text = preset["text"]
    return {k: text[k] for k in ("mrope_section", "mrope_interleaved", "partial_rotary_factor") if k in text}


def _text_shape(preset: dict[str, Any]) -> dict[str, Any]:
    """The preset's text fields that are config.json fields as released (rotary sections aside)."""
    return {k: v for k, v in preset["text"].items() if k not in _rotary_sections(preset)}


def _weights(model_type: str, config: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every tensor of ``config``'s model under the key names of the family's published safetensors.

    Shapes follow the config.json written beside them (so the files fit it), modules
    follow each family's modeling_*.py in transformers 5.23.
    """
    text, vision = _text_fields(config), config["vision_config"]
    release = RELEASES[model_type]
    text_prefix, vision_prefix = (
        ("model.", "visual.") if release.legacy_names else ("model.language_model.", "model.visual.")
    )
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text.get("head_dim", hidden // heads)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.05).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    def linear(name: str, out_features: int, in_features: int, bias: bool) -> dict[str, torch.Tensor]:
        return {name + ".weight": rand(out_features, in_features)} | (
            {name + ".bias": rand(out_features)} if bias else {}
        )

    def norm(name: str, n: int, bias: bool) -> dict[str, torch.Tensor]:
        return {name + ".weight": ones(n)} | ({name + ".bias": rand(n)} if bias else {})

    def full_attention(p: str) -> dict[str, torch.Tensor]:
        if model_type in ("qwen2_vl", "qwen2_5_vl"):  # Qwen2: biased q/k/v, no q/k norms
            return (
                linear(p + "q_proj", heads * head_dim, hidden, True)
                | linear(p + "k_proj", kv_heads * head_dim, hidden, True)
                | linear(p + "v_proj", kv_heads * head_dim, hidden, True)
                | linear(p + "o_proj", hidden, heads * head_dim, False)
            )
        gate = 2 if text.get("attn_output_gate") else 1  # Qwen3.5's q_proj also yields the output gate
        return (
            linear(p + "q_proj", gate * heads * head_dim, hidden, False)
            | linear(p + "k_proj", kv_heads * head_dim, hidden, False)
            | linear(p + "v_proj", kv_heads * head_dim, hidden, False)
            | linear(p + "o_proj", hidden, heads * head_dim, False)
            | norm(p + "q_norm", head_dim, False)
            | norm(p + "k_norm", head_dim, False)
        )

    def gated_delta_net(p: str) -> dict[str, torch.Tensor]:  # Qwen3.5's linear-attention layers
        key_dim = text["linear_num_key_heads"] * text["linear_key_head_dim"]
        value_heads = text["linear_num_value_heads"]
        value_dim = value_heads * text["linear_value_head_dim"]
        conv_dim = 2 * key_dim + value_dim
        return (
            linear(p + "in_proj_qkv", conv_dim, hidden, False)
            | linear(p + "in_proj_z", value_dim, hidden, False)
            | linear(p + "in_proj_b", value_heads, hidden, False)
            | linear(p + "in_proj_a", value_heads, hidden, False)
            | {p + "conv1d.weight": rand(conv_dim, 1, text.get("linear_conv_kernel_dim", 4))}
            | {p + "dt_bias": ones(value_heads), p + "A_log": rand(value_heads)}
            | norm(p + "norm", text["linear_value_head_dim"], False)
            | linear(p + "out_proj", hidden, value_dim, False)
        )

    def decoder_layer(p: str, layer_type: str) -> dict[str, torch.Tensor]:
        mixer = (
            gated_delta_net(p + "linear_attn.")
            if layer_type == "linear_attention"
            else full_attention(p + "self_attn.")
        )
        return (
            mixer
            | norm(p + "input_layernorm", hidden, False)
            | norm(p + "post_attention_layernorm", hidden, False)
            | linear(p + "mlp.gate_proj", inter, hidden, False)
            | linear(p + "mlp.up_proj", inter, hidden, False)
            | linear(p + "mlp.down_proj", hidden, inter, False)
        )

    layer_types = text.get("layer_types", ["full_attention"] * text["num_hidden_layers"])
    tensors = {text_prefix + "embed_tokens.weight": rand(text["vocab_size"], hidden)} | norm(
        text_prefix + "norm", hidden, False
    )
    for i, layer_type in enumerate(layer_types):
        tensors |= decoder_layer(f"{text_prefix}layers.{i}.", layer_type)
    if text.get("mtp_num_hidden_layers"):  # Qwen3.5's multi-token-prediction head: one full-attention layer
        tensors |= linear("mtp.fc", hidden, 2 * hidden, False) | decoder_layer("mtp.layers.0.", "full_attention")
        for name in ("mtp.norm", "mtp.pre_fc_norm_embedding", "mtp.pre_fc_norm_hidden"):
            tensors |= norm(name, hidden, False)
    return tensors | _vision_weights(model_type, vision, vision_prefix, hidden, rand, norm, linear)


def _vision_weights(
    model_type: str, vision: dict[str, Any], p: str, text_hidden: int, rand: Any, norm: Any, linear: Any
) -> dict[str, torch.Tensor]:
    """The vision tower's tensors: Qwen2-VL (LayerNorm, fc1/fc2), Qwen2.5-VL (RMSNorm, gated MLP),
    Qwen3-VL and Qwen3.5 (learned position embedding, linear_fc1/2 and, for Qwen3-VL, deepstack mergers)."""
    patch = vision["patch_size"]
    if model_type == "qwen2_vl":
        width, mlp = vision["embed_dim"], vision["embed_dim"] * vision["mlp_ratio"]
    else:
        width, mlp = vision["hidden_size"], vision["intermediate_size"]
    merged = width * vision["spatial_merge_size"] ** 2
    rms = model_type == "qwen2_5_vl"  # Qwen2.5-VL's vision norms are RMSNorm: no bias
    tensors = {p + "patch_embed.proj.weight": rand(width, 3, vision["temporal_patch_size"], patch, patch)}
    for i in range(vision["depth"]):
        b = f"{p}blocks.{i}."
        tensors |= norm(b + "norm1", width, not rms) | norm(b + "norm2", width, not rms)
        tensors |= linear(b + "attn.qkv", 3 * width, width, True) | linear(b + "attn.proj", width, width, True)
        if model_type == "qwen2_vl":
            tensors |= linear(b + "mlp.fc1", mlp, width, True) | linear(b + "mlp.fc2", width, mlp, True)
        elif model_type == "qwen2_5_vl":
            tensors |= linear(b + "mlp.gate_proj", mlp, width, True) | linear(b + "mlp.up_proj", mlp, width, True)
            tensors |= linear(b + "mlp.down_proj", width, mlp, True)
        else:
            tensors |= linear(b + "mlp.linear_fc1", mlp, width, True) | linear(b + "mlp.linear_fc2", width, mlp, True)
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return (
            tensors
            | norm(p + "merger.ln_q", width, not rms)
            | linear(p + "merger.mlp.0", merged, merged, True)
            | linear(p + "merger.mlp.2", text_hidden, merged, True)
        )
    tensors |= {
        p + "patch_embed.proj.bias": rand(width),
        p + "pos_embed.weight": rand(vision["num_position_embeddings"], width),
    }
    mergers = [(p + "merger.", width)]
    mergers += [
        (f"{p}deepstack_merger_list.{i}.", merged) for i in range(len(vision.get("deepstack_visual_indexes", [])))
    ]
    for name, norm_width in mergers:  # the deepstack mergers norm after the 2 x 2 merge, the final one before it
        tensors |= norm(name + "norm", norm_width, True)
        tensors |= linear(name + "linear_fc1", merged, merged, True) | linear(
            name + "linear_fc2", text_hidden, merged, True
        )
    return tensors


def _write_sharded(directory: Path, tensors: dict[str, torch.Tensor], text_prefix: str, last_layer: int) -> None:
    """Two shards as the hub has them: the vision tower and most layers in the first, the rest in the second."""
    names = sorted(tensors)
    second = {
        n for n in names if n == text_prefix + "norm.weight" or n.startswith(f"{text_prefix}layers.{last_layer}.")
    }
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
    text = _text_shape(preset)
    return {
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "max_window_layers": text["num_hidden_layers"],
        **text,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_rows,
    }


def _vision_fields(preset: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-VL's vision_config (its ``hidden_size`` is the language model's width)."""
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


def _release_config(model_type: str, preset: dict[str, Any], vocab_rows: int, ids: dict[str, int]) -> dict[str, Any]:
    """config.json as the family's release has it, at the preset's width."""
    release = RELEASES[model_type]
    head = {"architectures": [release.architecture]}
    tail = {"model_type": model_type, "torch_dtype": "bfloat16", "transformers_version": release.transformers_version}
    text_width = preset["text"]["hidden_size"]
    rotary = _rotary_sections(preset)
    if model_type == "qwen2_vl":
        return {
            **head,
            **_flat_text_fields(preset, vocab_rows, ids),
            **_token_id_fields(ids),
            **tail,
            "vision_config": _vision_fields(preset),
            "rope_scaling": {"type": "mrope", "mrope_section": rotary["mrope_section"]},
        }
    if model_type == "qwen2_5_vl":
        vision = {
            "hidden_act": "silu",
            "in_chans": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            **preset["vision"],
            "out_hidden_size": text_width,
        }
        return {
            **head,
            **_flat_text_fields(preset, vocab_rows, ids),
            **_token_id_fields(ids),
            **tail,
            "vision_config": vision,
            "rope_scaling": {"type": "mrope", "mrope_section": rotary["mrope_section"]},
        }
    # Qwen3-VL and Qwen3.5: nested text_config, vision_config with its own model_type
    text: dict[str, Any] = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "dtype": "bfloat16",
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 262144,
        **_text_shape(preset),
        "model_type": f"{model_type}_text",
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": vocab_rows,
    }
    if model_type == "qwen3_vl":  # transformers 4.57's spelling: rope_scaling, rope_theta beside it
        text |= {"rope_scaling": {**rotary, "rope_type": "default"}, "rope_theta": 5000000}
    else:  # Qwen3.5: rope_parameters; 3 Gated DeltaNet layers, then one gated full-attention layer
        interval = 4
        layers = text["num_hidden_layers"]
        text |= {
            "attn_output_gate": True,
            "full_attention_interval": interval,
            "layer_types": ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)],
            "linear_conv_kernel_dim": 4,
            "mamba_ssm_dtype": "float32",
            "mtp_num_hidden_layers": 1,
            "mtp_use_dedicated_embeddings": False,
            "pad_token_id": None,
            "rope_parameters": {**rotary, "rope_theta": 10000000, "rope_type": "default"},
        }
    vision = {
        "deepstack_visual_indexes": [],
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "initializer_range": 0.02,
        "model_type": model_type,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        **preset["vision"],
        "out_hidden_size": text_width,
    }
    return {
        **head,
        "image_token_id": ids["<|image_pad|>"],
        **tail,
        "text_config": text,
        "tie_word_embeddings": True,
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": vision,
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
    }


def _padded(n: int, multiple: int = 64) -> int:
    """Qwen pads its embedding matrix past the tokenizer (151936 rows for 151657 tokens)."""
    return int(math.ceil(n / multiple) * multiple)


def write_release(
    directory: Path,
    family: str,
    preset: dict[str, Any],
    *,
    bpe_vocab_size: int = 320,
    pad_vocab: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``family``'s released checkpoint (``RELEASES``) at ``preset``'s width; returns the tensors written, by key.

    ``preset`` is that family's resolved tiny preset (``family_preset``).
    """
    release = RELEASES[family]
    directory.mkdir(parents=True, exist_ok=True)
    added = release.added_tokens
    tokenizer = _bpe_tokenizer(bpe_vocab_size, added, release.split_pattern, release.text_tokens)
    ids = {t: tokenizer.token_to_id(t) for t in added}
    size = tokenizer.get_vocab_size()
    vocab_rows = _padded(size) if pad_vocab else size
    config = _release_config(family, preset, vocab_rows, ids)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    generation = {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "transformers_version": release.transformers_version,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if release.chat_template_file.endswith(".json"):
        (directory / release.chat_template_file).write_text(json.dumps({"chat_template": release.chat_template}))
    else:
        (directory / release.chat_template_file).write_text(release.chat_template)
    _write_tokenizer(
        directory,
        tokenizer,
        added,
        {"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:]), **release.tokenizer_extra},
        release.text_tokens,
        release.model_max_length,
    )
    (directory / "preprocessor_config.json").write_text(json.dumps(release.preprocessor, indent=2))
    if "size" in release.preprocessor:  # Qwen3-VL and Qwen3.5 ship a video processor beside it
        video = {**release.preprocessor, "size": {"longest_edge": 25165824, "shortest_edge": 4096}}
        video["video_processor_type"] = "Qwen3VLVideoProcessor"
        del video["image_processor_type"]
        (directory / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    tensors = _weights(family, config, torch.Generator().manual_seed(seed))
    text_prefix = "model." if release.legacy_names else "model.language_model."
    _write_sharded(directory, tensors, text_prefix, _text_fields(config)["num_hidden_layers"] - 1)
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
    preprocessor = {
        **_qwen2_preprocessor("Qwen2VLProcessor"),
        "min_pixels": 28 * 28 * 256,
        "max_pixels": 28 * 28 * 1280,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    tensors = _weights("qwen2_vl", config, torch.Generator().manual_seed(seed))
    _write_sharded(directory, tensors, "model.", flat["num_hidden_layers"] - 1)
    return tensors
