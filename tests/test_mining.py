"""Hard-negative mining: the false-negative rules on hand-worked rankings, mining against a brute-force reference,
resuming after an interruption, and the lineage a mined folder hands to stage 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from muco_flow.evaluation.encoding import EncodingCache
from muco_flow.mining.config import MiningConfig, MiningConfigError
from muco_flow.mining.filters import NegativeFilter, normalised_text, select_negatives
from muco_flow.mining.lineage import MANIFEST_FILE, mined_negatives_lineage, version_lineage_tags
from muco_flow.mining.mine import TrainingFile, mine_hard_negatives

NV_RETRIEVER = NegativeFilter(drop_duplicates_of_positive=True, max_fraction_of_positive=0.95, skip_top=0, keep=2)


def never(_: int) -> bool:
    return False


# --- the rules, on rankings worked by hand -----------------------------------------------------


def test_the_positive_itself_and_its_exact_duplicate_are_never_negatives():
    # candidate 7 is the positive; candidate 3 is the same target under another id
    ranked = [(7, 0.90), (3, 0.90), (5, 0.50), (6, 0.40), (8, 0.30)]
    dropped: dict[str, int] = {}
    chosen = select_negatives(ranked, 7, 0.90, NV_RETRIEVER, duplicates_positive=lambda c: c == 3, dropped=dropped)
    assert chosen == [5, 6]
    assert dropped == {"positive": 1, "duplicate_of_positive": 1, "beyond_keep": 1}


def test_a_near_duplicate_scoring_above_95_percent_of_the_positive_is_dropped_and_a_true_hard_negative_kept():
    # positive scores 0.80: the threshold is 0.76; 0.79 (a near-duplicate) goes, 0.76 (not above) stays
    ranked = [(1, 0.79), (0, 0.80), (2, 0.76), (3, 0.10)]
    dropped: dict[str, int] = {}
    chosen = select_negatives(ranked, 0, 0.80, NV_RETRIEVER, duplicates_positive=never, dropped=dropped)
    assert chosen == [2, 3]
    assert dropped == {"above_fraction_of_positive": 1, "positive": 1}


def test_without_a_threshold_the_near_duplicate_is_the_first_negative():
    rule = NegativeFilter(drop_duplicates_of_positive=True, max_fraction_of_positive=None, skip_top=0, keep=1)
    assert select_negatives([(1, 0.79), (0, 0.80), (2, 0.76)], 0, 0.80, rule, duplicates_positive=never) == [1]


def test_duplicates_are_kept_when_that_rule_is_off():
    rule = NegativeFilter(drop_duplicates_of_positive=False, max_fraction_of_positive=None, skip_top=0, keep=3)
    chosen = select_negatives([(3, 0.9), (7, 0.9), (5, 0.5)], 7, 0.9, rule, duplicates_positive=lambda c: c == 3)
    assert chosen == [3, 5]


def test_the_rank_window_skips_the_top_survivors_and_keeps_the_next_n():
    # survivors in order: 4, 5, 6, 8, 9 (2 is the positive, 3 above 0.95 x 0.5 = 0.475)
    ranked = [(2, 0.50), (3, 0.49), (4, 0.40), (5, 0.30), (6, 0.20), (8, 0.10), (9, 0.05)]
    rule = NegativeFilter(drop_duplicates_of_positive=True, max_fraction_of_positive=0.95, skip_top=2, keep=2)
    dropped: dict[str, int] = {}
    assert select_negatives(ranked, 2, 0.50, rule, duplicates_positive=never, dropped=dropped) == [6, 8]
    assert dropped == {"positive": 1, "above_fraction_of_positive": 1, "skipped_top": 2, "beyond_keep": 1}


def test_normalised_text_ignores_case_width_and_spacing_only():
    assert normalised_text("  A  Cat\non \uff2d\uff21\uff34 ")  # full-width MAT == "a cat on mat"
    assert normalised_text("a cat") != normalised_text("a cats")


def test_mining_settings_are_checked_with_their_dotted_key():
    values = {
        "model": None,
        "batch_size": 4,
        "pool_cache_dir": "x",
        "pool_block_rows": 4,
        "query_block_rows": 4,
        "search_depth": 8,
        "filter": {"drop_duplicates_of_positive": True, "max_fraction_of_positive": 0.95, "skip_top": 0, "keep": 0},
    }
    with pytest.raises(MiningConfigError, match=r"mine\.filter\.keep"):
        MiningConfig.from_dict(values)


# --- mining a small snapshot, against a full-matrix reference --------------------------------------

DIM = 6


class HandMadeEmbedder:
    """Each (text, image) gets a fixed unit vector from a digest of its text and pixels; counts what it encodes."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.encoded = 0
        self.fail_after = fail_after

    def vector(self, text: str, image: Image.Image | None) -> np.ndarray:
        digest = hashlib.sha256(text.encode() + (image.tobytes() if image is not None else b"-")).digest()
        v = np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal(DIM).astype(np.float32)
        return v / np.linalg.norm(v)

    def encode(self, inputs, *, template, batch_size=32, progress=True):
        if self.fail_after is not None and self.encoded + len(inputs) > self.fail_after:
            raise KeyboardInterrupt("stopped between blocks")
        self.encoded += len(inputs)
        return torch.from_numpy(np.stack([self.vector(text, image) for text, image in inputs]))


