"""The M3T data schema: column names, the turn taxonomy and the on-disk layout.

Everything that names a column or a turn type imports it from here, so a
renamed column is a one-line change.
"""

from __future__ import annotations

from enum import IntEnum

import pyarrow as pa

SCHEMA_VERSION = "m3t/1"

# The published layout: <snapshot root>/M3T_train/M3T.parquet, image paths
# relative to the snapshot root.
TRAIN_META_FILE = "M3T_train/M3T.parquet"
HELDOUT_META_FILE = "M3T_heldout/M3T.parquet"
MMEB_DIR = "eval/mmeb"
MBEIR_DIR = "eval/mbeir"

TURNS_PER_SAMPLE = 7


class TurnType(IntEnum):
    """M3T's taxonomy; turn k of a sample has the type at position k."""

    CLASSIFICATION = 0
    GLOBAL_VQA = 1
    LOCAL_VQA = 2
    CREATIVE_VQA = 3
    RETRIEVAL = 4


# Turn index -> type, in M3T order: 0 classification, 1-2 global VQA,
# 3-4 local VQA, 5 creative VQA, 6 retrieval.
M3T_TURN_TYPES: tuple[TurnType, ...] = (
    TurnType.CLASSIFICATION,
    TurnType.GLOBAL_VQA,
    TurnType.GLOBAL_VQA,
    TurnType.LOCAL_VQA,
    TurnType.LOCAL_VQA,
    TurnType.CREATIVE_VQA,
    TurnType.RETRIEVAL,
)

# Column names of the published meta file, plus the two columns the sample
# adds (a stable id and the URL an image can be fetched from).
SAMPLE_ID = "sample_id"
QRY = "qry"
POS_TEXT = "pos_text"
POS_SENTENCE = "pos_sentence"
NEG_TEXT = "neg_text"
QRY_SENTENCE = "qry_sentence"
QRY_IMAGE_PATH = "qry_image_path"
POS_IMAGE_PATH = "pos_image_path"
IMAGE_URL = "image_url"

M3T_ARROW_SCHEMA = pa.schema(
    [
        pa.field(SAMPLE_ID, pa.string(), nullable=False),
        pa.field(QRY, pa.list_(pa.list_(pa.string())), nullable=False),
        pa.field(POS_TEXT, pa.list_(pa.string()), nullable=False),
        pa.field(POS_SENTENCE, pa.list_(pa.string()), nullable=False),
        pa.field(NEG_TEXT, pa.list_(pa.string()), nullable=False),
        pa.field(QRY_SENTENCE, pa.string(), nullable=False),
        pa.field(QRY_IMAGE_PATH, pa.string(), nullable=False),
        pa.field(POS_IMAGE_PATH, pa.list_(pa.string()), nullable=False),
        pa.field(IMAGE_URL, pa.string(), nullable=False),
    ]
)


MMEB_META_TASKS = ("classification", "vqa", "retrieval", "visual_grounding")

MMEB_ARROW_SCHEMA = pa.schema(
    [
        pa.field("qry_inst", pa.string(), nullable=False),
        pa.field("qry_text", pa.string(), nullable=False),
        pa.field("qry_img_path", pa.string(), nullable=False),
        pa.field("tgt_text", pa.list_(pa.string()), nullable=False),
        pa.field("tgt_img_path", pa.list_(pa.string()), nullable=False),
    ]
)
