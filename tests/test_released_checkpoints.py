"""Released checkpoints of every backbone family, and naver-ai/MuCo-2B, at tiny width.

The directories are written by tests/released_checkpoints.py with safetensors
and tokenizers directly (the published key names, config.json, tokenizer and
preprocessor files of Qwen2-VL-2B, Qwen2.5-VL-3B, Qwen3-VL-2B and Qwen3.5-0.8B),
so every expectation here is the tensor or id that was written, not what
muco-flow saved.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, DatasetError
from PIL import Image
from safetensors.torch import load_file, save_file

from muco_flow import settings
from muco_flow.data.conversations import FormatConfig
from muco_flow.datasets import PretrainedCheckpointDataset
from muco_flow.modeling.backbone import BackboneConfig, PixelLimits, family_preset, load_backbone, load_processors
from muco_flow.modeling.embedder import (
    EmbedderSettings,
    LoraSettings,
    MuCoEmbedder,
    build_training_embedder,
    load_embedder,
)
from muco_flow.modeling.inputs import build_model_inputs, image_inputs
from muco_flow.modeling.loss import multi_turn_contrastive_loss
from muco_flow.modeling.prompt import single_turn_text
from muco_flow.pipelines.evaluate.nodes import evaluate_baseline, evaluate_trained_model, load_evaluation_sets
from tests.conftest import PROJECT_ROOT, SMALL_RUN_PARAMS, kedro_run, load_params, new_project
from tests.released_checkpoints import RELEASES, write_muco, write_release
from tests.test_families import assert_inputs_equal, family_processor

INFERENCE = EmbedderSettings(lora=LoraSettings(enabled=False))
ENCODE_TEMPLATE = FormatConfig.from_params(load_params()["format"]).templates.single_turn()
FAMILIES = list(RELEASES)
LAYOUTS = [*FAMILIES, "muco"]
Written = tuple[Path, dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_presets) -> Callable[[str], Written]:
    """A family's release (or "muco": naver-ai/MuCo-2B) written once per module on first use, at
    the width of that family's tiny preset; (directory, the tensors written by stored key)."""
    written: dict[str, Written] = {}

    def get(layout: str) -> Written:
        if layout not in written:
            root = tmp_path_factory.mktemp("released")
            if layout == "muco":
                directory = root / "MuCo-2B"
                written[layout] = directory, write_muco(directory, family_preset(tiny_presets, "qwen2_vl"))
            else:
                directory = root / RELEASES[layout].repo.split("/")[1]
                written[layout] = directory, write_release(directory, layout, family_preset(tiny_presets, layout))
        return written[layout]

    return get


@pytest.fixture(scope="module")
def qwen_dir(release) -> Written:
    return release("qwen2_vl")


@pytest.fixture(scope="module")
def muco_dir(release) -> Written:
    return release("muco")


def module_name(layout: str, stored_key: str) -> str | None:
    """Where a key of the published safetensors lives in transformers 5's ...ForConditionalGeneration.

    Qwen2-VL and Qwen2.5-VL (and MuCo-2B) store legacy names (``model.layers.*``,
    ``visual.*``); Qwen3-VL and Qwen3.5 store the modules' own. None: a tensor the
    release holds that transformers does not load (Qwen3.5's multi-token-prediction head).
    """
    if stored_key.startswith("mtp."):
        return None
    if layout in ("qwen3_vl", "qwen3_5"):
        return stored_key
    if stored_key.startswith("visual."):
        return "model." + stored_key
    return "model.language_model." + stored_key.removeprefix("model.")


