"""Multi-turn against single-turn training throughput, against the bound the arithmetic sets.

    python -m benchmarks.training_throughput

The same images and the same query/target pairs are trained on in both modes:
multi-turn puts each image's K pairs in one conversation (one forward pass
per side), single-turn gives each pair its own conversation (K passes, the
image in each). A step is a full training step (both sides forward, the
multi-turn contrastive loss, backward, DeepSpeed's optimizer step) on the
tiny backbone with the training configuration (DoRA on the language model,
ZeRO-2, fp32), one process. All configurations are timed round-robin, so that
a slow spell on a shared machine hits all of them alike; ratios are taken
within each round, then summarized.

The ideal ratio is what token counting allows: the training FLOPs of one
step's work in single-turn mode over the same pairs' in multi-turn mode,

    FLOPs = (LM tokens) x (FLOPs per LM token) + (vision patches) x (FLOPs per patch)

with LM tokens counted without padding on both sides (query and target),
vision patches as the vision tower sees them, and the per-token costs from the
weights each token passes through (``per_token_training_flops``). Left out:
attention scores, whose cost grows with sequence length (multi-turn's
sequences are longer), padding, and fixed costs per step or per image, so the
measured ratio can land on either side of the ideal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from benchmarks import common, workload

NAME = "training_throughput"
GOAL_TURNS = 7
GOAL_FRACTION = 0.85


@dataclass(frozen=True)
class Work:
    """What one step processes: LM tokens (both sides, no padding) and vision patches."""

    lm_tokens: int
    vision_patches: int

    def flops(self, cost: dict[str, float]) -> float:
        return self.lm_tokens * cost["lm_token"] + self.vision_patches * cost["vision_patch"]


def batch_work(batch: Any) -> Work:
    lm_tokens = int(batch.query["attention_mask"].sum() + batch.target["attention_mask"].sum())
    return Work(lm_tokens, int(batch.query["image_grid_thw"].prod(dim=-1).sum()))


def padded_work(batch: Any) -> Work:
    """The work as the model sees it: every row padded to the batch's longest."""
    lm_tokens = batch.query["input_ids"].numel() + batch.target["input_ids"].numel()
    return Work(lm_tokens, int(batch.query["image_grid_thw"].prod(dim=-1).sum()))


def ideal_ratio(single_turn: Work, multi_turn: Work, cost: dict[str, float]) -> float:
    """Training FLOPs of the single-turn step over the multi-turn step's, for the same pairs."""
    return single_turn.flops(cost) / multi_turn.flops(cost)


def _weight_flops(module: nn.Module, *, backward_through: bool) -> float:
    """Per-token FLOPs of ``module``'s linear and convolution weights in one training step.

    2 forward; 2 more for the input gradient when the backward pass runs
    through the module; 2 more for the weight gradient of weights that train.
    """
    total = 0.0
    for layer in module.modules():
        if isinstance(layer, nn.Linear | nn.Conv3d):
            per_weight = 2 + 2 * backward_through + 2 * layer.weight.requires_grad
            total += per_weight * layer.weight.numel()
    return total


def per_token_training_flops(embedder: Any) -> dict[str, float]:
    """FLOPs of one LM token and of one vision patch in a training step.

    The language model is backpropagated through (LoRA in every layer, the
    added token rows below them); the vision tower is frozen and nothing before
    it trains, so it runs forward only. Its merger runs once per merge_size²
    patches.
    """
    vlm = embedder.vlm
    visual = vlm.visual
    merge = visual.spatial_merge_size**2
    vision = (
        _weight_flops(visual.patch_embed, backward_through=False)
        + _weight_flops(visual.blocks, backward_through=False)
        + _weight_flops(visual.merger, backward_through=False) / merge
    )
    return {"lm_token": _weight_flops(vlm.language_model, backward_through=True), "vision_patch": vision}


def run(args: Any) -> dict[str, Any]:
    common.set_threads(args.threads)
    params = common.load_parameters()
    training = params["training"]
    images_per_step = args.images or training["micro_batch_size"]
    samples, originals = workload.sample_images(args.sample, images_per_step)
    workload.start_process_group()
    embedder = workload.training_embedder(params, args.backbone)
    engine = workload.training_engine(embedder, training)
    cost = per_token_training_flops(embedder)

    configurations: list[dict[str, Any]] = []
    for side in args.image_sides:
        images, processor = workload.square_images(originals, side, args.backbone)
        for turns in args.turns:
            paired = workload.paired_batches(
                samples,
                images,
                turns=turns,
                embedder=embedder,
                image_processor=processor,
                format_params=params["format"],
            )
            for mode, batch in paired.items():
                if turns == 1 and mode == "multi_turn":
                    continue  # at K=1 both modes are one batch: one conversation of one turn per image
                configurations.append({"side": side, "mode": mode, "turns": turns, "batch": batch, "seconds": []})

    started = time.perf_counter()
    for round_index in range(args.warmup + args.repeats):
        for configuration in configurations:
            began = time.perf_counter()
            workload.training_step(engine, configuration["batch"], training)
            if round_index >= args.warmup:
                configuration["seconds"].append(time.perf_counter() - began)
        timed_rounds = round_index + 1 - args.warmup
        if timed_rounds >= min(3, args.repeats) and time.perf_counter() - started > args.budget:
            break

    results = [_measurement(c) for c in configurations]
    comparisons = _comparisons(configurations, cost)
    goals = [
        common.goal(
            f"{c['image_side']} px images ({c['image_tokens']} tokens): K={GOAL_TURNS} reaches "
            f"{GOAL_FRACTION:.0%} of the ideal ratio",
            f">= {GOAL_FRACTION:.2f}",
            f"{c['fraction_of_ideal']:.2f}",
            c["fraction_of_ideal"] >= GOAL_FRACTION,
        )
        for c in comparisons
        if c["turns"] == GOAL_TURNS
    ]
    parameters = {
        "backbone": str(args.backbone),
        "images_per_step": images_per_step,
        "image_sides": args.image_sides,
        "turns": args.turns,
        "warmup_rounds": args.warmup,
        "repeats": args.repeats,
        "budget_seconds": args.budget,
        "threads": args.threads,
        "processes": 1,
        "precision": training["precision"],
        "deepspeed_config": training["deepspeed"]["config"],
        "embedder": training["embedder"],
        "flops_per_lm_token": cost["lm_token"],
        "flops_per_vision_patch": cost["vision_patch"],
        "weighting": "training FLOPs per token from the weights it passes through: 2 forward, +2 input gradient "
        "where backward runs through (LM only), +2 weight gradient where the weight trains (LoRA, DoRA); "
        "attention scores and padding left out",
    }
    return {"parameters": parameters, "results": results + comparisons, "goals": goals}


