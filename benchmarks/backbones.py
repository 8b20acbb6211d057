"""Released 2B-class backbones at real width with random weights, and MuCo's stage-1 step on them.

The configurations are data (``published_backbones.json``: each family's
released config.json values that set parameter shapes, the published
parameter count, and where each came from). Models are built through
transformers' own classes, chosen by ``model_type`` (``AutoConfig.for_model``,
``AutoModelForImageTextToText``), so a family is one entry in that file.

Only torch, transformers, peft and ``muco_flow.modeling.loss`` (pure torch)
are imported: ``benchmarks.gpu_check`` must run on a GPU machine where
nothing else is installed. That is also why the stage-1 step is written here
in its minimum form (DoRA through peft, the bidirectional masks, GradCache)
instead of through ``muco_flow.modeling.embedder``, which imports the
tokenizer, image and Kedro-side settings code.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

try:
    from muco_flow.modeling.loss import multi_turn_contrastive_loss
except ImportError:  # a bare checkout on a GPU machine: muco_flow is not installed, its source is beside us
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from muco_flow.modeling.loss import multi_turn_contrastive_loss

PUBLISHED: dict[str, dict[str, Any]] = {
    family: entry
    for family, entry in json.loads((Path(__file__).with_name("published_backbones.json")).read_text()).items()
    if not family.startswith("_")
}
FAMILIES = tuple(PUBLISHED)

# --tiny: every family at a width a CPU trains in a second. Qwen2(-2.5)-VL derive
# head_dim from hidden/heads and their M-RoPE sections need head_dim 128; Qwen3.5 keeps 256.
TINY_TEXT = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 4096,
    "bos_token_id": None,
    "eos_token_id": None,
}
# with the small vocabulary, the vision placeholders move to its top rows (below <|emb|>'s)
TINY_TOKEN_IDS = {
    "vision_start_token_id": 4091,
    "vision_end_token_id": 4092,
    "image_token_id": 4093,
    "video_token_id": 4094,
}
TINY_LINEAR_ATTENTION = {
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 2,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 256}
TINY_VISION_QWEN2_VL = {"embed_dim": 32, "num_heads": 2, "hidden_size": 256}  # Qwen2-VL names the widths differently
TINY_DEPTH = 2

# MuCo's DoRA targets (conf/base training.embedder.lora.target_modules), plus Qwen3.5's
# linear-attention projections, which are that family's attention layers.
LORA_TARGETS = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|in_proj_qkv|in_proj_z|out_proj)$"
)
LORA_RANK, LORA_ALPHA = 16, 64


def family_config(
    family: str, *, tiny: bool = False, text_layers: int | None = None, vision_depth: int | None = None
) -> PretrainedConfig:
    """The family's released configuration; optionally tiny width, or depths cut (widths kept).

    A cut keeps every layer type the full model has (Qwen3.5: linear and full
    attention) and deepstack taps inside the cut vision tower.
    """
    entry = PUBLISHED[family]
    text, vision = dict(entry["text_config"]), dict(entry["vision_config"])
    if tiny:
        text.update(TINY_TEXT)
        if "linear_num_key_heads" in text:
            text.update(TINY_LINEAR_ATTENTION)
        vision.update(TINY_VISION_QWEN2_VL if "embed_dim" in vision else TINY_VISION)
        text_layers, vision_depth = text_layers or TINY_DEPTH, vision_depth or TINY_DEPTH
    full_types = getattr(AutoConfig.for_model(family, text_config=text).get_text_config(), "layer_types", None) or []
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
        kinds = list(dict.fromkeys(full_types))
        if len(kinds) > 1:
            text["layer_types"] = [kinds[i % len(kinds)] for i in range(text_layers)]
    if vision_depth is not None:
        vision["depth"] = vision_depth
        taps = vision.get("deepstack_visual_indexes") or []
        if any(tap >= vision_depth for tap in taps):
            vision["deepstack_visual_indexes"] = list(range(min(len(taps), vision_depth)))
    return AutoConfig.for_model(
        family,
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=entry["tie_word_embeddings"],
        **(TINY_TOKEN_IDS if tiny else {}),
    )


def build_model(config: PretrainedConfig, *, dtype: torch.dtype, device: str | torch.device) -> PreTrainedModel:
    """Random weights, SDPA attention, on ``device``, in ``dtype``."""
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return model.eval()


def multimodal_model(model: nn.Module) -> nn.Module:
    """The Qwen*Model inside (vision tower + language model, no LM head), under any peft wrapping."""
    for module in model.modules():
        if hasattr(module, "compute_3d_position_ids") and hasattr(module, "language_model"):
            return module
    raise TypeError(f"{type(model).__name__} holds no multimodal model with compute_3d_position_ids")


def add_dora(model: PreTrainedModel) -> nn.Module:
    """MuCo's DoRA (r 16, alpha 64) on the language model; everything else frozen. No dropout: reproducible."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    return get_peft_model(
        model,
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, use_dora=True, target_modules=LORA_TARGETS),
    )


