"""Formatting: ingested shards in, tokenized multi-turn conversations out.

Records keep a reference to their image (ingest shard and row) rather than a
copy, so a sample split into several conversations stores its image once.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from muco_flow.data import schema
from muco_flow.data.conversations import (
    ConversationPlan,
    FormatConfig,
    negative_segments,
    plan_conversations,
    query_segments,
    target_key,
    target_segments,
)
from muco_flow.data.ingest import MANIFEST_FILE
from muco_flow.data.shards import ShardWriter
from muco_flow.modeling import tokens

CONVERSATIONS_DIR = "conversations"

FORMATTED_SCHEMA = pa.schema(
    [
        pa.field("conversation_id", pa.string(), nullable=False),
        pa.field(schema.SAMPLE_ID, pa.string(), nullable=False),
        pa.field("image_shard", pa.string(), nullable=False),
        pa.field("image_row", pa.int64(), nullable=False),
        pa.field("image_tokens", pa.int32(), nullable=False),
        pa.field("turn_index", pa.list_(pa.int8()), nullable=False),
        pa.field("turn_type", pa.list_(pa.int8()), nullable=False),
        pa.field("phrasing", pa.list_(pa.int16()), nullable=False),
        pa.field("query_input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("query_attention_mask", pa.list_(pa.int8()), nullable=False),
        pa.field("query_emb_positions", pa.list_(pa.int32()), nullable=False),
        pa.field("target_input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("target_attention_mask", pa.list_(pa.int8()), nullable=False),
        pa.field("target_emb_positions", pa.list_(pa.int32()), nullable=False),
        pa.field("target_key", pa.list_(pa.int64()), nullable=False),
        # tokens per target turn; with target_layout "independent" each span is a whole conversation
        pa.field("target_turn_lengths", pa.list_(pa.int32()), nullable=False),
    ]
)
# With format.hard_negatives: each turn's wrong answer, a one-turn conversation like an independent target.
NEGATIVE_FIELDS = [
    pa.field("negative_input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("negative_emb_positions", pa.list_(pa.int32()), nullable=False),
    pa.field("negative_key", pa.list_(pa.int64()), nullable=False),
    pa.field("negative_turn_lengths", pa.list_(pa.int32()), nullable=False),
]


def formatted_schema(hard_negatives: bool) -> pa.Schema:
    return pa.schema([*FORMATTED_SCHEMA, *NEGATIVE_FIELDS]) if hard_negatives else FORMATTED_SCHEMA


def image_token_count(image_processor: Qwen2VLImageProcessorPil, width: int, height: int) -> int:
    """LLM tokens the image takes: its patch grid after Qwen2-VL's resize, merged."""
    patches = image_processor.get_number_of_image_patches(height, width, {})
    return patches // image_processor.merge_size**2