def written_ids(directory) -> dict[str, int]:
    """Token ids as tokenizer_config.json's added_tokens_decoder declares them."""
    decoder = json.loads((directory / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    return {entry["content"]: int(i) for i, entry in decoder.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_published_weight_loads_where_it_belongs(layout, release):
    directory, written = release(layout)
    assert len({p.name for p in directory.glob("model-*.safetensors")}) == 2
    model = load_backbone(str(directory)).model
    state = model.state_dict()
    homes = {key: module_name(layout, key) for key in written}
    for key, name in homes.items():
        if name is not None:
            assert torch.equal(state[name], written[key].float()), key
    # tied, as in every family's 2B-class release: no lm_head.weight is stored
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    loaded = [name for name in homes.values() if name is not None]
    assert len(state) - 1 == len(loaded)  # everything but the tied head came from the files
    dropped = [key for key, name in homes.items() if name is None]
    assert len(dropped) == (15 if layout == "qwen3_5" else 0)  # Qwen3.5's MTP head: fc, 3 norms, 1 layer of 11
    assert not any(name.startswith("mtp.") for name in state)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_stock_release_gets_the_muco_tokens_after_its_own(family, release):
    directory, written = release(family)
    ids = written_ids(directory)
    assert list(ids) == list(RELEASES[family].added_tokens)
    embedder = MuCoEmbedder(load_backbone(str(directory)), INFERENCE)
    tokenizer = embedder.tokenizer
    # as MuCo's add_special_tokens does on Qwen's tokenizer: right after the family's last token
    # (Qwen2-VL: 151657, 151658 after <|video_pad|> 151656; Qwen2.5-VL after <|file_sep|> 151664;
    # Qwen3-VL after </think> 151668; Qwen3.5 after <|audio_pad|> 248076)
    last = max(ids.values())
    assert tokenizer.convert_tokens_to_ids(["<|emb|>", "<|mask|>"]) == [last + 1, last + 2]
    for token, token_id in ids.items():  # the family's own ids stay
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    # the matrix is padded past the tokenizer (like 151936 > 151659): the new tokens take existing rows
    rows = written[next(k for k in written if k.endswith("embed_tokens.weight"))]
    embedding = embedder.model.get_input_embeddings().weight
    assert embedding.shape[0] == rows.shape[0] > len(tokenizer)
    torch.testing.assert_close(embedding, rows.float(), rtol=0, atol=0)


def test_an_unpadded_matrix_is_resized_and_keeps_its_rows(tmp_path, tiny_preset):
    written = write_release(tmp_path / "unpadded", "qwen2_vl", tiny_preset, pad_vocab=False)
    rows = written["model.embed_tokens.weight"]
    embedder = MuCoEmbedder(load_backbone(str(tmp_path / "unpadded")), INFERENCE)
    embedding = embedder.model.get_input_embeddings().weight
    assert embedding.shape[0] == len(embedder.tokenizer) == rows.shape[0] + 2
    torch.testing.assert_close(embedding[: rows.shape[0]], rows.float(), rtol=0, atol=0)
    assert embedder.emb_token_id == rows.shape[0]


def test_a_muco_release_keeps_its_trained_emb_and_mask_rows(muco_dir):
    directory, written = muco_dir
    ids = written_ids(directory)
    assert list(ids)[-2:] == ["<|emb|>", "<|mask|>"]
    tokenizer_size = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]) + len(ids)
    embedder = MuCoEmbedder(load_backbone(str(directory)), INFERENCE)
    assert len(embedder.tokenizer) == tokenizer_size  # nothing added
    assert embedder.emb_token_id == ids["<|emb|>"]
    assert embedder.special_token_ids == [ids["<|emb|>"], ids["<|mask|>"]]
    embedding = embedder.model.get_input_embeddings().weight
    rows = written["model.embed_tokens.weight"]
    assert embedding.shape == rows.shape
    for token in ("<|emb|>", "<|mask|>"):
        assert torch.equal(embedding[ids[token]], rows[ids[token]].float()), token


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_release_encodes_text_and_image(layout, release):
    directory, _ = release(layout)
    embedder, template = load_embedder(str(directory), default_template=ENCODE_TEMPLATE)
    assert not embedder.settings.bidirectional  # MuCo evaluates causally
    picture = Image.new("RGB", (96, 80), (30, 160, 40))
    vectors = embedder.encode(
        [("What color is it?", picture), ("What color is it?", None), ("a green square", None)],
        template=template,
        progress=False,
    )
    assert vectors.shape == (3, 128)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(vectors[0], vectors[1])  # the image reaches the embedding


# (shortest_edge, longest_edge) as each release's preprocessor_config.json sets them:
# min_pixels/max_pixels in Qwen2-VL's and Qwen2.5-VL's, a ``size`` object in Qwen3-VL's and Qwen3.5's
PUBLISHED_PIXELS = {
    "qwen2_vl": (3136, 12845056),
    "qwen2_5_vl": (3136, 12845056),
    "qwen3_vl": (65536, 16777216),
    "qwen3_5": (65536, 16777216),
}
# One visual token covers a (patch x merge)^2 square: 14 x 2 for Qwen2/2.5-VL, 16 x 2 for Qwen3-VL/3.5.
# Hand-computed with smart_resize (sides to multiples of the token side, area into [256, 1280] tokens):
# 56x56 is scaled up to 448x448 (28) or 512x512 (32): 16 x 16 merged tokens, a 32 x 32 patch grid;
# 640x480 rounds to 644x476, 23 x 17 = 391 tokens (28), or stays 640x480, 20 x 15 = 300 tokens (32).
TOKEN_SIDE = {"qwen2_vl": 28, "qwen2_5_vl": 28, "qwen3_vl": 32, "qwen3_5": 32}
SMALL_AND_VGA_TOKENS = {28: [256, 391], 32: [256, 300]}


@pytest.mark.parametrize("family", FAMILIES)
def test_pixel_limits_come_from_the_checkpoint_unless_set(family, release):
    directory = str(release(family)[0])
    _, processor = load_processors(directory)
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == PUBLISHED_PIXELS[family]
    published = json.loads((release(family)[0] / "preprocessor_config.json").read_text())
    assert [list(processor.image_mean), list(processor.image_std)] == [published["image_mean"], published["image_std"]]
    side = TOKEN_SIDE[family]
    muco = PixelLimits(min_pixels=side * side * 256, max_pixels=side * side * 1280)  # MuCo's 256..1280 tokens
    _, processor = load_processors(directory, image_limits=muco)
    sizes = [(56, 56), (640, 480), (4000, 3000)]
    _, grids, counts = image_inputs(processor, [Image.new("RGB", s) for s in sizes])
    assert counts[:2] == SMALL_AND_VGA_TOKENS[side]
    assert 256 <= counts[2] <= 1280
    assert grids[0].tolist() == [1, 32, 32]
    # one limit alone keeps the other from the checkpoint
    _, processor = load_processors(directory, image_limits=PixelLimits(max_pixels=1003520))
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (PUBLISHED_PIXELS[family][0], 1003520)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_releases_inputs_equal_what_transformers_reads_from_it(family, release):
    """muco-flow's loaders against transformers' own: the tokenizer class transformers picks for the
    family (Qwen3.5's Qwen3_5Tokenizer builds its own pre-tokenizer) and the image processor it reads
    from the published preprocessor_config.json, inside the family's processor."""
    directory = str(release(family)[0])
    tokenizer, image_processor = load_processors(directory)
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    their_tokenizer.add_special_tokens({"additional_special_tokens": ["<|emb|>", "<|mask|>"]})
    their_image_processor = transformers.AutoImageProcessor.from_pretrained(directory, backend="pil")
    processor = family_processor(family, their_tokenizer, their_image_processor)
    assert_inputs_equal(family, tokenizer, image_processor, processor)


def test_a_muco_release_keeps_its_eval_pixel_limits(muco_dir):
    _, processor = load_processors(str(muco_dir[0]))
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (200704, 1003520)


@pytest.mark.parametrize(
    "image, message",
    [
        ({"min_pixels": 100}, "at least 784"),
        ({"max_pixels": "1280"}, "must be an integer"),
        ({"min_pixels": 1003520, "max_pixels": 200704}, "larger than max_pixels"),
        ({"min_tokens": 256}, "unknown keys"),
    ],
)
def test_bad_pixel_limits_are_named(image, message):
    with pytest.raises(ValueError, match=message):
        BackboneConfig.from_params({"image": image})


def test_environments_set_the_pixel_limits():
    assert BackboneConfig.from_params(load_params("base")["backbone"]).image == PixelLimits()
    assert BackboneConfig.from_params(load_params("cluster")["backbone"]).image == PixelLimits(200704, 1003520)


def test_the_cluster_checkpoint_can_be_a_local_download(qwen_dir):
    directory = str(qwen_dir[0])
    # as `kedro run --env cluster --params=backbone_checkpoint=<directory>` sees it
    args = {**settings.CONFIG_LOADER_ARGS, "default_run_env": "cluster"}
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), **args, runtime_params={"backbone_checkpoint": directory})
    catalog = DataCatalog.from_config(loader["catalog"], credentials=loader["credentials"])
    assert catalog.load("backbone_checkpoint") == directory


