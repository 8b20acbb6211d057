"""Each family's released 2B-class model on the CPU: memory and seconds per conversation, one step with DoRA.

    python -m benchmarks.backbone_cpu                       # every family at released depth and width
    python -m benchmarks.backbone_cpu --families qwen3_5    # one of them

The record a GPU check is read against (issue 22, item 5): random weights in
float32 (CPUs emulate bf16 slowly), DoRA on the language model, SDPA, causal,
one forward+backward of MuCo's stage-1 loss over 2 conversations of K=7 turns
(a loss needs another conversation for negatives) in one graph, no GradCache.
Each family runs in a fresh process so that its peak resident memory is its
own. ``--quick`` cuts both depths to 2 (widths kept).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from benchmarks import backbones, common

NAME = "backbone_cpu"
CONVERSATIONS, TURNS = 2, 7
IMAGE_GRID = (8, 8)  # 16 image tokens: the CPU record keeps the vision tower's share small
QUESTION_TOKENS, ANSWER_TOKENS = 8, 4


def measure(settings: dict[str, Any]) -> dict[str, Any]:
    """One family in this process: build, then one timed step."""
    torch.set_num_threads(settings["threads"])
    config = backbones.family_config(
        settings["family"], text_layers=settings["text_layers"], vision_depth=settings["vision_depth"]
    )
    began = time.perf_counter()
    torch.manual_seed(0)
    model = backbones.add_dora(backbones.build_model(config, dtype=torch.float32, device="cpu"))
    build_seconds = time.perf_counter() - began
    vlm = backbones.multimodal_model(model)
    batch = backbones.synthetic_stage1_batch(
        config,
        conversations=CONVERSATIONS,
        turns=TURNS,
        image_grid=IMAGE_GRID,
        question_tokens=QUESTION_TOKENS,
        answer_tokens=ANSWER_TOKENS,
        device="cpu",
    )
    rss_before = common.peak_rss_mib()
    began = time.perf_counter()
    loss, grads = backbones.stage1_step(vlm, batch, bidirectional=False, chunk=None)
    seconds = time.perf_counter() - began
    text = config.get_text_config()
    return {
        "family": settings["family"],
        "checkpoint": backbones.PUBLISHED[settings["family"]]["checkpoint"],
        "text_layers": text.num_hidden_layers,
        "vision_depth": config.vision_config.depth,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "text_tokens": batch.text_tokens,
        "build_seconds": build_seconds,
        "step_seconds": seconds,
        "seconds_per_conversation": seconds / CONVERSATIONS,
        "peak_rss_mib": common.peak_rss_mib(),
        "rss_before_step_mib": rss_before,
        "loss": loss,
        "grads_finite": all(bool(torch.isfinite(g).all()) for g in grads.values()),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    depth = 2 if args.quick else None
    results = []
    for family in args.families:
        settings = {"family": family, "text_layers": depth, "vision_depth": depth, "threads": args.threads}
        results.append(common.run_fresh_process(f"benchmarks.{NAME}", "--child", json.dumps(settings)))
    goals = [
        common.goal(
            "every family's step gives finite gradients",
            "all",
            ", ".join(f"{r['family']} {'yes' if r['grads_finite'] else 'no'}" for r in results),
            all(r["grads_finite"] for r in results),
        )
    ]
    parameters = {
        "conversations": CONVERSATIONS,
        "turns": TURNS,
        "image_tokens": IMAGE_GRID[0] * IMAGE_GRID[1] // 4,
        "question_tokens": QUESTION_TOKENS,
        "answer_tokens": ANSWER_TOKENS,
        "precision": "fp32",
        "threads": args.threads,
        "depth": "2 (quick)" if args.quick else "released",
    }
    return {"parameters": parameters, "results": results, "goals": goals}


def table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["family", "checkpoint", "layers (text/vision)", "parameters", "s per conversation", "peak RSS GiB"]
    rows = [
        [
            r["family"],
            r["checkpoint"],
            f"{r['text_layers']}/{r['vision_depth']}",
            f"{r['parameters'] / 1e9:.2f} B",
            f"{r['seconds_per_conversation']:.1f}",
            f"{r['peak_rss_mib'] / 1024:.1f}",
        ]
        for r in document["results"]
    ]
    return headers, rows


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--families", nargs="+", choices=backbones.FAMILIES, default=list(backbones.FAMILIES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    common.write_and_print(args.out, NAME, run(args), table)


if __name__ == "__main__":
    main()