@dataclass
class Sequences:
    """Equal-length unpadded token rows (so a bidirectional mask needs no padding), optionally with images."""

    input_ids: torch.Tensor  # [n, s]
    emb_positions: torch.Tensor  # [n, m]: where each row's m <|emb|> tokens are
    pixel_values: torch.Tensor | None = None  # [n * patches, C*T*P*P]
    image_grid_thw: torch.Tensor | None = None  # [n, 3]

    def chunks(self, rows: int) -> Iterator[Sequences]:
        per_image = 0 if self.pixel_values is None else self.pixel_values.shape[0] // self.input_ids.shape[0]
        for start in range(0, self.input_ids.shape[0], rows):
            stop = min(start + rows, self.input_ids.shape[0])
            yield Sequences(
                self.input_ids[start:stop],
                self.emb_positions[start:stop],
                None if self.pixel_values is None else self.pixel_values[start * per_image : stop * per_image],
                None if self.image_grid_thw is None else self.image_grid_thw[start:stop],
            )


@dataclass
class Stage1Batch:
    """MuCo stage 1: each conversation (one image, K question turns) gives K queries; each answer is a target."""

    conversations: Sequences  # [B, s], K <|emb|> per row
    answers: Sequences  # [B*K, a], one <|emb|> per row
    turns: int

    @property
    def text_tokens(self) -> int:
        return self.conversations.input_ids.numel() + self.answers.input_ids.numel()


def synthetic_stage1_batch(
    config: PretrainedConfig,
    *,
    conversations: int,
    turns: int,
    image_grid: tuple[int, int],
    question_tokens: int,
    answer_tokens: int,
    device: str | torch.device,
    seed: int = 0,
) -> Stage1Batch:
    """Random text in MuCo's layout: <vision_start> image <vision_end>, then K x (question <|emb|> answer).

    Token ids are drawn from the ordinary vocabulary; the last row of the
    embedding matrix stands for MuCo's added ``<|emb|>`` token.
    """
    generator = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    merge = vision.spatial_merge_size
    height, width = image_grid
    image_tokens = height * width // merge**2
    emb_id = config.get_text_config().vocab_size - 1

    def words(rows: int, length: int) -> torch.Tensor:
        return torch.randint(100, min(100_000, emb_id - 100), (rows, length), generator=generator)

    def column(rows: int, value: int) -> torch.Tensor:
        return torch.full((rows, 1), value)

    parts = [column(conversations, config.vision_start_token_id)]
    parts += [column(conversations, config.image_token_id)] * image_tokens
    parts += [column(conversations, config.vision_end_token_id)]
    emb_columns = []
    for _ in range(turns):
        parts.append(words(conversations, question_tokens))
        emb_columns.append(sum(p.shape[1] for p in parts))
        parts += [column(conversations, emb_id), words(conversations, answer_tokens)]
    input_ids = torch.cat(parts, dim=1)
    patch_values = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixel_values = torch.randn(conversations * height * width, patch_values, generator=generator)
    answers = torch.cat([words(conversations * turns, answer_tokens), column(conversations * turns, emb_id)], dim=1)
    return Stage1Batch(
        conversations=Sequences(
            input_ids.to(device),
            torch.tensor([emb_columns] * conversations, device=device),
            pixel_values.to(device),
            torch.tensor([[1, height, width]] * conversations, device=device),
        ),
        answers=Sequences(answers.to(device), torch.full((conversations * turns, 1), answer_tokens, device=device)),
        turns=turns,
    )


def set_bidirectional(vlm: nn.Module, bidirectional: bool) -> None:
    """Language-model attention causal or not (SDPA and flash-attention read ``is_causal``)."""
    for module in vlm.language_model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = not bidirectional