@pytest.mark.parametrize("family", FAMILIES)
def test_an_incomplete_download_is_named(family, release, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(release(family)[0], partial)
    assert PretrainedCheckpointDataset(str(partial)).load() == str(partial)  # complete: nothing to name
    (partial / "model-00002-of-00002.safetensors").unlink()
    (partial / "preprocessor_config.json").unlink()
    with pytest.raises(DatasetError, match=r"missing: preprocessor_config.json, model-00002-of-00002.safetensors"):
        PretrainedCheckpointDataset(str(partial)).load()
    with pytest.raises(FileNotFoundError, match=r"lacks its weights: model-00002-of-00002\.safetensors"):
        load_backbone(str(partial))


def test_an_unmerged_adapter_is_named(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    save_file({"base_model.model.lora_A.weight": torch.zeros(2, 2)}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(DatasetError, match="is a PEFT adapter, not a model"):
        PretrainedCheckpointDataset(str(adapter)).load()
    with pytest.raises(ValueError, match="is a PEFT adapter, not a model"):
        load_backbone(str(adapter))


def test_a_weight_the_files_lack_is_an_error_not_a_random_init(qwen_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(qwen_dir[0], broken)
    shard = broken / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    del tensors["model.norm.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"1 weights missing \(first: \['model.language_model.norm.weight'\]\)"):
        load_backbone(str(broken))


EVAL_SETS = ("MiniShapes-Color", "MiniShapes-T2I")
EVAL_PIXELS = {"min_pixels": 3136, "max_pixels": 12544}  # 4..16 visual tokens (28 px), 3..12 (32 px)


@pytest.fixture(scope="module")
def eval_sets(small_sample_root):
    params = {**load_params()["evaluate"], "batch_size": 16}
    params["m3t_heldout"] = params["mbeir"] = None  # MMEB only, two of its sets (below): kept small
    sets = load_evaluation_sets(str(small_sample_root), params)
    sets["mmeb"] = [s for s in sets["mmeb"] if s.name in EVAL_SETS]  # kept small
    return sets, params


def test_evaluate_scores_a_release_as_model_and_as_baseline(eval_sets, qwen_dir, muco_dir):
    sets, params = eval_sets
    format_params = load_params()["format"]
    backbone = {**load_params()["backbone"], "image": EVAL_PIXELS}
    baseline = evaluate_baseline(sets, "not-used", {**params, "baseline": str(qwen_dir[0])}, format_params, backbone)
    model = evaluate_trained_model(
        sets, {"model_dir": "not-used"}, {**params, "model": str(muco_dir[0])}, format_params, backbone
    )
    for metrics in (baseline, model):
        assert set(metrics["mmeb"]["datasets"]) == {"MiniShapes-Color", "MiniShapes-T2I"}
        assert 0.0 <= metrics["mmeb"]["average"] <= 1.0
    assert model != baseline  # two different checkpoints were scored


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])  # Qwen2-VL's: the test above
def test_evaluate_scores_each_family_release(family, release, eval_sets):
    directory = str(release(family)[0])
    sets, params = eval_sets
    sets = {**sets, "mmeb": [s for s in sets["mmeb"] if s.name == "MiniShapes-Color"]}  # one set: kept fast
    format_params = load_params()["format"]
    backbone = {**load_params()["backbone"], "image": EVAL_PIXELS}
    baseline = evaluate_baseline(sets, "not-used", {**params, "baseline": directory}, format_params, backbone)
    model = evaluate_trained_model(
        sets, {"model_dir": "not-used"}, {**params, "model": directory}, format_params, backbone
    )
    assert set(baseline["mmeb"]["datasets"]) == {"MiniShapes-Color"}
    assert 0.0 <= baseline["mmeb"]["average"] <= 1.0
    # a release without muco_embedder.json encodes the same way in either role
    assert model["mmeb"] == baseline["mmeb"]


# DoRA's targets (conf/base training.embedder.lora.target_modules) in the tiny releases' 4 text layers:
# q/k/v/o and gate/up/down in each layer (4 x 7); Qwen3.5's 3 Gated DeltaNet layers have no q/k/v/o
# projections, so only their MLPs (3 x 3) and the full-attention layer (7) are adapted.
DORA_MODULES = {"qwen2_vl": 28, "qwen2_5_vl": 28, "qwen3_vl": 28, "qwen3_5": 16}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_release_trains_one_step_with_dora_and_saves_a_model_that_loads(family, release, tmp_path):
    """One stage-1 step in process: the loss reaches DoRA and the MuCo rows, never the vision tower;
    the merged model (in the current key names, whatever the release's) loads and encodes the same."""
    directory, _ = release(family)
    params = load_params()
    backbone = {**params["backbone"], "image": EVAL_PIXELS}
    embedder = build_training_embedder(str(directory), backbone, params["training"]["embedder"], seed=0).train()
    picture = Image.new("RGB", (96, 80), (30, 160, 40))
    items = [("What color is it?", picture), ("a red circle", None), ("green", None), ("a circle", picture)]
    texts = [single_turn_text(text, image is not None, ENCODE_TEMPLATE) for text, image in items]
    batch = build_model_inputs(embedder.tokenizer, embedder.image_processor, texts, [im for _, im in items])
    emb_index = (batch["input_ids"] == embedder.emb_token_id).nonzero()

    vectors = embedder(**batch, emb_index=emb_index)
    loss = multi_turn_contrastive_loss(vectors[:2], vectors[2:], turns=1)
    assert torch.isfinite(loss)
    loss.backward()
    trainable = {name: p for name, p in embedder.named_parameters() if p.requires_grad}
    assert not any(".visual." in name for name in trainable)  # the vision tower stays frozen
    magnitudes = [name for name in trainable if "lora_magnitude_vector" in name]
    assert len(magnitudes) == DORA_MODULES[family]
    assert all("language_model" in name for name in magnitudes)
    assert sum("trainable_tokens" in name for name in trainable) == 1  # the <|emb|>/<|mask|> rows
    for name, parameter in trainable.items():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert all(parameter.grad.abs().sum() > 0 for name, parameter in trainable.items() if "lora_B" in name)

    before = vectors.detach()
    torch.optim.AdamW(trainable.values(), lr=1e-3).step()
    with torch.no_grad():
        after = embedder(**batch, emb_index=emb_index)
    assert not torch.allclose(after, before)  # the step changed the embeddings

    trained = embedder.encode(items, template=ENCODE_TEMPLATE, progress=False)
    embedder.save_merged(tmp_path / "merged", ENCODE_TEMPLATE)
    merged, template = load_embedder(str(tmp_path / "merged"), default_template="not-used")
    assert merged.emb_token_id == embedder.emb_token_id
    torch.testing.assert_close(merged.encode(items, template=template, progress=False), trained, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_train_and_evaluate_from_a_downloaded_qwen2_vl(tmp_path, tiny_preset):
    """The README's recipe: conf/local points backbone_checkpoint at a download; data, train, evaluate."""
    download = tmp_path / "models" / "Qwen2-VL-2B-Instruct"
    write_release(download, "qwen2_vl", tiny_preset)
    project = new_project(tmp_path / "project")
    (project / "conf/local/catalog.yml").write_text(
        f"backbone_checkpoint:\n  type: muco_flow.datasets.PretrainedCheckpointDataset\n  name_or_path: {download}\n"
    )
    pixels = "backbone.image.min_pixels=3136,backbone.image.max_pixels=12544"  # 4..16 visual tokens: fast
    kedro_run(project, "--pipelines=sample", f"--params={SMALL_RUN_PARAMS}")
    kedro_run(project, "--pipelines=data", f"--params={pixels}")
    training = "training.max_steps=3,training.micro_batch_size=4,training.warmup_steps=1,training.save_every=3"
    kedro_run(project, "--pipelines=train", f"--params={pixels},{training}")
    kedro_run(project, "--pipelines=evaluate", f"--params={pixels}")

    record = json.loads((project / "data/06_models/train_run.json").read_text())
    assert record["steps"] == 3
    ids = written_ids(download)
    trained = load_backbone(str(project / record["model_dir"]))
    assert trained.tokenizer.convert_tokens_to_ids("<|emb|>") == ids["<|video_pad|>"] + 1
    assert trained.image_processor.size["longest_edge"] == 12544  # the limits training used travel with the model
    metrics = json.loads((project / "data/08_reporting/metrics.json").read_text())
    assert 0.0 <= metrics["model"]["mmeb"]["average"] <= 1.0
    assert 0.0 <= metrics["baseline"]["mmeb"]["average"] <= 1.0
    assert f"Model: `{record['model_dir']}`" in (project / "data/08_reporting/evaluation_report.md").read_text()
