"""The training workload the benchmarks run: the tiny backbone as training configures it, on the sample's images.

Conversations are planned, tokenized and collated by the library's own
formatting and batching, and a step is the training loop's own
``forward_backward`` and ``engine.step()`` under DeepSpeed, so what is timed
here is what `kedro run --pipelines=train` runs, minus the logging.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from muco_flow.data import schema
from muco_flow.data.conversations import MODES, FormatConfig
from muco_flow.data.formatting import TurnTokenizer, assemble_conversations, image_token_count
from muco_flow.modeling import tokens
from muco_flow.modeling.embedder import MuCoEmbedder, build_training_embedder
from muco_flow.training.config import TrainingConfig
from muco_flow.training.data import Batch, collate_conversations
from muco_flow.training.deepspeed_config import training_deepspeed_config

CPU = torch.device("cpu")


def sample_images(sample_dir: Path, count: int) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """The first ``count`` training samples of an M3T-mini snapshot and their images."""
    table = pq.read_table(Path(sample_dir) / schema.TRAIN_META_FILE)
    if table.num_rows < count:
        raise ValueError(f"{sample_dir} has {table.num_rows} training samples, {count} are needed")
    rows = table.slice(0, count).to_pylist()
    images = [Image.open(Path(sample_dir) / row[schema.QRY_IMAGE_PATH]).convert("RGB") for row in rows]
    return rows, images


def square_images(
    images: list[Image.Image], side: int, backbone_dir: Path
) -> tuple[list[Image.Image], Qwen2VLImageProcessorPil]:
    """The images resized to ``side`` x ``side`` and an image processor that keeps that size.

    With the pixel budget fixed at side², every image takes (side / 28)² LLM
    tokens and four times as many vision patches.
    """
    pixels = side * side
    processor = Qwen2VLImageProcessorPil.from_pretrained(
        str(backbone_dir), size={"shortest_edge": pixels, "longest_edge": pixels}, local_files_only=True
    )
    return [image.resize((side, side), Image.Resampling.BICUBIC) for image in images], processor


def conversation_batch(
    samples: list[dict[str, Any]],
    images: list[Image.Image],
    *,
    turns: int,
    mode: str,
    embedder: MuCoEmbedder,
    image_processor: Qwen2VLImageProcessorPil,
    format_params: dict[str, Any],
) -> Batch:
    """The same ``turns`` query/target pairs of each sample, in ``mode``.

    multi_turn: one conversation per image holding its K turns; single_turn:
    K conversations per image, one turn each. Both take the sample's turns in
    the order and phrasing training draws for epoch 0, so they hold the same pairs.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
    config = FormatConfig.from_params({**format_params, "mode": mode, "turns_per_conversation": turns})
    turn_tokenizer = TurnTokenizer(embedder.tokenizer, config)
    image_pad_id = embedder.tokenizer.convert_tokens_to_ids(tokens.IMAGE_PAD)
    conversations, conversation_images, image_tokens = [], [], []
    for index, (sample, image) in enumerate(zip(samples, images, strict=True)):
        count = image_token_count(image_processor, *image.size)
        record = turn_tokenizer.record(f"bench-{index}", sample[schema.QRY], sample[config.target_field], count)
        parts = assemble_conversations(record, 0, config.settings(), image_pad_id)
        chosen = parts[:turns] if mode == "single_turn" else parts[:1]
        if sum(len(c.turn_index) for c in chosen) != turns:
            raise ValueError(f"sample {index} gives fewer than {turns} turns within format.max_length")
        conversations += chosen
        conversation_images += [image] * len(chosen)
        image_tokens += [count] * len(chosen)
    return collate_conversations(
        conversations,
        conversation_images,
        image_tokens,
        image_processor,
        pad_id=embedder.tokenizer.pad_token_id,
        image_pad_id=image_pad_id,
        emb_id=embedder.emb_token_id,
    )


def paired_batches(
    samples: list[dict[str, Any]], images: list[Image.Image], *, turns: int, **options: Any
) -> dict[str, Batch]:
    """The same pairs in each mode: ``{mode: batch}`` (options as for ``conversation_batch``)."""
    return {mode: conversation_batch(samples, images, turns=turns, mode=mode, **options) for mode in MODES}


def start_process_group(rank: int = 0, world_size: int = 1, rendezvous: Path | None = None) -> None:
    """This process as rank ``rank`` of a gloo group on this machine.

    The ranks meet through ``rendezvous``, a file none of them has created yet
    (torch's file store): no port is picked, so none can be taken by another
    process in between. A single process gets a file of its own.
    """
    import tempfile

    rendezvous = rendezvous or Path(tempfile.mkdtemp(prefix="muco-bench-")) / "rendezvous"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed compiles a shared-memory op at init; in the default cache
    # (~/.cache/torch_extensions) every virtual environment on the machine
    # overwrites the others' build, so each would recompile (minutes on 2 cores).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    # as in train.py: DeepSpeed's ZeRO calls collectives that torch 2.13 marks deprecated
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*all_gather_into_tensor.*deprecated")
    import deepspeed

    deepspeed.init_distributed(
        dist_backend="gloo",
        auto_mpi_discovery=False,
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world_size,
    )


def training_embedder(params: dict[str, Any], backbone_dir: Path) -> MuCoEmbedder:
    training = params["training"]
    return build_training_embedder(str(backbone_dir), params["backbone"], training["embedder"], seed=training["seed"])


def training_engine(embedder: MuCoEmbedder, training: dict[str, Any], template: dict[str, Any] | None = None) -> Any:
    """A DeepSpeed engine over ``embedder``'s trainable parameters, configured as training configures it."""
    import deepspeed

    config = training_deepspeed_config(TrainingConfig.from_dict(training), on_cpu=True, template=template)
    trainable = [p for p in embedder.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=embedder, model_parameters=trainable, config=config)
    engine.train()
    return engine


def training_step(engine: Any, batch: Batch, training: dict[str, Any]) -> float:
    """One full step (forward, backward, optimizer) as train.py takes it; returns the loss."""
    from muco_flow.training.train import forward_backward

    loss, _ = forward_backward(
        engine,
        [batch],
        CPU,
        temperature=training["temperature"],
        symmetric_loss=training["symmetric_loss"],
        mask_duplicate_targets=training["mask_duplicate_targets"],
    )
    engine.step()
    return loss.item()
