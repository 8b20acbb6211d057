"""The GPU check: MuCo stage 1 and evaluation scoring on each family's released 2B-class width, random weights.

    python -m benchmarks.gpu_check                        # one GPU, full depth, bf16 (at most ~8 minutes on an H100)
    python -m benchmarks.gpu_check --tiny --device cpu    # the same code at tiny width (the fast test runs this)

Needs only Python, torch, transformers and peft (no DeepSpeed, flash-attn,
Kedro, MLflow, network or weights). For each family in
``published_backbones.json`` it prints one JSON line per case:

- ``reference``: on a small case (the released width cut to 2 decoder layers
  and 2 vision blocks; ``--tiny``: the tiny model) in float32, GradCache's loss
  and gradients against one plain backward (``|dloss| <= 1e-4``, relative
  gradient error ``<= 1e-3``), and the compute dtype's (bf16) against that
  float32 reference (``|dloss| <= 0.05 * max(1, loss)``, gradient cosine
  ``>= 0.99``), causal and bidirectional.
- ``train``: one stage-1 step (K=7 turns, DoRA, SDPA, GradCache chunks),
  causal and bidirectional: tokens/s, model FLOPs utilisation against the
  card's dense bf16 peak, peak memory.
- ``eval``: encoding queries and candidates, then one scoring block (queries
  x candidates, top-k on the device), with the compute dtype's scores against
  float32 (``|dscore| <= 2e-2``; the same best candidate wherever float32's
  margin is above twice that); and evaluation's own scoring path on the
  device (``evaluation.retrieval``: each query's positive ranked in the whole
  pool, the queries shared out over 2 ranks and gathered, as
  ``evaluate.processes`` runs it), whose ranks must equal the CPU's, and its
  top-k in the compute dtype with each short list re-scored in float32
  (``|dscore| <= 1e-4`` against float32's top k).

The last line is a summary; the exit status is 1 if any comparison failed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks import backbones  # first: on a bare checkout it puts src/ on the path for muco_flow
from muco_flow.evaluation.retrieval import QueryShare, chunked_positive_ranks, chunked_top_k

# Dense (no sparsity) bf16 tensor-core peaks, TFLOPS, by a substring of torch.cuda.get_device_name(),
# first match wins. NVIDIA's H100 datasheet: BF16 1,979 (SXM), 1,671 (NVL), 1,513 (PCIe) TFLOPS "with
# sparsity", dense is half; H200 datasheet: 1,979 with sparsity; A100 datasheet: 312 dense.
PEAK_BF16_TFLOPS = (
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("A100", 312.0),
)
LOSS_TOLERANCE_EXACT, GRAD_TOLERANCE_EXACT = 1e-4, 1e-3  # GradCache against one backward, both float32
LOSS_TOLERANCE_LOW, GRAD_COSINE_LOW = 0.05, 0.99  # the compute dtype against float32
SCORE_TOLERANCE = 2e-2
RERANK_TOLERANCE = 1e-4  # float32 scores of the short lists: float32's top k unless a short list missed one
TOP_K = 10
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """GPU: the most allocated since the last reset. CPU: the process's peak resident memory so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


class FlopCounter:
    """Model FLOPs (what the step needs, not what GradCache's extra no-graph forward adds).

    Weights: 2 per parameter per token forward; backward 2 more for the
    activation gradients only (the base weights are frozen; DoRA's own weight
    gradients are under 1% and not counted). Attention scores: 4 * s * width
    per token per softmax-attention layer forward, twice that backward. The
    frozen vision tower runs forward only (no gradient reaches pixels).
    Qwen3.5's recurrent linear-attention state updates are not counted.
    """

    def __init__(self, vlm: nn.Module) -> None:
        language = vlm.language_model
        embedding = language.get_input_embeddings().weight.numel()
        self.language = sum(p.numel() for p in language.parameters()) - embedding
        self.vision = sum(p.numel() for p in vlm.visual.parameters())
        text = vlm.config.get_text_config()
        types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.attention_width = sum(kind != "linear_attention" for kind in types) * text.num_attention_heads * head_dim

    def forward(self, rows: backbones.Sequences) -> float:
        rows_count, length = rows.input_ids.shape
        patches = 0 if rows.pixel_values is None else rows.pixel_values.shape[0]
        text = 2 * self.language * rows_count * length + 4 * rows_count * length**2 * self.attention_width
        return text + 2 * self.vision * patches

    def train_step(self, batch: backbones.Stage1Batch) -> float:
        text_rows = (batch.conversations, batch.answers)
        vision = sum(2 * self.vision * (0 if r.pixel_values is None else r.pixel_values.shape[0]) for r in text_rows)
        return sum(2 * self.forward(r) for r in text_rows) - vision  # backward doubles all but the vision tower