def embed(vlm: nn.Module, rows: Sequences, *, bidirectional: bool) -> torch.Tensor:
    """L2-normalised float32 hidden states at each row's <|emb|> positions, row-major ([n*m, d])."""
    input_ids = rows.input_ids
    dtype = next(vlm.parameters()).dtype
    mask = torch.ones_like(input_ids)
    mm_token_type_ids = (input_ids == vlm.config.image_token_id).int()
    inputs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "mm_token_type_ids": mm_token_type_ids,
        "pixel_values": None if rows.pixel_values is None else rows.pixel_values.to(dtype),
        "image_grid_thw": rows.image_grid_thw,
    }
    if bidirectional:
        # as muco_flow's embedder: a prepared mask per layer type replaces the causal one, so the
        # positions the model would compute from the 2D mask are computed here
        shape_only = torch.empty(*input_ids.shape, 1, dtype=dtype, device=input_ids.device)
        text_config = vlm.config.get_text_config()
        # never None (no "skip, SDPA is bidirectional without a mask"): a None would make the model build its causal one
        full = create_bidirectional_mask(
            config=text_config, inputs_embeds=shape_only, attention_mask=mask, allow_is_bidirectional_skip=False
        )
        inputs["position_ids"] = vlm.compute_3d_position_ids(
            input_ids=input_ids,
            inputs_embeds=shape_only,
            image_grid_thw=rows.image_grid_thw,
            video_grid_thw=None,
            past_key_values=None,
            attention_mask=mask,
            mm_token_type_ids=mm_token_type_ids,
        )
        layer_types = getattr(text_config, "layer_types", None)
        # a 4D mask is taken as prepared; models with layer types take one per type. Linear attention
        # (Qwen3.5's Gated DeltaNet) is recurrent: its mask only marks padding, and there is none.
        inputs["attention_mask"] = (
            full
            if layer_types is None
            else {kind: None if kind == "linear_attention" else full for kind in set(layer_types)}
        )
    set_bidirectional(vlm, bidirectional)
    hidden = vlm(**inputs).last_hidden_state
    index = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(rows.emb_positions)
    return F.normalize(hidden[index.reshape(-1), rows.emb_positions.reshape(-1)].float(), dim=-1)


def stage1_loss(queries: torch.Tensor, targets: torch.Tensor, turns: int) -> torch.Tensor:
    return multi_turn_contrastive_loss(queries, targets, turns)


def stage1_step(
    vlm: nn.Module, batch: Stage1Batch, *, bidirectional: bool, chunk: int | None
) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward+backward of MuCo's stage-1 loss; the loss and each trainable parameter's gradient (float32).

    ``chunk`` None: the whole batch in one graph. Otherwise GradCache: the
    embeddings are computed without a graph ``chunk`` conversations (and
    ``chunk * K`` answers) at a time, the loss's gradient with respect to them
    is taken, and each chunk is encoded again with its graph and back-propagated
    with that gradient, so memory is bounded by the chunk, not the batch.
    """
    trainable = {name: p for name, p in vlm.named_parameters() if p.requires_grad}
    for parameter in trainable.values():
        parameter.grad = None
    if chunk is None:
        loss = stage1_loss(
            embed(vlm, batch.conversations, bidirectional=bidirectional),
            embed(vlm, batch.answers, bidirectional=bidirectional),
            batch.turns,
        )
        loss.backward()
    else:
        conversation_chunks = list(batch.conversations.chunks(chunk))
        answer_chunks = list(batch.answers.chunks(chunk * batch.turns))
        with torch.no_grad():
            queries = torch.cat([embed(vlm, c, bidirectional=bidirectional) for c in conversation_chunks])
            targets = torch.cat([embed(vlm, c, bidirectional=bidirectional) for c in answer_chunks])
        queries.requires_grad_(True)
        targets.requires_grad_(True)
        loss = stage1_loss(queries, targets, batch.turns)
        loss.backward()
        for chunks, cached in ((conversation_chunks, queries.grad), (answer_chunks, targets.grad)):
            assert cached is not None
            start = 0
            for piece in chunks:
                embedded = embed(vlm, piece, bidirectional=bidirectional)
                (embedded * cached[start : start + embedded.shape[0]]).sum().backward()
                start += embedded.shape[0]
    grads = {
        name: torch.zeros(p.shape) if p.grad is None else p.grad.detach().float().cpu() for name, p in trainable.items()
    }
    return float(loss.detach()), grads


def score_top_k(queries: torch.Tensor, candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation's scoring block: every query against every candidate, the k best per query, on their device."""
    scores = queries @ candidates.T
    return scores.topk(min(k, candidates.shape[0]), dim=1)
