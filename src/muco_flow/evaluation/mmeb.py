"""MMEB evaluation files as they are downloaded, in both published layouts.

- **v1** (TIGER-Lab/MMEB-eval): ``qry_text`` holds the instruction and the
  ``<|image_1|>`` marker; ``qry_img_path``, ``tgt_text`` (list),
  ``tgt_img_path`` (list); ``""`` means no image. VLM2Vec v1 encodes the
  texts as they are (TIGER-AI-Lab/VLM2Vec, branch v1, ``src/dataset.py``).
- **Instruct** (ziyjiang/MMEB_Test_Instruct, what MuCo and VLM2Vec-V2 load):
  adds ``qry_inst`` and ``tgt_inst``. The text is then built per dataset
  kind, as naver-ai/muco ``src/data/eval_dataset/image_*.py`` build it
  (``data_prepare``, with ``process_input_text`` from
  ``src/model/processor.py`` lines 145-157); image candidates take their
  text from ``tgt_inst``.

The layout is detected per file, from its columns. A download holds
``<Dataset>/*.parquet`` or ``<Dataset>/test/*.parquet`` (the HF layout);
only configured datasets are read, so hidden folders (``.cache``), image
folders and extra sets (CIFAR-100) are left alone. Image paths are relative
to the unzipped images folder, a setting of its own.

Texts keep ``<|image_pad|>`` or ``<|image_1|>`` where the image goes;
modeling.prompt.single_turn_text makes the model's conversation from them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from muco_flow.evaluation.datasets import EvaluationDataError, Item, RetrievalSet, check_image
from muco_flow.modeling import tokens

logger = logging.getLogger(__name__)

META_TASKS = ("classification", "vqa", "retrieval", "visual_grounding")
V1_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
INSTRUCT_COLUMNS = ("qry_inst", "tgt_inst")

# naver-ai/muco src/model/processor.py line 30: VLM2Vec-V2's Qwen2-VL image token
IMAGE_TOKEN = tokens.IMAGE_PAD


def _with_image_token(instruction: str, text: str = "") -> str:
    """process_input_text(instruction, text=text, add_image_token=True) (processor.py lines 145-157)."""
    prompt = instruction + (" " + text if text else "")
    return IMAGE_TOKEN + " " + prompt


def _v1_consistent(text: str) -> str:
    # "to stay consistent with v1 eval" (image_cls_dataset.py line 24 and the other parsers)
    return text.replace(" \n", "\n") + "\n"


def _query_image_question(qry_inst: str, qry_text: str, *, newline_first: bool) -> str:
    """image_cls / image_i2t (newline_first False) and image_qa / image_i2i_vg (True) queries."""
    instruction = qry_inst.replace(tokens.IMAGE_1, "")
    if newline_first:
        instruction = "\n" + instruction.strip()
    return _v1_consistent(_with_image_token(instruction, qry_text))


def _image_candidates(tgt_inst: str, captions: list[str], count: int, *, trailing_newline: bool) -> list[str]:
    """image_t2i / image_i2i_vg candidates: tgt_inst (and the caption, where the set has one)."""
    instruction = tgt_inst.replace(tokens.IMAGE_1, "")
    if captions and captions[0].strip():  # WebQA, EDIS, RefCOCO-Matching: text with the image
        return [_v1_consistent(_with_image_token(instruction + " " + caption)) for caption in captions]
    text = _with_image_token(instruction).replace(" \n", "\n") + ("\n" if trailing_newline else "")
    return [text] * count


def _cls_qa_i2t(newline_first: bool) -> Callable[[dict[str, Any], str], tuple[Item, list[Item]]]:
    def build(row: dict[str, Any], dataset: str) -> tuple[Item, list[Item]]:
        query = Item(
            _query_image_question(row["qry_inst"], row["qry_text"], newline_first=newline_first),
            row["qry_img_path"] or None,
        )
        # text candidates only: these parsers pass no candidate image (image_cls_dataset.py line 31)
        return query, [Item(text) for text in row["tgt_text"]]

    return build


def _t2i(row: dict[str, Any], dataset: str) -> tuple[Item, list[Item]]:
    text = row["qry_inst"].replace(tokens.IMAGE_1, IMAGE_TOKEN) + " " + row["qry_text"] + "\n"
    if dataset == "VisDial":
        text += "\n"  # image_t2i_eval.py line 24 (the encoder then collapses the two newlines)
    paths = row["tgt_img_path"]
    texts = _image_candidates(row["tgt_inst"], row["tgt_text"], len(paths), trailing_newline=True)
    return Item(text), [Item(t, p or None) for t, p in zip(texts, paths, strict=True)]


def _i2i_vg(row: dict[str, Any], dataset: str) -> tuple[Item, list[Item]]:
    query = Item(
        _query_image_question(row["qry_inst"], row["qry_text"], newline_first=True), row["qry_img_path"] or None
    )
    paths = row["tgt_img_path"]
    texts = _image_candidates(row["tgt_inst"], row["tgt_text"], len(paths), trailing_newline=False)
    return query, [Item(t, p or None) for t, p in zip(texts, paths, strict=True)]


# the `dataset_parser` of each set in naver-ai/muco eval_configs/image.yaml
INSTRUCT_PARSERS: dict[str, Callable[[dict[str, Any], str], tuple[Item, list[Item]]]] = {
    "image_cls": _cls_qa_i2t(newline_first=False),
    "image_i2t": _cls_qa_i2t(newline_first=False),
    "image_qa": _cls_qa_i2t(newline_first=True),
    "image_t2i": _t2i,
    "image_i2i_vg": _i2i_vg,
}


def _v1_row(row: dict[str, Any], dataset: str) -> tuple[Item, list[Item]]:
    """v1 rows are encoded as written (VLM2Vec v1 src/dataset.py lines 154-175)."""
    texts, paths = row["tgt_text"], row["tgt_img_path"]
    return Item(row["qry_text"], row["qry_img_path"] or None), [
        Item(t, p or None) for t, p in zip(texts, paths, strict=True)
    ]


def dataset_files(directory: Path) -> list[Path]:
    """The parquet files of one downloaded set: ``<Dataset>/*.parquet``, else ``<Dataset>/test/*.parquet``."""
    files = sorted(directory.glob("*.parquet")) or sorted((directory / "test").glob("*.parquet"))
    return [f for f in files if not f.name.startswith(".")]


def read_mmeb_dataset(directory: Path, image_root: Path, meta_task: str, parser: str) -> RetrievalSet:
    """One dataset: each query ranked among its own candidates, the first one correct."""
    name = directory.name
    files = dataset_files(directory)
    if not files:
        raise EvaluationDataError(f"MMEB dataset {name}: no parquet file in {directory} or {directory / 'test'}")
    result = RetrievalSet(name=name, group=meta_task, root=image_root)
    seen: dict[Item, int] = {}
    row_number = 0
    for file in files:
        columns = pq.read_schema(file).names
        missing = [c for c in V1_COLUMNS if c not in columns]
        if missing:
            raise EvaluationDataError(f"MMEB dataset {name}: {file.name} has no column(s) {missing}")
        instruct = all(c in columns for c in INSTRUCT_COLUMNS)
        if instruct and parser not in INSTRUCT_PARSERS:
            raise EvaluationDataError(
                f"MMEB dataset {name}: {file.name} is in the Instruct layout, which needs a parser; "
                f"set evaluate.mmeb.datasets.{name}.parser to one of {sorted(INSTRUCT_PARSERS)}"
            )
        build = INSTRUCT_PARSERS[parser] if instruct else _v1_row
        wanted = [*V1_COLUMNS, *INSTRUCT_COLUMNS] if instruct else list(V1_COLUMNS)
        for row in pq.read_table(file, columns=wanted).to_pylist():
            where = f"MMEB dataset {name}, {file.name} row {row_number}"
            _add_row(result, seen, row, where, name, build)
            row_number += 1
    if not result.queries:
        raise EvaluationDataError(f"MMEB dataset {name}: no rows")
    return result


def _add_row(result: RetrievalSet, seen: dict[Item, int], row: dict[str, Any], where: str, name: str, build) -> None:
    for column in ("tgt_text", "tgt_img_path"):
        if row[column] is None:
            raise EvaluationDataError(f"{where}: {column} is null")
    texts, paths = row["tgt_text"], row["tgt_img_path"]
    if not texts and not paths:
        raise EvaluationDataError(f"{where}: the candidate list is empty")
    if len(texts) != len(paths):
        raise EvaluationDataError(f"{where}: {len(texts)} candidate texts but {len(paths)} candidate images")
    row = {k: ("" if v is None else v) for k, v in row.items()}
    query, candidates = build(row, name)
    for item in [query, *candidates]:
        if item.image:
            check_image(result.root, item.image, where)
    # A candidate with an empty text and no image is scored as an empty text, as the reference
    # evaluators do: their Qwen2-VL process_fn tokenizes it like any text ("in case of empty string,
    # only BOS is included": naver-ai/muco src/model/processor.py lines 79-86, TIGER-AI-Lab/VLM2Vec
    # src/model/processor.py lines 310-318). The query always holds the instruction, so an empty
    # one is a broken row, not a candidate that happens to be blank.
    if not query.image and not query.text.replace(tokens.IMAGE_1, "").replace(IMAGE_TOKEN, "").strip():
        raise EvaluationDataError(f"{where}: the query has neither text nor image")
    indices = [result.candidate_index(c, seen) for c in candidates]
    result.queries.append(query)
    # VLM2Vec scores the row's list in order; equal candidates are one item with one vector
    result.candidate_lists.append(list(dict.fromkeys(indices)))
    result.positives.append([indices[0]])


def read_mmeb(directory: Path, image_root: Path, datasets: dict[str, dict[str, str]]) -> list[RetrievalSet]:
    """Every configured dataset present under ``directory`` (``datasets``: name -> meta_task, parser)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EvaluationDataError(f"MMEB: no folder {directory}")
    invalid = sorted({d["meta_task"] for d in datasets.values() if d["meta_task"] not in META_TASKS})
    if invalid:
        raise EvaluationDataError(f"MMEB: unknown meta-task(s) {invalid}; use {list(META_TASKS)}")
    present = [name for name in datasets if (directory / name).is_dir()]
    if not present:
        raise EvaluationDataError(
            f"MMEB: none of the configured datasets is in {directory} (it has "
            f"{sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith('.'))}); "
            "add them to evaluate.mmeb.datasets"
        )
    ignored = sorted(
        p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in datasets
    )
    logger.info("MMEB: %d configured datasets in %s; not configured, left alone: %s", len(present), directory, ignored)
    return [
        read_mmeb_dataset(
            directory / name, Path(image_root), datasets[name]["meta_task"], datasets[name].get("parser", "")
        )
        for name in present
    ]
