"""MMEB-train as MuCo's second stage reads it: one query, one target, hard negatives per row.

The format (TIGER-Lab/MMEB-train, with the image descriptions MuCo adds):
one ``<Dataset>/*_generated_sentence.parquet`` per training set under
``MMEB_train/`` (the naver-ai/M3T card lists the folders; naver-ai/muco
``src/loader.py`` line 521 globs the files), images relative to an image root
(loader.py lines 283-313 join them to ``image_folder``). The columns, as the
loader's single-turn branch reads them (lines 241-261):

- ``qry``, ``pos_text``: one string each; ``<|image_1|>`` marks the image;
- ``qry_image_path``, ``pos_image_path``: one string each, ``""`` = no image;
- ``qry_sentence``, ``pos_sentence``: a description of that side's image,
  which replaces it in the other side's reconstruction turn (lines 364-370);
- ``neg_text``, ``neg_image_path``: the hard negatives, optional; each a list
  (pandas gives numpy arrays) or a list written as a string, which the loader
  ``eval``s (lines 246-254). Here such a string is read as a JSON or Python
  literal and nothing else (``ast.literal_eval``), never evaluated. Negative
  i's image is ``neg_image_path[min(i, len - 1)]`` (line 257). A plain
  string that is no list literal is one negative (VLM2Vec's own files).

This module names the format; ``mmeb_train_ingest.py`` reads it with the ingest
engine that M3T's rules use too (``ingest.py``), and the bundled sample writes a
small set in it.
"""

from __future__ import annotations

from muco_flow.data import schema

SCHEMA_VERSION = "mmeb-train/1"

# Where MuCo's files are under a snapshot root (the naver-ai/M3T card's MMEB_train/
# folder; naver-ai/muco src/loader.py line 521 globs '*/*_generated_sentence.parquet').
META_GLOB = "MMEB_train/*/*_generated_sentence.parquet"

# The columns (naver-ai/muco src/loader.py lines 241-261, 279-281); the first
# six are TIGER-Lab/MMEB-train's, the sentences MuCo's.
QRY = schema.QRY
QRY_IMAGE_PATH = schema.QRY_IMAGE_PATH
POS_TEXT = schema.POS_TEXT
POS_IMAGE_PATH = schema.POS_IMAGE_PATH
NEG_TEXT = schema.NEG_TEXT
NEG_IMAGE_PATH = "neg_image_path"
QRY_SENTENCE = schema.QRY_SENTENCE
POS_SENTENCE = schema.POS_SENTENCE
COLUMNS = (QRY, QRY_IMAGE_PATH, POS_TEXT, POS_IMAGE_PATH, NEG_TEXT, NEG_IMAGE_PATH, QRY_SENTENCE, POS_SENTENCE)