def write_snapshot(root: Path, rows_per_dataset: int = 24) -> list[TrainingFile]:
    """Two datasets; targets repeat (a shared pool entry), and one target is duplicated under another image name."""
    colours = {"red": (200, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 200), "grey": (90, 90, 90)}
    for name, rgb in colours.items():
        Image.new("RGB", (8, 8), rgb).save(root / f"{name}.png")
    (root / "red_copy.png").write_bytes((root / "red.png").read_bytes())
    files = []
    for dataset in ("Alpha", "Beta"):
        rows = []
        for i in range(rows_per_dataset):
            colour = list(colours)[i % 4]
            target = (f"{dataset} answer {i % 9}", "") if i % 3 else (f"a {colour} square", f"{colour}.png")
            rows.append({"qry": f"<|image_1|> {dataset} question {i}", "qry_image_path": f"{colour}.png",
                         "pos_text": target[0], "pos_image_path": target[1], "neg_text": "given",
                         "neg_image_path": "", "qry_sentence": "", "pos_sentence": ""})  # fmt: skip
        if dataset == "Alpha":  # the red square again, its text spaced and cased otherwise, its image a copy
            rows.append({**rows[0], "qry": "<|image_1|> one more", "pos_text": "A  Red square",
                         "pos_image_path": "red_copy.png"})  # fmt: skip
        relative = f"MMEB_train/{dataset}/{dataset.lower()}_generated_sentence.parquet"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / relative)
        files.append(TrainingFile(dataset, relative, root / relative, root, lambda path: (root / path).read_bytes()))
    return files


def mining_config(pool_dir: Path, **filter_settings) -> MiningConfig:
    rule = {"drop_duplicates_of_positive": True, "max_fraction_of_positive": 0.95, "skip_top": 1, "keep": 3}
    return MiningConfig.from_dict({
        "model": None, "batch_size": 4, "pool_cache_dir": str(pool_dir), "pool_block_rows": 5,
        "query_block_rows": 7, "search_depth": 12, "filter": rule | filter_settings,
    })  # fmt: skip


def mine(files, embedder, config, out: Path) -> dict:
    cache = EncodingCache(embedder, "{text}", 4, pool_dir=config.pool_cache_dir, model="hand-made", block_rows=5)
    out.mkdir(parents=True, exist_ok=True)
    return mine_hard_negatives(files, cache, config, out, model={"reference": "hand-made", "model_dir": "m",
                               "mlflow_run_id": "run-1", "registered": None, "content_hash": "abc"},
                               source={"uri": "snapshot"}, git_commit="c0ffee", encoding_code="e")  # fmt: skip


def reference_negatives(root: Path, table: pa.Table, rule: NegativeFilter, depth: int) -> list[list[tuple[str, str]]]:
    """The slow way: every row against the whole pool as one numpy matrix, sorted, the rules written out again."""
    embedder = HandMadeEmbedder()
    rows = table.to_pylist()
    pool = list(dict.fromkeys((r["pos_text"], r["pos_image_path"]) for r in rows))

    def open_image(path):
        return Image.open(root / path).convert("RGB") if path else None

    pool_matrix = np.stack([embedder.vector(text, open_image(image)) for text, image in pool])
    expected = []
    for r in rows:
        q = embedder.vector(r["qry"], open_image(r["qry_image_path"]))
        scores = pool_matrix @ q
        positive = pool.index((r["pos_text"], r["pos_image_path"]))
        order = np.argsort(-scores, kind="stable")[:depth]
        survivors = []
        for c in order:
            text, image = pool[c]
            same_image = (image == pool[positive][1]) or (
                image and pool[positive][1] and (root / image).read_bytes() == (root / pool[positive][1]).read_bytes()
            )
            duplicate = " ".join(text.lower().split()) == " ".join(pool[positive][0].lower().split()) and same_image
            if c == positive or (rule.drop_duplicates_of_positive and duplicate):
                continue
            if (
                rule.max_fraction_of_positive is not None
                and scores[c] > rule.max_fraction_of_positive * scores[positive]
            ):
                continue
            survivors.append(pool[c])
        expected.append(survivors[rule.skip_top : rule.skip_top + rule.keep])
    return expected