def side_tokens(side: int) -> int:
    """LLM tokens of a side x side image: one per 28 x 28 pixels (14 px patches, merged 2 x 2)."""
    return (side // 28) ** 2


def _measurement(configuration: dict[str, Any]) -> dict[str, Any]:
    batch, seconds = configuration["batch"], configuration["seconds"]
    work = batch_work(batch)
    return {
        "kind": "step",
        "image_side": configuration["side"],
        "image_tokens": side_tokens(configuration["side"]),
        "mode": configuration["mode"],
        "turns": configuration["turns"],
        "pairs_per_step": batch.pairs,
        "conversations_per_step": len(batch.conversation_ids),
        "lm_tokens": work.lm_tokens,
        "lm_tokens_with_padding": padded_work(batch).lm_tokens,
        "vision_patches": work.vision_patches,
        "step_seconds": common.summarize(seconds),
        "pairs_per_second": common.rates(batch.pairs, seconds),
    }


def _per_round_pairs_per_second(configuration: dict[str, Any]) -> list[float]:
    return [configuration["batch"].pairs / s for s in configuration["seconds"]]


def _comparisons(configurations: list[dict[str, Any]], cost: dict[str, float]) -> list[dict[str, Any]]:
    by_key = {(c["side"], c["mode"], c["turns"]): c for c in configurations}
    comparisons = []
    for (side, mode, turns), configuration in by_key.items():
        if mode != "single_turn":
            continue
        multi = by_key.get((side, "multi_turn", turns), configuration)  # K=1: the same batch
        single_work, multi_work = batch_work(configuration["batch"]), batch_work(multi["batch"])
        multi_rate = _per_round_pairs_per_second(multi)
        single_rate = _per_round_pairs_per_second(configuration)
        measured = common.summarize([m / s for m, s in zip(multi_rate, single_rate, strict=True)])
        ideal = ideal_ratio(single_work, multi_work, cost)
        comparison = {
            "kind": "multi_over_single",
            "image_side": side,
            "image_tokens": side_tokens(side),
            "turns": turns,
            "measured_ratio": measured,
            "ideal_ratio": ideal,
            "ideal_ratio_with_padding": ideal_ratio(
                padded_work(configuration["batch"]), padded_work(multi["batch"]), cost
            ),
            "lm_token_ratio": single_work.lm_tokens / multi_work.lm_tokens,
            "vision_patch_ratio": single_work.vision_patches / multi_work.vision_patches,
            "fraction_of_ideal": measured["median"] / ideal,
        }
        baseline = by_key.get((side, "single_turn", 1))
        if baseline is not None:
            k1_rate = _per_round_pairs_per_second(baseline)
            comparison["multi_turn_over_k1"] = common.summarize(
                [m / b for m, b in zip(multi_rate, k1_rate, strict=True)]
            )
        comparisons.append(comparison)
    return comparisons


def table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    steps = {(r["image_side"], r["mode"], r["turns"]): r for r in document["results"] if r["kind"] == "step"}
    headers = [
        "image px (tokens)",
        "K",
        "single-turn pairs/s",
        "multi-turn pairs/s",
        "multi-turn / K=1",
        "multi / single",
        "ideal",
        "of ideal",
    ]
    rows = []
    for c in (r for r in document["results"] if r["kind"] == "multi_over_single"):
        side, turns = c["image_side"], c["turns"]
        single = steps[(side, "single_turn", turns)]
        multi = steps.get((side, "multi_turn", turns), single)  # K=1: one batch for both
        rows.append(
            [
                f"{side} ({c['image_tokens']})",
                str(turns),
                common.spread(single["pairs_per_second"]),
                common.spread(multi["pairs_per_second"]),
                common.spread(c["multi_turn_over_k1"], 2) if "multi_turn_over_k1" in c else "",
                common.spread(c["measured_ratio"], 2),
                f"{c['ideal_ratio']:.2f}",
                f"{c['fraction_of_ideal']:.0%}",
            ]
        )
    return headers, rows


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--sample", type=Path, default=common.SAMPLE_DIR)
    parser.add_argument("--backbone", type=Path, default=common.TINY_BACKBONE_DIR)
    parser.add_argument("--image-sides", type=int, nargs="+", default=[56, 224], help="pixels; multiples of 28")
    parser.add_argument("--turns", type=int, nargs="+", default=[1, 3, 7])
    parser.add_argument("--images", type=int, default=None, help="images per step (default: training.micro_batch_size)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds of timed rounds after which to stop")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_sides, args.turns, args.images, args.warmup, args.repeats = [56], [1, 3], 2, 0, 1
    if any(side % 28 for side in args.image_sides):
        parser.error("--image-sides must be multiples of 28")
    common.write_and_print(args.out, NAME, run(args), table)


if __name__ == "__main__":
    main()
