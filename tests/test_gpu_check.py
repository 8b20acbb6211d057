"""The GPU check at tiny width on the CPU (issue 22, item 7): it runs in the fast loop so that it cannot rot.

Every family's cases print as JSON lines; the float32 GradCache comparison
against one plain backward, and the scoring comparison, must pass.
"""

from __future__ import annotations

import json

import torch

from benchmarks import backbones, gpu_check


def test_gpu_check_runs_at_tiny_width_on_the_cpu(capsys):
    status = gpu_check.main(["--tiny", "--device", "cpu"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert status == 0, lines[-1]

    by_case: dict[str, list[dict]] = {}
    for line in lines:
        by_case.setdefault(line["case"], []).append(line)
    families = set(backbones.FAMILIES)
    assert {line["family"] for line in by_case["reference"]} == families
    assert len(by_case["reference"]) == len(by_case["train"]) == 2 * len(families)  # causal and bidirectional
    assert len(by_case["eval"]) == len(families)
    for reference in by_case["reference"]:
        assert reference["gradcache_equal"] and reference["grads_finite_nonzero"] and reference["passed"], reference
        assert abs(reference["loss_gradcache_float32"] - reference["loss_float32"]) <= gpu_check.LOSS_TOLERANCE_EXACT
    for train in by_case["train"]:
        assert train["turns"] == 7 and train["grads_finite"]
        assert train["tokens_per_s"] > 0 and train["model_tflops"] > 0 and train["mfu"] is None  # no peak for a CPU
    for family in families:
        causal, bidirectional = (t["loss"] for t in by_case["train"] if t["family"] == family)
        assert causal != bidirectional, family  # the bidirectional mask reached the attention
    for evaluation in by_case["eval"]:
        assert evaluation["passed"] and evaluation["score_max_error"] <= gpu_check.SCORE_TOLERANCE
        # each query's positive is its 10th best (a pool of 64 random vectors has no ties): rank 10
        assert evaluation["ranks_equal_cpu"] and evaluation["median_positive_rank"] == gpu_check.TOP_K
    assert by_case["summary"] == [lines[-1]] and lines[-1]["passed"]


def test_peak_table_matches_device_names():
    """The dense bf16 peaks (half NVIDIA's "with sparsity" datasheet figures) for the names CUDA reports."""
    assert dict(gpu_check.PEAK_BF16_TFLOPS)["H100"] == 989.4
    names = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.5, "NVIDIA H100 NVL": 835.5, "NVIDIA H200": 989.4}
    for name, peak in names.items():
        assert next(p for key, p in gpu_check.PEAK_BF16_TFLOPS if key in name) == peak, name


def test_flop_count_by_hand():
    """A 2-layer tiny Qwen2-VL: 2 FLOPs per weight per token forward, attention 4*s^2*width per layer."""
    config = backbones.family_config("qwen2_vl", tiny=True)
    vlm = backbones.multimodal_model(backbones.build_model(config, dtype=torch.float32, device="meta"))
    counter = gpu_check.FlopCounter(vlm)
    text = config.get_text_config()
    h, i = text.hidden_size, text.intermediate_size
    per_layer = (h * h + h) + 2 * (h * h // 2 + h // 2) + h * h + 3 * h * i + 2 * h  # 2 heads, 1 KV head
    assert counter.language == 2 * per_layer + h  # + the final norm
    rows = backbones.Sequences(torch.zeros(3, 10, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long))
    assert counter.forward(rows) == 2 * counter.language * 30 + 4 * 3 * 10**2 * (2 * h)