@dataclass
class ConversationTokenizer:
    tokenizer: PreTrainedTokenizerFast
    config: FormatConfig

    def __post_init__(self) -> None:
        self.emb_id = self.tokenizer.convert_tokens_to_ids(tokens.EMB_TOKEN)
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(tokens.IMAGE_PAD)
        if self.emb_id == self.tokenizer.unk_token_id or self.emb_id is None:
            raise ValueError(f"the tokenizer has no {tokens.EMB_TOKEN} token; add MuCo's tokens to the backbone first")

    def tokenize(self, plans: list[ConversationPlan], image_tokens: list[int]) -> list[dict[str, Any] | None]:
        """Token ids per conversation, whole trailing turns dropped to fit ``max_length``.

        None for a conversation whose first turn alone does not fit.
        """
        t = self.config.templates
        query_segs = [query_segments(p, t) for p in plans]
        independent = self.config.target_layout == "independent"
        target_segs = [target_segments(p, t, independent) for p in plans]
        negative_segs = [negative_segments(p, t) for p in plans] if self.config.hard_negatives else []
        flat = [s for segs in query_segs + target_segs + negative_segs for s in segs]
        ids = iter(self.tokenizer(flat, add_special_tokens=False)["input_ids"])
        results: list[dict[str, Any] | None] = []
        for plan, q_segs, n_image in zip(plans, query_segs, image_tokens, strict=True):
            query = [self._expand_image(next(ids), n_image) if i == 0 else next(ids) for i in range(len(q_segs))]
            results.append({"plan": plan, "query": query})
        for result, t_segs in zip(results, target_segs, strict=True):
            result["target"] = [next(ids) for _ in t_segs]
        if negative_segs:
            for result, n_segs in zip(results, negative_segs, strict=True):
                result["negative"] = [next(ids) for _ in n_segs]
        return [self._fit(r["plan"], r["query"], r["target"], r.get("negative")) for r in results]

    def _expand_image(self, ids: list[int], n_image: int) -> list[int]:
        if ids.count(self.image_pad_id) != 1:
            raise ValueError("format.templates: the first query turn must hold exactly one image placeholder")
        at = ids.index(self.image_pad_id)
        return ids[:at] + [self.image_pad_id] * n_image + ids[at + 1 :]

    def _fit(
        self,
        plan: ConversationPlan,
        query: list[list[int]],
        target: list[list[int]],
        negative: list[list[int]] | None = None,
    ) -> dict[str, Any] | None:
        kept, q_len, t_len = 0, 0, 0
        independent = self.config.target_layout == "independent"
        for turn, (q, tg) in enumerate(zip(query, target, strict=True)):
            # independent targets are separate sequences: each one must fit, not their sum
            t_need = len(tg) if independent else t_len + len(tg)
            if q_len + len(q) > self.config.max_length or t_need > self.config.max_length:
                break
            if negative is not None and len(negative[turn]) > self.config.max_length:
                break
            kept, q_len, t_len = kept + 1, q_len + len(q), t_len + len(tg)
        if kept == 0:
            return None
        query_ids = [i for seg in query[:kept] for i in seg]
        target_ids = [i for seg in target[:kept] for i in seg]
        q_emb = [i for i, tok in enumerate(query_ids) if tok == self.emb_id]
        t_emb = [i for i, tok in enumerate(target_ids) if tok == self.emb_id]
        if len(q_emb) != kept or len(t_emb) != kept:
            raise ValueError(
                f"sample {plan.sample_id}: {len(q_emb)} query and {len(t_emb)} target {tokens.EMB_TOKEN} tokens "
                f"for {kept} turns; the templates or the text hold extra {tokens.EMB_TOKEN} tokens"
            )
        negative_columns = {}
        if negative is not None:
            negative_ids = [i for seg in negative[:kept] for i in seg]
            negative_columns = {
                "negative_input_ids": negative_ids,
                "negative_emb_positions": [i for i, tok in enumerate(negative_ids) if tok == self.emb_id],
                "negative_key": [target_key(text) for text in plan.negatives[:kept]],
                "negative_turn_lengths": [len(seg) for seg in negative[:kept]],
            }
            if len(negative_columns["negative_emb_positions"]) != kept:
                raise ValueError(
                    f"sample {plan.sample_id}: the hard negatives hold extra {tokens.EMB_TOKEN} tokens "
                    f"({len(negative_columns['negative_emb_positions'])} for {kept} turns)"
                )
        return negative_columns | {
            "conversation_id": f"{plan.sample_id}#{plan.part}",
            schema.SAMPLE_ID: plan.sample_id,
            "turn_index": list(plan.turn_index[:kept]),
            "turn_type": list(plan.turn_type[:kept]),
            "phrasing": list(plan.phrasing[:kept]),
            "query_input_ids": query_ids,
            "query_attention_mask": [1] * len(query_ids),
            "query_emb_positions": q_emb,
            "target_input_ids": target_ids,
            "target_attention_mask": [1] * len(target_ids),
            "target_emb_positions": t_emb,
            "target_key": [target_key(text) for text in plan.targets[:kept]],
            "target_turn_lengths": [len(seg) for seg in target[:kept]],
            "dropped_turns": len(query) - kept,
        }