@pytest.mark.parametrize(
    "filter_settings",
    [{}, {"max_fraction_of_positive": None, "skip_top": 0, "keep": 30}, {"drop_duplicates_of_positive": False}],
    ids=["defaults", "depth-only", "duplicates-kept"],
)
def test_mining_equals_a_brute_force_reference_on_a_small_pool(tmp_path, filter_settings):
    root = tmp_path / "snapshot"
    root.mkdir()
    files = write_snapshot(root)
    config = mining_config(tmp_path / "pools", **filter_settings)
    manifest = mine(files, HandMadeEmbedder(), config, tmp_path / "mined")
    for file in files:
        source = pq.read_table(file.meta_path)
        mined = pq.read_table(tmp_path / "mined" / file.meta_file)
        expected = reference_negatives(root, source, config.filter, config.search_depth)
        pairs = zip(mined["neg_text"].to_pylist(), mined["neg_image_path"].to_pylist(), strict=True)
        got = [list(zip(texts, images, strict=True)) for texts, images in pairs]
        assert got == expected
        # every other column unchanged, row for row
        assert mined.drop(["neg_text", "neg_image_path"]).equals(source.drop(["neg_text", "neg_image_path"]))
    # 6 answers (i % 9 for i not a multiple of 3), 4 squares and the red copy
    assert manifest["datasets"]["Alpha"]["pool_size"] == 11


def test_the_duplicate_red_square_is_never_a_negative_of_the_red_square(tmp_path):
    root = tmp_path / "snapshot"
    root.mkdir()
    files = write_snapshot(root)
    config = mining_config(tmp_path / "pools", max_fraction_of_positive=None, skip_top=0, keep=30)
    manifest = mine(files, HandMadeEmbedder(), config, tmp_path / "mined")
    mined = pq.read_table(tmp_path / "mined" / files[0].meta_file).to_pylist()
    red = [r for r in mined if r["pos_image_path"] in ("red.png", "red_copy.png") and "quare" in r["pos_text"]]
    assert len(red) == 3  # rows 0 and 12 (red.png), and the last row (red_copy.png)
    for r in red:
        assert not {"red.png", "red_copy.png"} & set(r["neg_image_path"])
        assert len(r["neg_text"]) == 9  # the pool of 11 less the positive and its duplicate
    assert manifest["datasets"]["Alpha"]["dropped"]["duplicate_of_positive"] == 3


def test_mining_resumes_after_an_interruption_between_blocks_encoding_only_the_missing_blocks(tmp_path):
    root = tmp_path / "snapshot"
    root.mkdir()
    files = write_snapshot(root)
    config = mining_config(tmp_path / "pools")
    whole = HandMadeEmbedder()
    mine(files, whole, mining_config(tmp_path / "other-pools"), tmp_path / "uninterrupted")
    stopped = HandMadeEmbedder(fail_after=12)  # two blocks of 5, then the third one stops the run
    with pytest.raises(KeyboardInterrupt):
        mine(files, stopped, config, tmp_path / "mined")
    assert stopped.encoded == 10
    resumed = HandMadeEmbedder()
    mine(files, resumed, config, tmp_path / "mined")
    assert resumed.encoded == whole.encoded - 10
    for file in files:
        assert pq.read_table(tmp_path / "mined" / file.meta_file).equals(
            pq.read_table(tmp_path / "uninterrupted" / file.meta_file)
        )
    again = HandMadeEmbedder()
    mine(files, again, config, tmp_path / "mined")
    assert again.encoded == 0  # every block on disk: nothing encoded


# --- lineage ---------------------------------------------------------------------------------------


def test_shards_ingested_from_a_mined_folder_name_the_mining_model_pool_and_settings(tmp_path):
    root = tmp_path / "snapshot"
    root.mkdir()
    files = write_snapshot(root)
    mined = tmp_path / "mined"
    manifest = mine(files, HandMadeEmbedder(), mining_config(tmp_path / "pools"), mined)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"source": {"uri": str(mined), "meta_files": []}}))
    tags = mined_negatives_lineage(shards)
    raw = (mined / MANIFEST_FILE).read_bytes()
    assert tags == {
        "negatives": "mined",
        "mining_model": "hand-made",
        "mining_model_run_id": "run-1",
        "mining_model_version": "",
        "mining_model_content_hash": "abc",
        "mining_pool": "training-targets-per-dataset",
        "mining_settings_hash": tags["mining_settings_hash"],
        "mining_code_commit": "c0ffee",
        "mining_manifest_sha256": hashlib.sha256(raw).hexdigest(),
    }
    assert manifest["settings"]["filter"]["max_fraction_of_positive"] == 0.95
    assert version_lineage_tags(shards) == {
        "negatives": "mined",
        "mining_model": "hand-made",
        "mining_model_content_hash": "abc",
        "mining_manifest_sha256": hashlib.sha256(raw).hexdigest(),
    }
    # other settings, another hash
    other = mine(files, HandMadeEmbedder(), mining_config(tmp_path / "pools", keep=1), tmp_path / "mined2")
    (shards / "manifest.json").write_text(json.dumps({"source": {"uri": str(tmp_path / "mined2")}}))
    assert mined_negatives_lineage(shards)["mining_settings_hash"] != tags["mining_settings_hash"]
    assert other["settings"]["filter"]["keep"] == 1