def compare_grads(low: dict[str, torch.Tensor], high: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Relative error ``|low - high| / |high|`` and cosine of all gradients as one vector."""
    a = torch.cat([low[name].flatten() for name in high])
    b = torch.cat([high[name].flatten() for name in high])
    relative = float((a - b).norm() / b.norm().clamp_min(1e-30))
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return relative, cosine


def build_trainable(config: Any, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return backbones.add_dora(backbones.build_model(config, dtype=dtype, device=device))


def reference_cases(family: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Loss and gradients: GradCache against one backward (float32), and the compute dtype against float32."""
    config = backbones.family_config(family, tiny=args.tiny, text_layers=2, vision_depth=2)
    high = build_trainable(config, torch.float32, device)
    low = copy.deepcopy(high).to(DTYPES[args.dtype])
    batch = backbones.synthetic_stage1_batch(
        config,
        conversations=2,
        turns=args.turns,
        image_grid=(4, 4),
        question_tokens=4,
        answer_tokens=3,
        device=device,
    )
    cases = []
    for bidirectional in (False, True):
        loss, grads = backbones.stage1_step(
            backbones.multimodal_model(high), batch, bidirectional=bidirectional, chunk=None
        )
        cached_loss, cached = backbones.stage1_step(
            backbones.multimodal_model(high), batch, bidirectional=bidirectional, chunk=1
        )
        low_loss, low_grads = backbones.stage1_step(
            backbones.multimodal_model(low), batch, bidirectional=bidirectional, chunk=1
        )
        cached_error, _ = compare_grads(cached, grads)
        low_error, low_cosine = compare_grads(low_grads, grads)
        gradcache_equal = abs(cached_loss - loss) <= LOSS_TOLERANCE_EXACT and cached_error <= GRAD_TOLERANCE_EXACT
        dtype_close = abs(low_loss - loss) <= LOSS_TOLERANCE_LOW * max(1.0, abs(loss)) and low_cosine >= GRAD_COSINE_LOW
        finite = all(torch.isfinite(g).all() for g in (*grads.values(), *low_grads.values()))
        nonzero = float(torch.cat([g.flatten() for g in grads.values()]).abs().sum()) > 0
        cases.append(
            {
                "case": "reference",
                "family": family,
                "bidirectional": bidirectional,
                "loss_float32": loss,
                "loss_gradcache_float32": cached_loss,
                f"loss_{args.dtype}": low_loss,
                "grad_relative_error_gradcache": cached_error,
                f"grad_relative_error_{args.dtype}": low_error,
                f"grad_cosine_{args.dtype}": low_cosine,
                "gradcache_equal": gradcache_equal,
                "dtype_close": dtype_close,
                "grads_finite_nonzero": bool(finite and nonzero),
                "passed": bool(gradcache_equal and dtype_close and finite and nonzero),
            }
        )
    del high, low
    return cases


def train_and_eval_cases(family: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    config = backbones.family_config(
        family, tiny=args.tiny, text_layers=args.text_layers, vision_depth=args.vision_depth
    )
    dtype = DTYPES[args.dtype]
    model = build_trainable(config, dtype, device)
    vlm = backbones.multimodal_model(model)
    flops = FlopCounter(vlm)
    peak = peak_tflops(device)
    grid = tuple(args.image_grid)
    batch = backbones.synthetic_stage1_batch(
        config,
        conversations=args.conversations,
        turns=args.turns,
        image_grid=grid,
        question_tokens=args.question_tokens,
        answer_tokens=args.answer_tokens,
        device=device,
    )
    common = {"family": family, "checkpoint": backbones.PUBLISHED[family]["checkpoint"], "dtype": args.dtype}
    shape = {
        "text_layers": config.get_text_config().num_hidden_layers,
        "vision_depth": config.vision_config.depth,
        "hidden_size": config.get_text_config().hidden_size,
    }
    cases = []
    if args.warmup:  # kernels chosen, memory pools grown: not part of the timed step
        backbones.stage1_step(vlm, batch, bidirectional=False, chunk=args.chunk)
    for bidirectional in (False, True):
        reset_peak(device)
        (loss, grads), seconds = timed(
            lambda b=bidirectional: backbones.stage1_step(vlm, batch, bidirectional=b, chunk=args.chunk), device
        )
        step_flops = flops.train_step(batch)
        tokens = batch.text_tokens
        cases.append(
            {
                "case": "train",
                **common,
                **shape,
                "bidirectional": bidirectional,
                "conversations": args.conversations,
                "turns": args.turns,
                "gradcache_chunk": args.chunk,
                "image_tokens": grid[0] * grid[1] // config.vision_config.spatial_merge_size**2,
                "text_tokens": tokens,
                "seconds": seconds,
                "seconds_per_conversation": seconds / args.conversations,
                "tokens_per_s": tokens / seconds,
                "model_tflops": step_flops / 1e12,
                "mfu": None if peak is None else step_flops / seconds / (peak * 1e12),
                "peak_memory_mib": peak_memory_mib(device),
                "loss": loss,
                "grads_finite": all(bool(torch.isfinite(g).all()) for g in grads.values()),
            }
        )
    cases.append(eval_case(vlm, config, flops, peak, args, device, common))
    return cases


def shared_positive_ranks(
    queries: torch.Tensor, pool: torch.Tensor, positives: list[list[int]], device: torch.device, ranks: int = 2
) -> list[list[int]]:
    """Evaluation's ranks, the queries shared out over ``ranks`` ranks (one after another here), on ``device``."""
    parts: list[list[list[int]]] = []
    shares = [QueryShare(r, ranks, lambda mine: parts, device) for r in range(ranks)]
    for share in shares:
        mine = share.part(len(positives))
        parts.append(chunked_positive_ranks(queries[mine], pool, positives[mine], pool_chunk=65536, device=device))
    merged = [share.merged(part) for share, part in zip(shares, parts, strict=True)]
    if any(m != merged[0] for m in merged):
        raise AssertionError("the ranks gathered differ between ranks")
    return merged[0]


def eval_case(
    vlm: nn.Module,
    config: Any,
    flops: FlopCounter,
    peak: float | None,
    args: argparse.Namespace,
    device: torch.device,
    common: dict[str, Any],
) -> dict[str, Any]:
    """Encode queries (image + question) and candidates (answers), then score a queries x pool block, top-k."""
    queries_in = backbones.synthetic_stage1_batch(
        config,
        conversations=args.queries,
        turns=1,
        image_grid=tuple(args.image_grid),
        question_tokens=args.question_tokens,
        answer_tokens=args.answer_tokens,
        device=device,
        seed=1,
    )
    reset_peak(device)
    with torch.inference_mode():
        (queries, candidates), encode_seconds = timed(
            lambda: (
                torch.cat(
                    [backbones.embed(vlm, c, bidirectional=False) for c in queries_in.conversations.chunks(args.chunk)]
                ),
                torch.cat(
                    [backbones.embed(vlm, c, bidirectional=False) for c in queries_in.answers.chunks(args.chunk * 4)]
                ),
            ),
            device,
        )
        encode_flops = flops.forward(queries_in.conversations) + flops.forward(queries_in.answers)
        # the rest of the pool: unit vectors standing for candidates encoded earlier, as evaluation reads them
        generator = torch.Generator(device=device).manual_seed(2)
        filler = torch.randn(args.pool - candidates.shape[0], candidates.shape[1], device=device, generator=generator)
        pool = torch.cat([candidates, torch.nn.functional.normalize(filler, dim=-1)])
        low_queries, low_pool = queries.to(DTYPES[args.dtype]), pool.to(DTYPES[args.dtype])
        score_top_k_warm = backbones.score_top_k(low_queries, low_pool, TOP_K)  # noqa: F841 (kernel selection)
        (low_scores, low_index), score_seconds = timed(
            lambda: backbones.score_top_k(low_queries, low_pool, TOP_K), device
        )
        high_scores, high_index = backbones.score_top_k(queries, pool, TOP_K)
        full = queries @ pool.T
        second = full.topk(2, dim=1).values
        clear = (second[:, 0] - second[:, 1]) > 2 * SCORE_TOLERANCE
        score_error = float((low_scores.float() - high_scores).abs().max())
        same_best = bool((low_index[clear, 0] == high_index[clear, 0]).all())
        # evaluation's path: every query's 10th-best candidate as its positive (rank 10 unless ties), in float32
        positives = [[int(i)] for i in high_index[:, -1].tolist()]
        exact_queries, exact_pool = queries.float(), pool.float()
        device_ranks, rank_seconds = timed(
            lambda: shared_positive_ranks(exact_queries, exact_pool, positives, device), device
        )
        cpu_ranks = chunked_positive_ranks(exact_queries.cpu(), exact_pool.cpu(), positives)
        # evaluation's top-k in the compute dtype, each block's short list scored again in float32
        (rerank_scores, _), rerank_seconds = timed(
            lambda: chunked_top_k(exact_queries, exact_pool, TOP_K, device=device, dtype=DTYPES[args.dtype]), device
        )
        rerank_error = float((rerank_scores - high_scores.float()).abs().max())
    tokens = queries_in.conversations.input_ids.numel() + queries_in.answers.input_ids.numel()
    return {
        "case": "eval",
        **common,
        "queries": args.queries,
        "encoded_candidates": candidates.shape[0],
        "pool": args.pool,
        "top_k": TOP_K,
        "encode_seconds": encode_seconds,
        "encode_tokens_per_s": tokens / encode_seconds,
        "encode_mfu": None if peak is None else encode_flops / encode_seconds / (peak * 1e12),
        "score_seconds": score_seconds,
        "scores_per_s": args.queries * args.pool / score_seconds,
        "peak_memory_mib": peak_memory_mib(device),
        "score_max_error": score_error,
        "queries_with_clear_best": int(clear.sum()),
        "same_best": same_best,
        "rank_seconds": rank_seconds,
        "rerank_seconds": rerank_seconds,
        "rerank_max_error": rerank_error,
        "ranks_equal_cpu": device_ranks == cpu_ranks,
        "median_positive_rank": sorted(r[0] for r in device_ranks)[len(device_ranks) // 2],
        "passed": bool(
            score_error <= SCORE_TOLERANCE
            and same_best
            and device_ranks == cpu_ranks
            and rerank_error <= RERANK_TOLERANCE
        ),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny width and depth (CPU), released structure")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="default bfloat16 (CPU: float32, as CPUs emulate bf16 slowly)",
    )
    parser.add_argument("--families", nargs="+", choices=backbones.FAMILIES, default=list(backbones.FAMILIES))
    parser.add_argument("--text-layers", type=int, default=None, help="cut the decoder (default: released depth)")
    parser.add_argument("--vision-depth", type=int, default=None, help="cut the vision tower (default: released)")
    parser.add_argument("--conversations", type=int, default=None, help="per step (default 16; --tiny 2)")
    parser.add_argument("--turns", type=int, default=7, help="K, MuCo's turns per image")
    parser.add_argument("--chunk", type=int, default=None, help="GradCache chunk, conversations (default 4; --tiny 1)")
    parser.add_argument("--image-grid", type=int, nargs=2, default=None, help="patches (default 32 48; --tiny 4 4)")
    parser.add_argument("--question-tokens", type=int, default=None, help="default 24; --tiny 4")
    parser.add_argument("--answer-tokens", type=int, default=None, help="default 8; --tiny 3")
    parser.add_argument("--queries", type=int, default=None, help="eval queries (default 64; --tiny 4)")
    parser.add_argument("--pool", type=int, default=None, help="eval candidate pool (default 200000; --tiny 64)")
    parser.add_argument("--no-reference", dest="reference", action="store_false", help="skip the reference cases")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="time the first step (--tiny does)")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "float32" if torch.device(args.device).type == "cpu" else "bfloat16"
    args.warmup = args.warmup and not args.tiny
    defaults = {
        "conversations": (2, 16),
        "chunk": (1, 4),
        "image_grid": ([4, 4], [32, 48]),  # 384 image tokens, about MuCo's training images (391)
        "question_tokens": (4, 24),
        "answer_tokens": (3, 8),
        "queries": (4, 64),
        "pool": (64, 200_000),
    }
    for name, (tiny, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and args.tiny:
        # tiny matrices gain nothing from threads, and on a busy machine their barriers cost 10-100x
        torch.set_num_threads(1)
    try:
        return run(args, device)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, device: torch.device) -> int:
    began = time.perf_counter()
    failed = []
    for family in args.families:
        cases = reference_cases(family, args, device) if args.reference else []
        cases += train_and_eval_cases(family, args, device)
        for case in cases:
            case["device"] = device_name(device)
            print(json.dumps(case), flush=True)
            if case.get("passed") is False or case.get("grads_finite") is False:
                failed.append(f"{family} {case['case']}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary = {
        "case": "summary",
        "device": device_name(device),
        "peak_bf16_tflops": peak_tflops(device),
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"), "peft": _version("peft")},
        "seconds": time.perf_counter() - began,
        "failed": failed,
        "passed": not failed,
    }
    print(json.dumps(summary), flush=True)
    return 0 if not failed else 1


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
