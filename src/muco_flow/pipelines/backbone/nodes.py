"""Nodes of the `backbone` pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from muco_flow.data import schema
from muco_flow.modeling.backbone import build_tiny_backbone


def collect_tokenizer_corpus(snapshot_root: str) -> list[str]:
    """Every query phrasing, target and sentence of the training meta file."""
    table = pq.read_table(Path(snapshot_root) / schema.TRAIN_META_FILE)
    corpus: list[str] = list(table.column(schema.QRY_SENTENCE).to_pylist())
    for column in (schema.POS_TEXT, schema.POS_SENTENCE, schema.NEG_TEXT):
        corpus.extend(text for turns in table.column(column).to_pylist() for text in turns)
    corpus.extend(p for turns in table.column(schema.QRY).to_pylist() for phrasings in turns for p in phrasings)
    return corpus


def build_tiny_backbone_preset(corpus: list[str], preset: dict[str, Any], family: str) -> dict[str, bytes]:
    """``family``'s tiny preset (`backbone.family`) as a Hugging Face model directory, as files."""
    return build_tiny_backbone(corpus, preset, family)
