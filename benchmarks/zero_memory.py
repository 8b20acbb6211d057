"""Per-rank bytes of parameters, gradients and optimizer state under ZeRO stages 0-3, from the engine.

    python -m benchmarks.zero_memory

Two processes (gloo, CPU, fp32, torch's AdamW, as training runs here) each
build the tiny embedder with the training configuration and, per stage, a
fresh DeepSpeed engine that takes one full training step on real batches.
The bytes are those of the tensors the engine and its optimizer hold, each
storage counted once:

- parameters: the module's parameters (under stage 3, the rank's partition
  plus any whole copy it keeps), including the frozen backbone;
- gradients: the most gradient storage held at once, sampled as each
  parameter's gradient is accumulated and once backward is done: ``.grad``
  and ZeRO's partitioned gradient buffers, without the reduce bucket;
- reduce bucket: ZeRO's buffer for reducing gradients; its size is the
  config's ``reduce_bucket_size``, not the model's;
- optimizer state: Adam's two moments;
- fp32 master: the fp32 copy of its partition that ZeRO's optimizer steps,
  which it keeps even when training is fp32.

Theory, with P trainable and F frozen parameters, N ranks, 4 bytes a value:

    stage   parameters       gradients   optimizer state   fp32 master
    0       4(P+F)           4P          8P                0
    1       4(P+F)           4P          8P/N              4P/N
    2       4(P+F)           4P/N        8P/N              4P/N
    3       4(P+F)/N + 4S    4P/N        8P/N              4P/N

where S counts the parameters that stage 3 keeps whole on every rank besides
their partition: those under ``stage3_param_persistence_threshold`` values.
Stage 0 uses the ZeRO-1 template with the stage set to 0. Stage 3 runs twice:
with conf/base/deepspeed/zero3.json as it is (threshold 100k: on the tiny
model every parameter is under it), and with the threshold at 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks import common, workload

NAME = "zero_memory"
BYTES_PER_VALUE = 4
ADAM_STATES = 2
NO_PERSISTENCE = "3-nopersist"
STAGES = ("0", "1", "2", "3", NO_PERSISTENCE)
THEORY_CATEGORIES = ("parameters", "gradients", "optimizer_state", "fp32_master")
CATEGORIES = (*THEORY_CATEGORIES, "reduce_bucket", "other")


def theoretical_bytes(
    stage: int, trainable: int, frozen: int, world_size: int, persistent: int = 0
) -> dict[str, float]:
    """Per-rank bytes of each category that ZeRO's partitioning predicts (fp32, Adam).

    ``persistent``: under stage 3, the parameters small enough to stay whole
    on every rank as well (below ``stage3_param_persistence_threshold``).
    """
    n = world_size
    whole = trainable + frozen
    return {
        "parameters": BYTES_PER_VALUE * (whole / n + persistent if stage >= 3 else whole),
        "gradients": BYTES_PER_VALUE * trainable / (n if stage >= 2 else 1),
        "optimizer_state": ADAM_STATES * BYTES_PER_VALUE * trainable / (n if stage >= 1 else 1),
        "fp32_master": BYTES_PER_VALUE * trainable / n if stage >= 1 else 0.0,
    }


def _category(path: str) -> str:
    """Which category a tensor found at ``path`` (an attribute path in the engine) belongs to."""
    if path.startswith("optimizer_state"):
        return "optimizer_state"
    if "ipg" in path:  # DeepSpeed's "independent partition gradient" buckets
        return "reduce_bucket"
    if "grad_norm" in path:
        return "other"
    if "grad" in path:
        return "gradients"
    if "fp32" in path:
        return "fp32_master"
    if path.startswith("module.") or any(n in path for n in ("bit16_groups_flat", "fp16_partitioned", "persistent")):
        return "parameters"
    return "other"


def _collect(obj: Any, path: str, seen: set[int], found: dict[str, int], depth: int = 0) -> None:
    """Adds the bytes of every tensor storage reachable from ``obj`` not yet ``seen`` to ``found[path]``."""
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "ds_tensor"):  # a ZeRO-3 parameter: its partition lives apart from its data
            _collect(obj.ds_tensor, path + ".ds_tensor", seen, found, depth + 1)
        storage = obj.untyped_storage()
        if obj.numel() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            found[path] = found.get(path, 0) + storage.nbytes()
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            _collect(value, f"{path}[{key if isinstance(key, str) else '#'}]", seen, found, depth + 1)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _collect(value, f"{path}[#]", seen, found, depth + 1)
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        for key, value in vars(obj).items():
            if not isinstance(value, torch.nn.Module):
                _collect(value, f"{path}.{key}", seen, found, depth + 1)


def engine_tensors(engine: Any) -> dict[str, int]:
    """Bytes per attribute path of every tensor the engine's module and optimizer hold.

    Walked in an order that names shared storages by what they are: the
    optimizer's state, then the parameters, then ZeRO's buffers (the reduce
    bucket before the gradients that are views into it), then gradients.
    """
    seen: set[int] = set()
    found: dict[str, int] = {}
    optimizer = engine.optimizer
    basic = getattr(optimizer, "optimizer", optimizer)
    _collect(dict(basic.state), "optimizer_state", seen, found)
    parameters = list(engine.module.named_parameters())
    for name, parameter in parameters:
        _collect(parameter, f"module.{name}", seen, found)
    if basic is not optimizer:
        _collect(vars(optimizer), "zero", seen, found)
    for name, parameter in parameters:
        if parameter.grad is not None:
            _collect(parameter.grad, f"module.{name}.grad", seen, found)
    return found


def by_category(tensors: dict[str, int]) -> dict[str, int]:
    totals = dict.fromkeys(CATEGORIES, 0)
    for path, nbytes in tensors.items():
        totals[_category(path)] += nbytes
    return totals


def deepspeed_template(stage: str) -> dict[str, Any]:
    from muco_flow.training.deepspeed_config import load_deepspeed_template

    number = int(stage[0])
    template = load_deepspeed_template(common.PROJECT_ROOT / f"conf/base/deepspeed/zero{max(number, 1)}.json")
    template["zero_optimization"]["stage"] = number
    if stage == NO_PERSISTENCE:
        template["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return template


def measure_stage(stage: str, params: dict[str, Any], backbone: Path, batch_args: dict[str, Any]) -> dict[str, Any]:
    """One training step under ``stage`` on this rank; the bytes it holds, by category."""
    from muco_flow.training.train import forward_backward

    training = params["training"]
    embedder = workload.training_embedder(params, backbone)
    batch = workload.conversation_batch(
        **batch_args, embedder=embedder, image_processor=embedder.image_processor, format_params=params["format"]
    )
    engine = workload.training_engine(embedder, training, deepspeed_template(stage))
    peak = {"gradients": 0, "reduce_bucket": 0, "gradient_tensors": {}}

    def sample_gradients(_: torch.Tensor | None = None) -> None:
        tensors = engine_tensors(engine)
        held = by_category(tensors)
        peak["reduce_bucket"] = max(peak["reduce_bucket"], held["reduce_bucket"])
        if held["gradients"] > peak["gradients"]:
            peak["gradients"] = held["gradients"]
            peak["gradient_tensors"] = {p: b for p, b in tensors.items() if _category(p) == "gradients"}

    hooks = [
        p.register_post_accumulate_grad_hook(sample_gradients) for p in engine.module.parameters() if p.requires_grad
    ]
    forward_backward(
        engine,
        [batch],
        workload.CPU,
        temperature=training["temperature"],
        symmetric_loss=training["symmetric_loss"],
        mask_duplicate_targets=training["mask_duplicate_targets"],
    )
    sample_gradients()
    engine.step()
    for hook in hooks:
        hook.remove()
    tensors = engine_tensors(engine)
    held = by_category(tensors)
    held["gradients"] = peak["gradients"]
    held["reduce_bucket"] = max(held["reduce_bucket"], peak["reduce_bucket"])
    sizes = [(p.ds_numel if hasattr(p, "ds_numel") else p.numel(), p.requires_grad) for p in embedder.parameters()]
    threshold = engine.zero_param_persistence_threshold() if engine.zero_optimization_partition_weights() else 0
    result = {
        "bytes": held,
        "trainable_parameters": sum(numel for numel, trains in sizes if trains),
        "frozen_parameters": sum(numel for numel, trains in sizes if not trains),
        "persistent_parameters": sum(numel for numel, _ in sizes if numel < threshold),
        "tensors_after_step": tensors,
        "gradient_tensors_at_peak": peak["gradient_tensors"],
    }
    engine.destroy()
    return result


def _rank(rank: int, world_size: int, args: dict[str, Any], out: str) -> None:
    common.set_threads(args["threads"])
    workload.start_process_group(rank, world_size, Path(out) / "rendezvous")
    import torch.distributed as dist

    params = common.load_parameters()
    images = args["images_per_rank"]
    samples, pictures = workload.sample_images(Path(args["sample"]), images * world_size)
    mine = slice(rank * images, (rank + 1) * images)
    batch_args = {"samples": samples[mine], "images": pictures[mine], "turns": args["turns"], "mode": "multi_turn"}
    results = {}
    for stage in args["stages"]:
        try:
            results[stage] = measure_stage(stage, params, Path(args["backbone"]), batch_args)
            gc.collect()  # the stage's engine and model, before the next stage builds its own
        except Exception as error:  # a stage that cannot run here is reported, not faked
            results[stage] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results, default=str))
    dist.barrier()  # a rank that tears down while its peer still talks makes gloo abort
    dist.destroy_process_group()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch.multiprocessing as mp

    settings = {
        "threads": args.threads,
        "images_per_rank": args.images,
        "turns": args.turns,
        "stages": args.stages,
        "sample": str(args.sample),
        "backbone": str(args.backbone),
    }
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(args.processes, settings, tmp), nprocs=args.processes, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.processes)]

    results, goals = [], []
    for stage in args.stages:
        first = ranks[0][stage]
        if "error" in first:
            results.append({"stage": stage, "error": first["error"], "traceback": first["traceback"]})
            goals.append(common.goal(f"ZeRO stage {stage} runs on CPU", "runs", first["error"], False))
            continue
        theory = theoretical_bytes(
            int(stage[0]),
            first["trainable_parameters"],
            first["frozen_parameters"],
            args.processes,
            first["persistent_parameters"],
        )
        results.append(
            {
                "stage": stage,
                "trainable_parameters": first["trainable_parameters"],
                "frozen_parameters": first["frozen_parameters"],
                "persistent_parameters": first["persistent_parameters"],
                "bytes_per_rank": [r[stage]["bytes"] for r in ranks],
                "theory_bytes": theory,
                "measured_over_theory": {k: first["bytes"][k] / v for k, v in theory.items() if v},
                "rank0_tensors_after_step": first["tensors_after_step"],
                "rank0_gradient_tensors_at_peak": first["gradient_tensors_at_peak"],
            }
        )
    goals += _partitioning_goals(results)
    parameters = {
        "processes": args.processes,
        "backend": "gloo",
        "precision": "fp32",
        "optimizer": "AdamW (torch_adam)",
        "stages": args.stages,
        "images_per_rank": args.images,
        "turns": args.turns,
        "threads": args.threads,
        "templates": "conf/base/deepspeed/zero{1,2,3}.json (stage 0: zero1.json with stage 0)",
    }
    return {"parameters": parameters, "results": results, "goals": goals}


def _partitioning_goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each category partitioned (or not) as its stage's theory says, within 1% (alignment padding)."""
    goals = []
    for result in results:
        if "error" in result:
            continue
        off = {k: v for k, v in result["measured_over_theory"].items() if abs(v - 1) > 0.01}
        goals.append(
            common.goal(
                f"stage {result['stage']}: measured bytes match the theory",
                "each category within 1%",
                "all within 1%" if not off else ", ".join(f"{k} {v:.2f}x" for k, v in off.items()),
                not off,
            )
        )
    return goals


def table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "stage",
        "parameters (theory)",
        "gradients (theory)",
        "optimizer state (theory)",
        "fp32 master (theory)",
        "reduce bucket",
    ]
    rows = []
    for r in document["results"]:
        if "error" in r:
            rows.append([r["stage"], r["error"], "", "", "", ""])
            continue
        measured, theory = r["bytes_per_rank"][0], r["theory_bytes"]
        cells = [f"{measured[k] / 1024:,.0f} KiB ({theory[k] / 1024:,.0f})" for k in THEORY_CATEGORIES]
        cells.append(f"{measured['reduce_bucket'] / 2**20:,.0f} MiB")
        rows.append([r["stage"], *cells])
    return headers, rows


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--sample", type=Path, default=common.SAMPLE_DIR)
    parser.add_argument("--backbone", type=Path, default=common.TINY_BACKBONE_DIR)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--images", type=int, default=2, help="images (conversations) per rank in the step")
    parser.add_argument("--turns", type=int, default=7)
    args = parser.parse_args(argv)
    if args.quick:
        args.stages, args.images, args.turns = ["0", "2", NO_PERSISTENCE], 1, 2
    common.write_and_print(args.out, NAME, run(args), table)


if __name__ == "__main__":
    main()
