"""Each family's released 2B-class configuration, built at real width (issue 22, item 5).

Parameter counts per decoder layer and per vision block are computed here by
hand from the configuration (the shapes transformers' modeling files declare),
not by the model, and the full-depth model must total the published count of
the released safetensors. Then two training steps and one evaluation scoring
step at real width with both depths cut to 2.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import backbones

FAMILIES = backbones.FAMILIES


def decoder_layer_parameters(family: str, text, layer_type: str) -> int:
    """One decoder layer's parameters, from the configuration alone."""
    h, inter = text.hidden_size, text.intermediate_size
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    mlp_and_norms = 3 * h * inter + 2 * h  # gate/up/down without bias; input and post-attention RMSNorm
    if family in ("qwen2_vl", "qwen2_5_vl"):  # Qwen2: q/k/v with bias, o without, head_dim = h / heads
        d = h // heads
        return (h * heads * d + heads * d) + 2 * (h * kv * d + kv * d) + heads * d * h + mlp_and_norms
    d = text.head_dim
    norms = 2 * d  # q_norm, k_norm
    if family == "qwen3_vl":
        return h * heads * d + 2 * h * kv * d + heads * d * h + norms + mlp_and_norms
    if layer_type == "full_attention":  # Qwen3.5: q_proj also emits the output gate
        return h * heads * d * 2 + 2 * h * kv * d + heads * d * h + norms + mlp_and_norms
    # Qwen3.5 Gated DeltaNet: q, k, v in one projection, then z, b, a; a depthwise conv over q, k, v
    keys = text.linear_num_key_heads * text.linear_key_head_dim
    values = text.linear_num_value_heads * text.linear_value_head_dim
    value_heads = text.linear_num_value_heads
    projections = h * (2 * keys + values) + h * values + 2 * h * value_heads + values * h
    conv = (2 * keys + values) * text.linear_conv_kernel_dim
    per_head = 2 * value_heads + text.linear_value_head_dim  # dt_bias, A_log; the gated RMSNorm
    return projections + conv + per_head + mlp_and_norms


def vision_block_parameters(family: str, vision) -> int:
    """One vision block's parameters: attention (qkv, proj, with bias), MLP, two norms."""
    if family == "qwen2_vl":
        e = vision.embed_dim
        m = e * vision.mlp_ratio
        return 4 * e + (3 * e * e + 3 * e) + (e * e + e) + (e * m + m) + (m * e + e)  # LayerNorms
    e, inter = vision.hidden_size, vision.intermediate_size
    attention = (3 * e * e + 3 * e) + (e * e + e)
    if family == "qwen2_5_vl":  # RMSNorms; a gated MLP with bias
        return 2 * e + attention + 2 * (e * inter + inter) + (inter * e + e)
    return 4 * e + attention + (e * inter + inter) + (inter * e + e)  # LayerNorms; fc1, fc2


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_released_width_has_the_published_parameter_counts(family):
    cut = backbones.family_config(family, text_layers=2, vision_depth=2)
    with torch.device("meta"):
        model = backbones.multimodal_model(backbones.build_model(cut, dtype=torch.bfloat16, device="meta"))
    text, vision = cut.get_text_config(), cut.vision_config
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * 2
    for layer, kind in zip(model.language_model.layers, kinds, strict=True):
        assert count(layer) == decoder_layer_parameters(family, text, kind), (family, kind)
    for block in model.visual.blocks:
        assert count(block) == vision_block_parameters(family, vision), family
    if family == "qwen3_5":
        assert kinds == ["linear_attention", "full_attention"]  # the cut keeps both kinds of layer

    full = backbones.family_config(family)
    released = backbones.build_model(full, dtype=torch.bfloat16, device="meta")
    assert count(released) == backbones.PUBLISHED[family]["published_parameters"]
    assert full.get_text_config().vocab_size >= 151_936


@pytest.fixture
def one_thread():
    """One torch thread: small matrices gain nothing from two, and on a busy machine pay for the barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# qwen3_5 is the quickest at real width (about 20 s); the others run with `pytest --every-family` (about 4 minutes)
@pytest.mark.slow
@pytest.mark.parametrize(
    "family", [f if f == "qwen3_5" else pytest.param(f, marks=pytest.mark.every_family) for f in FAMILIES]
)
def test_released_width_trains_and_scores_on_cpu(family, one_thread):
    """Real width, 2 decoder layers and 2 vision blocks: two optimizer steps (finite gradients, the loss moves),
    then scoring."""
    config = backbones.family_config(family, text_layers=2, vision_depth=2)
    torch.manual_seed(0)
    model = backbones.add_dora(backbones.build_model(config, dtype=torch.float32, device="cpu"))
    vlm = backbones.multimodal_model(model)
    batch = backbones.synthetic_stage1_batch(
        config, conversations=2, turns=7, image_grid=(4, 4), question_tokens=3, answer_tokens=2, device="cpu"
    )
    trainable = [p for p in vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    losses = []
    for _ in range(2):
        loss, grads = backbones.stage1_step(vlm, batch, bidirectional=True, chunk=1)
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert any(g.abs().sum() > 0 for g in grads.values())
        losses.append(loss)
        optimizer.step()
    assert losses[1] != losses[0]

    with torch.inference_mode():
        queries = backbones.embed(vlm, batch.conversations, bidirectional=False)  # [B*K, d]
        candidates = backbones.embed(vlm, batch.answers, bidirectional=False)
        scores, index = backbones.score_top_k(queries, candidates, k=3)
    assert queries.shape == (2 * 7, config.get_text_config().hidden_size)
    assert torch.allclose(queries.norm(dim=1), torch.ones(14), atol=1e-5)
    assert index.shape == (14, 3)
    assert torch.equal(scores[:, 0], (queries @ candidates.T).max(dim=1).values)
