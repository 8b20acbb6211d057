"""The M3T data schema: column names, the turn taxonomy and the on-disk layout.

Everything that names a column or a turn type imports it from here, so a
renamed column is a one-line change.
"""

from __future__ import annotations

from enum import IntEnum

import pyarrow as pa

SCHEMA_VERSION = "m3t/2"

# The published layout: <snapshot root>/M3T_train/M3T.parquet, image paths
# relative to the snapshot root.
TRAIN_META_FILE = "M3T_train/M3T.parquet"
HELDOUT_META_FILE = "M3T_heldout/M3T.parquet"
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

# Column names of the published meta file (naver-ai/M3T, M3T_train/M3T.parquet,
# as naver-ai/muco src/loader.py reads it, lines 205-307): per sample one image
# and 7 turns.
QRY = "qry"  # 7 lists of query phrasings; a phrasing may hold tokens.IMAGE_1
QRY_IMAGE_PATH = "qry_image_path"  # relative to the snapshot root; "" = no image
POS_TEXT = "pos_text"  # 7 short answers
POS_IMAGE_PATH = "pos_image_path"  # one string, usually ""; a target image
POS_SENTENCE = "pos_sentence"  # 7 answers as full sentences
NEG_TEXT = "neg_text"  # 7 hard negatives
QRY_SENTENCE = "qry_sentence"  # a description of the image
# Optional columns: a stable id, and the URL an image can be fetched from.
# Without an id column, ingest derives one from the row position and content.
SAMPLE_ID = "sample_id"
IMAGE_URL = "image_url"

M3T_ARROW_SCHEMA = pa.schema(
    [
        pa.field(QRY, pa.list_(pa.list_(pa.string()))),
        pa.field(QRY_IMAGE_PATH, pa.string()),
        pa.field(POS_TEXT, pa.list_(pa.string())),
        pa.field(POS_IMAGE_PATH, pa.string()),
        pa.field(POS_SENTENCE, pa.list_(pa.string())),
        pa.field(NEG_TEXT, pa.list_(pa.string())),
        pa.field(QRY_SENTENCE, pa.string()),
    ]
)
