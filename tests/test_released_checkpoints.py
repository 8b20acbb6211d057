"""Released checkpoints: Qwen/Qwen2-VL-2B-Instruct and naver-ai/MuCo-2B layouts, at tiny width.

The directories are written by tests/released_checkpoints.py with safetensors
and tokenizers directly, so every expectation here is the tensor or id that
was written, not what muco-flow saved.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, DatasetError
from PIL import Image
from safetensors.torch import load_file, save_file

from muco_flow import settings
from muco_flow.data.conversations import FormatConfig
from muco_flow.datasets import PretrainedCheckpointDataset
from muco_flow.modeling.backbone import BackboneConfig, PixelLimits, load_backbone, load_processors
from muco_flow.modeling.embedder import EmbedderSettings, LoraSettings, MuCoEmbedder, load_embedder
from muco_flow.modeling.inputs import image_inputs
from muco_flow.pipelines.evaluate.nodes import evaluate_baseline, evaluate_trained_model, load_evaluation_sets
from tests.conftest import PROJECT_ROOT, SMALL_RUN_PARAMS, kedro_run, load_params, new_project
from tests.released_checkpoints import QWEN_SPECIAL_TOKENS, write_muco, write_release

INFERENCE = EmbedderSettings(lora=LoraSettings(enabled=False))
ENCODE_TEMPLATE = FormatConfig.from_params(load_params()["format"]).templates.single_turn()


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tiny_preset):
    directory = tmp_path_factory.mktemp("released") / "Qwen2-VL-2B-Instruct"
    return directory, write_release(directory, "qwen2_vl", tiny_preset)


@pytest.fixture(scope="module")
def muco_dir(tmp_path_factory, tiny_preset):
    directory = tmp_path_factory.mktemp("released") / "MuCo-2B"
    return directory, write_muco(directory, tiny_preset)


def module_name(stored_key: str) -> str:
    """Where a key of the published safetensors lives in transformers 5's Qwen2VLForConditionalGeneration."""
    if stored_key.startswith("visual."):
        return "model." + stored_key
    return "model.language_model." + stored_key.removeprefix("model.")


def written_ids(directory) -> dict[str, int]:
    """Token ids as tokenizer_config.json's added_tokens_decoder declares them."""
    decoder = json.loads((directory / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    return {entry["content"]: int(i) for i, entry in decoder.items()}


@pytest.mark.parametrize("layout", ["qwen_dir", "muco_dir"])
def test_every_published_weight_loads_where_it_belongs(layout, request):
    directory, written = request.getfixturevalue(layout)
    assert len({p.name for p in directory.glob("model-*.safetensors")}) == 2
    model = load_backbone(str(directory)).model
    state = model.state_dict()
    for key, tensor in written.items():
        assert torch.equal(state[module_name(key)], tensor.float()), key
    # tied, as in Qwen2-VL-2B: no lm_head.weight is stored
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert len(state) - 1 == len(written)  # everything but the tied head came from the files


def test_a_stock_qwen2_vl_gets_the_muco_tokens_after_its_own(qwen_dir):
    directory, written = qwen_dir
    ids = written_ids(directory)
    assert list(ids) == list(QWEN_SPECIAL_TOKENS)
    embedder = MuCoEmbedder(load_backbone(str(directory)), INFERENCE)
    tokenizer = embedder.tokenizer
    # as MuCo's add_special_tokens does on Qwen's tokenizer: 151657, 151658 after <|video_pad|> 151656
    assert tokenizer.convert_tokens_to_ids(["<|emb|>", "<|mask|>"]) == [
        ids["<|video_pad|>"] + 1,
        ids["<|video_pad|>"] + 2,
    ]
    for token, token_id in ids.items():  # Qwen's own ids stay
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    # the matrix is padded past the tokenizer (like 151936 > 151659): the new tokens take existing rows
    rows = written["model.embed_tokens.weight"]
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


@pytest.mark.parametrize("layout", ["qwen_dir", "muco_dir"])
def test_a_release_encodes_text_and_image(layout, request):
    directory, _ = request.getfixturevalue(layout)
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


def test_pixel_limits_come_from_the_checkpoint_unless_set(qwen_dir, muco_dir):
    _, processor = load_processors(str(qwen_dir[0]))
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (3136, 12845056)
    _, processor = load_processors(str(muco_dir[0]))
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (200704, 1003520)
    muco = PixelLimits(min_pixels=28 * 28 * 256, max_pixels=28 * 28 * 1280)
    _, processor = load_processors(str(qwen_dir[0]), image_limits=muco)
    # hand-computed with Qwen2-VL's smart_resize (sides to multiples of 28, area into the range):
    # 56x56 is scaled up by sqrt(200704 / 3136) = 8 to 448x448: 16 x 16 merged tokens;
    # 640x480 rounds to 644x476 (23 x 17 merged tokens = 391); 4000x3000 shrinks to at most 1280
    sizes = [(56, 56), (640, 480), (4000, 3000)]
    _, grids, counts = image_inputs(processor, [Image.new("RGB", s) for s in sizes])
    assert counts[:2] == [256, 391]
    assert 256 <= counts[2] <= 1280
    assert grids[0].tolist() == [1, 32, 32]
    # one limit alone keeps the other from the checkpoint
    _, processor = load_processors(str(qwen_dir[0]), image_limits=PixelLimits(max_pixels=50176))
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (3136, 50176)


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


def test_an_incomplete_download_is_named(qwen_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(qwen_dir[0], partial)
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


def test_evaluate_scores_a_release_as_model_and_as_baseline(small_sample_root, qwen_dir, muco_dir):
    params = {**load_params()["evaluate"], "batch_size": 16}
    params["m3t_heldout"] = params["mbeir"] = None  # MMEB only, two of its sets (below): kept small
    sets = load_evaluation_sets(str(small_sample_root), params)
    sets["mmeb"] = [s for s in sets["mmeb"] if s.name in ("MiniShapes-Color", "MiniShapes-T2I")]  # kept small
    format_params = load_params()["format"]
    backbone = {**load_params()["backbone"], "image": {"min_pixels": 3136, "max_pixels": 12544}}  # 4..16 tokens
    baseline = evaluate_baseline(sets, "not-used", {**params, "baseline": str(qwen_dir[0])}, format_params, backbone)
    model = evaluate_trained_model(
        sets, {"model_dir": "not-used"}, {**params, "model": str(muco_dir[0])}, format_params, backbone
    )
    for metrics in (baseline, model):
        assert set(metrics["mmeb"]["datasets"]) == {"MiniShapes-Color", "MiniShapes-T2I"}
        assert 0.0 <= metrics["mmeb"]["average"] <= 1.0
    assert model != baseline  # two different checkpoints were scored


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