def format_m3t_shards(
    shards_dir: Path,
    output_dir: Path,
    tokenizer: PreTrainedTokenizerFast,
    image_processor: Qwen2VLImageProcessorPil,
    config: FormatConfig,
    batch_rows: int = 512,
) -> dict[str, Any]:
    """Formats every ingested sample; writes conversation shards and a manifest."""
    shards_dir, output_dir = Path(shards_dir), Path(output_dir)
    ingest_manifest = json.loads((shards_dir / MANIFEST_FILE).read_text())
    conv_tokenizer = ConversationTokenizer(tokenizer, config)
    writer = ShardWriter(output_dir / CONVERSATIONS_DIR, formatted_schema(config.hard_negatives), config.rows_per_shard)
    counts: Counter[str] = Counter()
    columns = [schema.SAMPLE_ID, schema.QRY, config.target_field, "image_width", "image_height"]
    columns += [schema.NEG_TEXT] if config.hard_negatives else []
    total = ingest_manifest["counts"]["accepted"]
    with tqdm(total=total, desc="format", unit="sample", disable=total < 2000) as progress:
        for shard in ingest_manifest["shards"]:
            row = 0
            for batch in pq.ParquetFile(shards_dir / shard["file"]).iter_batches(
                batch_size=batch_rows, columns=columns
            ):
                plans, images, refs = [], [], []
                for offset, sample in enumerate(batch.to_pylist()):
                    n_image = image_token_count(image_processor, sample["image_width"], sample["image_height"])
                    negatives = _hard_negatives(sample) if config.hard_negatives else None
                    for plan in plan_conversations(
                        sample[schema.SAMPLE_ID], sample[schema.QRY], sample[config.target_field], config, negatives
                    ):
                        plans.append(plan)
                        images.append(n_image)
                        refs.append((shard["file"], row + offset))
                records = []
                for result, n_image, (file, index), plan in zip(
                    conv_tokenizer.tokenize(plans, images), images, refs, plans, strict=True
                ):
                    counts["turns"] += len(plan.turn_index)
                    if result is None:
                        counts["conversations_dropped"] += 1
                        counts["turns_dropped"] += len(plan.turn_index)
                        continue
                    counts["turns_dropped"] += result.pop("dropped_turns")
                    records.append({**result, "image_shard": file, "image_row": index, "image_tokens": n_image})
                writer.write(records)
                counts["samples"] += batch.num_rows
                counts["conversations"] += len(records)
                row += batch.num_rows
                progress.update(batch.num_rows)
    writer.close()
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "ingest_manifest_shards": [s["sha256"] for s in ingest_manifest["shards"]],
        "counts": {
            k: counts[k] for k in ("samples", "conversations", "conversations_dropped", "turns", "turns_dropped")
        },
        "shards": writer.shards,
        "settings": {
            "mode": config.mode,
            "turns_per_conversation": config.turns_per_conversation,
            "target_field": config.target_field,
            "target_layout": config.target_layout,
            "hard_negatives": config.hard_negatives,
            "max_length": config.max_length,
            "seed": config.seed,
            "shuffle_turns": config.shuffle_turns,
        },
    }
    (output_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    logging.getLogger(__name__).info("format: %s", manifest["counts"])
    return manifest


def _hard_negatives(sample: dict[str, Any]) -> list[str]:
    negatives = sample.get(schema.NEG_TEXT)
    if not negatives:
        raise ValueError(
            f"sample {sample[schema.SAMPLE_ID]} has no {schema.NEG_TEXT}: format.hard_negatives needs one wrong "
            "answer per turn; set it to false or ingest a source that has them"
        )
    return negatives
