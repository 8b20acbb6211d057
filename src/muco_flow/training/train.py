"""One rank of MuCo training. Launched by torchrun (see launch.py), never imported by Kedro.

    torchrun --nproc_per_node 2 -m muco_flow.training.train <run_config.json>

Read it top to bottom: set up the process group, build the model and data,
resume from the newest complete checkpoint, then loop: two forward passes
(query and target conversations; a third for hard negatives), gather targets
from every rank, the multi-turn contrastive loss, one DeepSpeed step (with
`training.grad_cache.chunk_size`, the forwards and backwards go chunk by
chunk, see grad_cache.py); log, checkpoint, agree whether to stop, repeat.
Rank 0 finally writes the merged model and the MLflow artifacts. Rank 0's
MLflow run, from start to finish or failure, is run_tracking.py's TrainingRun.
CoCoA's stage 0 (config "stage": "cocoa", docs/cocoa.md) runs this same loop
with one change where the loss is computed: each step is a reconstruction
step of the batch's conversations (modeling/cocoa.py), warm-up steps first.
SIGTERM or SIGUSR1 (preemption, a time limit) ends the loop after the step in
progress on every rank, with a checkpoint of it; the rank then exits with
PREEMPTED_EXIT_CODE (preemption.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from muco_flow.training.config import MatryoshkaSettings
    from muco_flow.training.data import Batch

logger = logging.getLogger("muco_flow.train")


def setup_logging(output_dir: Path, rank: int) -> None:
    """Rank 0 prints; every rank writes logs/rank<r>.log. Other ranks keep stdout quiet."""
    log_dir = output_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(log_dir / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    else:
        sys.stdout = open(log_dir / f"rank{rank}.stdout", "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(message)s", handlers=handlers, force=True
    )


def mean_over_ranks(value: float) -> float:
    from muco_flow.training.distributed import all_reduce_scalar

    return all_reduce_scalar(value) / dist.get_world_size()


def _negative_keys(part: Batch) -> torch.Tensor:
    if part.negative_keys is None:
        raise ValueError("the batch's hard negatives have no target keys to mask duplicates with")
    return part.negative_keys


def forward_backward(
    engine: Any,
    parts: list[Batch],
    device: torch.device,
    *,
    temperature: float,
    symmetric_loss: bool,
    mask_duplicate_targets: bool,
    grad_cache: bool = False,
    four_way: bool = False,
    matryoshka: MatryoshkaSettings | None = None,
    reconstruction: tuple[str, int] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This rank's batch forward, embeddings gathered from every rank, the loss, backward.

    ``parts`` is the batch, whole (one part) or, with ``grad_cache``, in
    chunks that GradCache embeds one at a time. Returns the loss of this
    rank's queries and its terms to log; ``engine.step()`` completes the step.
    ``four_way``: stage 2 (MMEB-train batches, see ``Batch``), MuCo's four-way
    loss over the main and auxiliary embeddings, which has no symmetric term
    (as in the official code); ``mask_duplicate_targets`` masks repeated
    targets there too, keyed by text and image.
    ``matryoshka`` with dims: either loss on each nested prefix of every
    embedding, weighted and summed (``matryoshka_loss``); its terms are each
    width's loss (and, in stage 2, each width's four terms).
    ``reconstruction``: CoCoA's stage 0, (phase, mask seed) of this step: the
    engine's model is a CocoaObjective, and the loss is ``reconstruction_backward``'s.
    """
    if reconstruction is not None:
        return reconstruction_backward(engine, parts, device, *reconstruction)
    from muco_flow.modeling.loss import four_way_contrastive_loss, matryoshka_loss, multi_turn_contrastive_loss
    from muco_flow.training.distributed import all_gather_with_grad, all_gather_without_grad
    from muco_flow.training.grad_cache import grad_cache_step

    hard_negatives = parts[0].negative is not None

    def embed(part: Batch) -> list[torch.Tensor]:
        sides = [part.query, part.target] + ([part.negative] if part.negative is not None else [])
        return [engine(**{k: v.to(device) for k, v in side.items()}) for side in sides]

    rank = dist.get_rank() if dist.is_initialized() else 0

    def four_way_loss(embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # each stage-2 row holds two <|emb|>: [main_0, aux_0, main_1, aux_1, ...]
        query, target, *negative = embeddings
        keys = negative_keys = None
        if mask_duplicate_targets:
            # a stage-2 target's key (text and image) comes once per <|emb|>: one per sample
            keys = all_gather_without_grad(torch.cat([p.target_keys[0::2] for p in parts]).to(device))
            if hard_negatives:
                negative_keys = all_gather_without_grad(torch.cat([_negative_keys(p) for p in parts]).to(device))
        value = four_way_contrastive_loss(
            query[0::2],
            query[1::2],
            all_gather_with_grad(target[0::2].contiguous()),
            all_gather_with_grad(target[1::2].contiguous()),
            temperature,
            rank,
            hard_negatives=all_gather_with_grad(negative[0]) if hard_negatives else None,
            target_keys=keys,
            negative_keys=negative_keys,
        )
        return value.total, value.terms()

    def full_width_loss(embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if four_way:
            return four_way_loss(embeddings)
        query, target, *negative = embeddings
        all_targets = all_gather_with_grad(target)
        all_queries = all_gather_with_grad(query) if symmetric_loss else None
        keys = negative_keys = all_negatives = None
        if mask_duplicate_targets:
            keys = all_gather_without_grad(torch.cat([p.target_keys for p in parts]).to(device))
        if hard_negatives:
            all_negatives = all_gather_with_grad(negative[0])
            if mask_duplicate_targets:
                negative_keys = all_gather_without_grad(torch.cat([_negative_keys(p) for p in parts]).to(device))
        value = multi_turn_contrastive_loss(
            query,
            all_targets,
            parts[0].turns,
            temperature,
            rank,
            gathered_query=all_queries,
            hard_negatives=all_negatives,
            target_keys=keys,
            negative_keys=negative_keys,
        )
        return value, {}

    def loss(embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if matryoshka is None or matryoshka.dims is None:
            return full_width_loss(embeddings)
        # the prefixes are cut before the gathers inside full_width_loss: each rank sends d columns, not all
        return matryoshka_loss(full_width_loss, embeddings, matryoshka.dims, matryoshka.weights)

    if grad_cache:
        # ZeRO reduces the chunks' accumulated gradients once, when the block ends
        with engine.coalesce_grad_reduction():
            return grad_cache_step(parts, embed, loss, engine.backward)
    (batch,) = parts
    value, terms = loss(embed(batch))
    engine.backward(value)
    return value, terms


def reconstruction_backward(
    engine: Any, parts: list[Batch], device: torch.device, phase: str, mask_seed: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CoCoA's stage 0: the reconstruction loss of the batch's conversations (query side, with their images).

    Nothing is gathered across ranks or rows, so GradCache's chunks are plain
    accumulation: each chunk's loss, scaled by its share of the rows, goes
    backward on its own (ZeRO reduces once, when the block ends). Returns the
    batch's loss and its terms (modeling/cocoa.py ``TERMS``), row-weighted.
    """
    rows = sum(part.query["input_ids"].shape[0] for part in parts)
    total = torch.zeros((), device=device)
    terms: dict[str, torch.Tensor] = {}
    with engine.coalesce_grad_reduction() if len(parts) > 1 else contextlib.nullcontext():
        for index, part in enumerate(parts):
            share = part.query["input_ids"].shape[0] / rows
            value, part_terms = engine(phase, mask_seed + index, **{k: v.to(device) for k, v in part.query.items()})
            engine.backward(value * share)
            total = total + value.detach() * share
            for name, term in part_terms.items():
                terms[name] = terms.get(name, torch.zeros((), device=device)) + term.detach() * share
    return total, terms


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite: the run stops, no model is written."""


def check_finite(step: int, name: str, value: float) -> None:
    """Stops training at the first NaN or infinite loss or gradient norm, naming the step.

    Nothing after it is trusted: no checkpoint of this step is saved and no
    final model is written; the checkpoints before it stay.
    """
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"training stopped at step {step}: the {name} is {value}; no checkpoint of this "
            "step and no final model are written. Lower training.learning_rate, check training.temperature, "
            "or look for damaged data or checkpoints"
        )


def stage_of(batches: Any) -> str:
    """The pipeline whose data ``batches`` reads: "train" (M3T conversations) or "finetune" (MMEB-train)."""
    from muco_flow.data import mmeb_train
    from muco_flow.training.data import RECORD_KINDS

    return "finetune" if batches.kind is RECORD_KINDS[mmeb_train.SCHEMA_VERSION] else "train"


def train(config: dict[str, Any]) -> None:
    import warnings

    # DeepSpeed's ZeRO calls collectives that torch 2.13 marks deprecated, once per step
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*all_gather_into_tensor.*deprecated")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from muco_flow.modeling.embedder import build_training_embedder
    from muco_flow.training.checkpoint import (
        checkpoint_run_id,
        checkpoint_tag,
        find_resumable,
        load_checkpoint,
        remove_staging_leftovers,
        save_checkpoint,
    )
    from muco_flow.training.config import TrainingConfig
    from muco_flow.training.data import ConversationBatches, batch_loader
    from muco_flow.training.heldout import HELDOUT_METRIC, SELECTION_STATE, Selection, evaluate_heldout
    from muco_flow.training.preemption import (
        PreemptedError,
        Preemption,
        StopRequest,
        agreed_stop,
        checkpoint_fits,
    )
    from muco_flow.training.run_tracking import TrainingRun, ended_as_failed_on_error
    from muco_flow.training.schedule import lr_factor

    output_dir = Path(config["output_dir"])
    settings = TrainingConfig.from_dict(config["training"])
    # SIGTERM and SIGUSR1 from here on ask for a stop after the current step (preemption.py), no longer kill
    stop = StopRequest()
    stop.install()

    # --- processes ----------------------------------------------------------
    on_cpu = get_accelerator().device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    setup_logging(output_dir, rank)
    device = (
        torch.device("cpu") if on_cpu else torch.device(get_accelerator().device_name(), int(os.environ["LOCAL_RANK"]))
    )
    if not on_cpu:
        get_accelerator().set_device(device.index)
    logger.info("rank %d of %d on %s", rank, world, device)

    # --- model ---------------------------------------------------------------
    # the same seed gives the same LoRA init on every rank... (build_training_embedder takes the parameters' dict)
    embedder = build_training_embedder(
        config["checkpoint"], config["backbone"], dataclasses.asdict(settings.embedder), seed=settings.seed
    )
    settings.matryoshka.check_width(embedder.hidden_size)  # before any data is read or step taken
    cocoa = config.get("cocoa")  # CoCoA's stage 0: the embedder inside its reconstruction objective
    model = embedder if cocoa is None else cocoa_objective(embedder, cocoa)
    model = model.to(device)
    random.seed(settings.seed + rank)  # ...and each rank its own dropout masks from here on
    torch.manual_seed(settings.seed + rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    logger.info(
        "trainable parameters: %d of %d",
        sum(p.numel() for p in trainable),
        sum(p.numel() for p in model.parameters()),
    )

    # --- data ----------------------------------------------------------------
    batches = ConversationBatches.for_tokenizer(
        Path(config["conversations_dir"]),
        Path(config["shards_dir"]),
        embedder.image_processor,
        embedder.tokenizer,
        batch_size=settings.micro_batch_size,
        rank=rank,
        world_size=world,
        seed=settings.seed,
        hard_negatives=settings.hard_negatives,
        data_mix=settings.data_mix,
        heldout=settings.during_training.heldout_conversations,
    )
    during = settings.during_training  # evaluation during training on the held-out slice (training/heldout.py)
    if during.every and cocoa is not None:
        raise ValueError(
            "training.during_training is for contrastive stages; CoCoA's stage 0 has no retrieval to score"
        )
    data_stage, stage = stage_of(batches), config.get("stage", "train")
    four_way = data_stage == "finetune"
    if data_stage != ("train" if stage == "cocoa" else stage):  # stage 0 reads stage 1's conversations
        raise ValueError(
            f"the {stage} pipeline got {data_stage} data in {config['conversations_dir']} "
            "(train reads M3T conversations from the format pipeline, finetune MMEB-train samples from finetune_data)"
        )
    chunk_size = settings.grad_cache.chunk_size
    total_steps = settings.total_steps(batches.steps_per_epoch)
    logger.info(
        "%d steps (%d per epoch), %d conversations per step", total_steps, batches.steps_per_epoch, batches.global_batch
    )

    # --- DeepSpeed engine ------------------------------------------------------
    def scheduler(optimizer):
        factor = lr_factor(settings.lr_schedule, settings.warmup_steps, total_steps, settings.lr_min_ratio)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    engine, _, _, lr_scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, config=config["deepspeed"], lr_scheduler=scheduler
    )

    # --- resume ---------------------------------------------------------------
    checkpoints = output_dir / "checkpoints"
    if rank == 0:
        remove_staging_leftovers(checkpoints)  # of killed runs; this run holds the output folder's lock
    found = [find_resumable(checkpoints, config["fingerprint"], world) if rank == 0 else None]
    dist.broadcast_object_list(found, src=0)
    start, resumed_run = 0, None
    selection = Selection()  # the best evaluated checkpoint so far; a resume continues the checkpoint's
    if found[0]:
        tag, start = found[0]
        selection = Selection.from_state(load_checkpoint(engine, checkpoints, tag, rank))
        resumed_run = checkpoint_run_id(checkpoints / tag) if rank == 0 else None
        logger.info("resumed from checkpoint %s (step %d)", tag, start)
    elif rank == 0 and any(checkpoints.glob("step-*")):
        logger.warning("no usable checkpoint in %s; training from step 0", checkpoints)
    dist.barrier()

    # rank 0 keeps the MLflow run and metrics.jsonl
    run = TrainingRun.start(config, output_dir, start_step=start, checkpoint_run=resumed_run) if rank == 0 else None

    def save(step: int) -> tuple[float, str | None]:
        """Every rank saves the checkpoint of ``step``; returns the seconds it took, and rank 0 its LoggedModel."""
        began = time.perf_counter()
        directory = save_checkpoint(
            engine,
            checkpoints,
            step,
            rank=rank,
            world_size=world,
            fingerprint=config["fingerprint"],
            keep_last=settings.keep_last,
            client_state={"step": step, SELECTION_STATE: selection.state()},
            mlflow_run_id=run.run_id if run is not None else None,
            # training.select: best may make the best checkpoint so far the model: keep_last does not remove it
            keep=[selection.step] if settings.select == "best" and selection.step is not None else [],
        )
        seconds = time.perf_counter() - began
        return seconds, run.log_checkpoint_model(step, directory, config["fingerprint"]) if run is not None else None

    # --- loop ------------------------------------------------------------------
    preemption: Preemption | None = None
    with ended_as_failed_on_error(run):
        from muco_flow.progress import progress as progress_display

        engine.train()
        progress = progress_display(
            total_steps, initial=start, desc="train", unit="step", every_s=settings.progress_every_s, disable=rank != 0
        )
        # step s is batch s: records, images and collation in worker processes, steps ahead of the model
        loader = batch_loader(batches, start, total_steps, chunk_size=chunk_size, workers=settings.data_workers)
        saved, save_seconds = start, 0.0  # the newest checkpoint's step, and how long the last save took
        step_done = start
        stopped_by = agreed_stop(stop)  # a signal while the run was starting: no step to finish
        try:
            for step in range(start, total_steps):
                if stopped_by:
                    break
                began = time.perf_counter()  # the step's time includes waiting for its batch
                parts = next(loader)
                loss, terms = forward_backward(
                    engine,
                    parts,
                    device,
                    temperature=settings.temperature,
                    symmetric_loss=settings.symmetric_loss,
                    mask_duplicate_targets=settings.mask_duplicate_targets,
                    grad_cache=bool(chunk_size),
                    four_way=four_way,
                    matryoshka=settings.matryoshka,
                    reconstruction=None if cocoa is None else cocoa_step(cocoa, settings.seed, step, rank),
                )
                mean_loss = mean_over_ranks(loss.item())  # the same value on every rank: all stop together
                check_finite(step + 1, "loss", mean_loss)  # before the step: the weights stay as they were
                rate = lr_scheduler.get_last_lr()[0]  # this step's: engine.step() moves the schedule on
                engine.step()
                seconds = time.perf_counter() - began
                grad_norm = float(engine.get_global_grad_norm() or 0.0)
                check_finite(step + 1, "gradient norm", grad_norm)  # global: the same on every rank
                step_done = step + 1

                metrics = {
                    "loss": mean_loss,
                    "learning_rate": rate,
                    "grad_norm": grad_norm,
                    "pairs_per_second": sum(p.pairs for p in parts) * world / seconds,
                    "tokens_per_second": mean_over_ranks(sum(p.tokens for p in parts)) * world / seconds,
                }
                # a loss made of terms (stage 2's four-way loss, Matryoshka's widths) logs each, averaged over ranks
                # (CoCoA's reconstruction losses as cocoa/<term>: the curves of stage 0)
                prefix = "loss" if cocoa is None else "cocoa"
                metrics |= {f"{prefix}/{name}": mean_over_ranks(term.item()) for name, term in terms.items()}
                checkpointing = step_done % settings.save_every == 0 or step_done == total_steps
                heldout = None
                if during.every and (step_done % during.every == 0 or checkpointing):
                    # every rank scores the whole slice (ZeRO-3 needs all of them in each forward): no gather
                    evaluating = time.perf_counter()
                    heldout_batches = batches.heldout_batches(during.batch_size)
                    heldout = evaluate_heldout(engine, heldout_batches, device, four_way=four_way)
                    logger.info(
                        "step %d/%d held-out %s (%d conversations, %.1f s)",
                        step_done,
                        total_steps,
                        " ".join(f"{name.removeprefix('heldout/')} {value:.4f}" for name, value in heldout.items()),
                        len(batches.heldout.turns),
                        time.perf_counter() - evaluating,
                    )
                if run is not None:  # rank 0
                    run.log(step_done, metrics)
                    postfix = {"loss": f"{metrics['loss']:.3f}"}
                    if heldout is not None:
                        postfix["heldout"] = f"{heldout[HELDOUT_METRIC]:.3f}"
                    progress.set_postfix(**postfix)
                    progress.update()
                if step_done % settings.log_every == 0 or step_done == total_steps:
                    # a plain line in every rank's log (and a SLURM file), where the progress bar is unreadable
                    logger.info(
                        "step %d/%d loss %.4f lr %.3g grad_norm %.3g pairs/s %.1f",
                        step_done,
                        total_steps,
                        metrics["loss"],
                        metrics["learning_rate"],
                        metrics["grad_norm"],
                        metrics["pairs_per_second"],
                    )
                model_id = None
                if checkpointing:
                    if heldout is not None:
                        selection = selection.after(step_done, heldout)  # saved with the checkpoint
                    save_seconds, model_id = save(step_done)
                    saved = step_done
                if heldout is not None and run is not None:
                    run.log_evaluation(step_done, heldout, model_id)  # the checkpoint's LoggedModel carries them
                stopped_by = agreed_stop(stop)  # every rank the same answer, after the same step
        finally:
            stop_batch_workers(loader)
        progress.close()

        if stopped_by:
            # --- stopped by a signal: this step's checkpoint if it is new and fits in the grace -------
            if saved < step_done:
                if checkpoint_fits(stop, settings.preemption.grace_s, save_seconds):
                    save(step_done)
                    saved = step_done
                else:
                    logger.warning(
                        "no checkpoint of step %d: the last save took %.1f s, more than is left of "
                        "training.preemption.grace_s (%.0f s since the signal)",
                        step_done,
                        save_seconds,
                        stop.seconds_since(),
                    )
            preemption = Preemption(step=step_done, signal_name=stopped_by, resume_step=saved)
            logger.info("training %s", preemption.describe())
            if run is not None:
                run.end_preempted(step_done, stopped_by)
        else:
            # --- training.select: the best checkpoint's weights, on every rank, before the model is written --
            selected = agreed_selection(selection, settings.select, step_done, checkpoints, rank)
            if selected["step"] != step_done:
                load_checkpoint(engine, checkpoints, checkpoint_tag(selected["step"]), rank)
                logger.info("training.select: best: the model is step %d's, %s", selected["step"], selected["reason"])
        if not stopped_by and run is not None:
            # --- final model and artifacts (rank 0) --------------------------------------------
            run.mark_selected(selected)
            _write_final_model(
                engine.module,
                output_dir / "model",
                config["encode_template"],
                mlflow_run_id=run.run_id,
                fingerprint=config["fingerprint"],
            )
            run.finish()  # raises if MLflow still refuses metrics; the model and checkpoints are safe by now
    dist.barrier()
    if preemption is not None:
        raise PreemptedError(preemption)


def agreed_selection(selection: Any, select: str, final_step: int, checkpoints: Path, rank: int) -> dict[str, Any]:
    """Which step's weights become the model (``Selection.describe``), decided on rank 0 and sent to every rank.

    The last step's when the best checkpoint is gone (removed by hand): a warning, not a lost training.
    """
    from muco_flow.training.checkpoint import checkpoint_tag
    from muco_flow.training.heldout import Selection

    chosen: list[dict[str, Any]] = [{}]
    if rank == 0:
        chosen[0] = selection.describe(select, final_step)
        if not (checkpoints / checkpoint_tag(chosen[0]["step"])).is_dir():
            logger.warning("the best checkpoint, step %d, is gone: the model is the last step's", chosen[0]["step"])
            chosen[0] = Selection().describe("last", final_step)
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def cocoa_objective(embedder: Any, cocoa: dict[str, Any]) -> Any:
    """The embedder inside CoCoA's objective (``cocoa``: the run config's, ``CocoaConfig.objective()``)."""
    from muco_flow.modeling.cocoa import CocoaObjective

    return CocoaObjective(
        embedder,
        text_mask_ratio=cocoa["text_mask_ratio"],
        image_mask_ratio=cocoa["image_mask_ratio"],
        normalize_targets=cocoa["normalize_targets"],
        loss_weights=cocoa["loss_weights"],
    )


def cocoa_step(cocoa: dict[str, Any], seed: int, step: int, rank: int) -> tuple[str, int]:
    """Step ``step``'s (0-based) phase, warm-up steps first, and this rank's mask seed for it."""
    from muco_flow.modeling.cocoa import BRIDGED, WARMUP, mask_seed

    return (WARMUP if step < cocoa["warmup_steps"] else BRIDGED), mask_seed(seed, step, rank)


def stop_batch_workers(loader: Any) -> None:
    """Ends the loader's worker processes now (they ignore stop signals, see ``ignore_stop_signals``).

    Left to the interpreter's exit, multiprocessing would ``terminate()`` them
    with SIGTERM, which they ignore, and then wait for them for ever.
    """
    shutdown = getattr(loader, "_shutdown_workers", None)  # the DataLoader's iterator with worker processes
    if shutdown is not None:
        shutdown()


def _write_final_model(
    embedder: Any, target: Path, encode_template: str, *, mlflow_run_id: str, fingerprint: str
) -> None:
    """The merged model and its identity (run id, content hash), written aside and renamed into place together."""
    import shutil

    from muco_flow.training.model_identity import write_model_identity

    staging = target.with_name(target.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    embedder.save_merged(staging, encode_template)
    write_model_identity(staging, mlflow_run_id=mlflow_run_id, fingerprint=fingerprint)
    retired = target.with_name(target.name + ".retired")
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
    logger.info("final model written to %s", target)


def main() -> None:
    from muco_flow.training.launch import ERROR_MARKER
    from muco_flow.training.preemption import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER, PreemptedError

    config = json.loads(Path(sys.argv[1]).read_text())
    rank = os.environ.get("RANK", "0")
    try:
        train(config)
    except PreemptedError as stopped:
        # the launcher reads the step from this line (Preemption.from_output); the exit status says "resume"
        print(f"{PREEMPTED_MARKER} (rank {rank}): {stopped}", file=sys.__stderr__, flush=True)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    except BaseException as err:
        # The launcher reports which rank failed and why: one line on stderr, which needs no disk space
        # (ENOSPC, EIO), and the traceback in a file, when it can be written.
        print(f"{ERROR_MARKER} (rank {rank}): {type(err).__name__}: {err}", file=sys.__stderr__, flush=True)
        error_file = Path(config["output_dir"]) / "logs" / f"rank{rank}.error"
        try:
            error_file.parent.mkdir(parents=True, exist_ok=True)
            error_file.write_text(traceback.format_exc())
        except OSError as write_error:
            print(f"{ERROR_MARKER} (rank {rank}): could not write {error_file}: {write_error}", file=sys.__stderr__)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