def test_shards_of_the_given_negatives_carry_no_mining_lineage(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"source": {"uri": str(tmp_path / "snapshot")}}))
    assert mined_negatives_lineage(tmp_path) == {}
    assert mined_negatives_lineage(tmp_path / "missing") == {}


# --- the sample, the tiny model, and stage 2's ingest of the result -----------------------------


@pytest.mark.slow  # ~30 s: a real (tiny) model encodes two of the sample's datasets
def test_the_tiny_model_mines_the_sample_and_stage_2_ingests_the_mined_folder(small_sample_root, model_dir, tmp_path):
    from muco_flow.data.ingest import IngestConfig
    from muco_flow.data.mmeb_train_ingest import ingest_mmeb_train, open_meta_parts
    from muco_flow.datasets.mined_negatives import MinedNegativesDataset
    from muco_flow.mining.snapshot import mined_snapshot_writer
    from tests.conftest import load_params

    params = load_params()
    # no threshold: the fixture's model is untrained, its vectors nearly alike, so 0.95 x the positive drops all
    rule = params["mine"]["filter"] | {"max_fraction_of_positive": None}
    config = MiningConfig.from_dict(
        params["mine"] | {"pool_cache_dir": str(tmp_path / "pools"), "pool_block_rows": 16, "filter": rule}
    )
    parts = open_meta_parts(str(small_sample_root))
    chosen = [part for part in parts if part.dataset in ("MiniShapes-Cls", "MiniShapes-VQA")]
    stage1 = {"model_dir": str(model_dir), "mlflow_run_id": "stage-1-run"}
    writer = mined_snapshot_writer(chosen, stage1, config, params["backbone"], params["format"], "unused")
    mined = MinedNegativesDataset(str(tmp_path / "mined"), images_uri=str(small_sample_root))
    mined.save(writer)
    manifest = json.loads((tmp_path / "mined" / MANIFEST_FILE).read_text())
    assert manifest["model"]["mlflow_run_id"] == "stage-1-run"
    assert sorted(manifest["datasets"]) == ["MiniShapes-Cls", "MiniShapes-VQA"]
    for counts in manifest["datasets"].values():  # every row: `keep` negatives, or the whole pool less its positive
        assert counts["negatives"] == counts["rows"] * min(config.filter.keep, counts["pool_size"] - 1)
    loaded = mined.load()
    for part in loaded:
        for row in pq.read_table(part.source.meta_path()).to_pylist():
            positive = (normalised_text(row["pos_text"]), row["pos_image_path"])
            negatives = zip(row["neg_text"], row["neg_image_path"], strict=True)
            assert positive not in {(normalised_text(text), image) for text, image in negatives}
    shards = tmp_path / "shards"
    ingest_mmeb_train(loaded, shards, IngestConfig.from_params(params["finetune_ingest"]))
    ingested = json.loads((shards / "manifest.json").read_text())
    assert ingested["counts"]["rejected"] == 0, ingested["rejects_by_reason"]
    tags = mined_negatives_lineage(shards)
    assert tags["mining_model_run_id"] == "stage-1-run" and tags["mining_model"] == "train_run"


def test_a_training_run_on_mined_negatives_is_tagged_with_their_lineage():
    from muco_flow.training.config import TrainingConfig
    from muco_flow.training.stage import describe_run
    from tests.conftest import load_params

    training = TrainingConfig.from_dict({**load_params()["training"], "max_steps": 10})  # no conversations to count
    config = {
        "stage": "finetune",
        "checkpoint": "data/06_models/muco/model",
        "backbone": {},
        "conversations_dir": "nowhere",
        "shards_dir": "nowhere",
        "git_commit": "c",
    }
    kedro_run = {"pipelines": "finetune", "command": "kedro run", "env": "base"}
    lineage = {"negatives": "mined", "mining_model_run_id": "run-1"}
    tags = describe_run(config, training, kedro_run, "stage-1", lineage)["tags"]
    assert tags["muco_flow.negatives"] == "mined" and tags["muco_flow.mining_model_run_id"] == "run-1"
    assert tags["muco_flow.parent_run_id"] == "stage-1"
    assert not any("mining" in key for key in describe_run(config, training, kedro_run, "stage-1")["tags"])
