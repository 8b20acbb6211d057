"""Backbone families: chosen by the checkpoint, and image inputs equal to each family's own transformers processor."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import transformers
from mlflow.tracking import MlflowClient
from PIL import Image

from muco_flow.modeling import tokens
from muco_flow.modeling.backbone import build_tiny_backbone, load_backbone, load_processors
from muco_flow.modeling.families import FAMILIES, family_named
from muco_flow.modeling.inputs import build_model_inputs
from muco_flow.registry.registration import fluent_tracking_uri
from tests.conftest import SMALL_RUN_PARAMS, kedro_run

# What each family's released checkpoints are (their config.json and preprocessor_config.json):
# model class, and the pixels of one visual token's side (patch x merge).
RELEASED = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", 28),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", 28),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", 32),
    "qwen3_5": ("Qwen3_5ForConditionalGeneration", 32),
}
TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    f"{tokens.VISION_BLOCK}\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>"
)
# (width, height): small but not stretched by MuCo, odd sides, larger than max_pixels, extreme aspect both ways
IMAGE_SIZES = [(30, 30), (97, 61), (1000, 750), (900, 45), (45, 900)]


def test_the_table_is_the_four_families_by_model_type():
    assert list(FAMILIES) == ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]
    assert [f.model_class.__name__ for f in FAMILIES.values()] == [name for name, _ in RELEASED.values()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_preset_is_its_family_and_loads_through_the_one_loader(family, family_backbone_dir):
    directory = family_backbone_dir(family)
    assert json.loads((directory / "config.json").read_text())["model_type"] == family
    backbone = load_backbone(str(directory))
    class_name, token_side = RELEASED[family]
    assert type(backbone.model).__name__ == class_name
    assert backbone.family.model_type == family
    processor = backbone.image_processor
    assert processor.patch_size * processor.merge_size == token_side


def test_a_checkpoint_of_an_unsupported_family_is_refused_naming_the_supported_ones(tiny_backbone_dir, tmp_path):
    directory = tmp_path / "llava"
    shutil.copytree(tiny_backbone_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    supported = "supported: qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5"
    with pytest.raises(ValueError, match=f"checkpoint '{directory}': model_type 'llava' .*; {supported}"):
        load_backbone(str(directory))
    with pytest.raises(ValueError, match=f"model_type 'qwen9' .*; {supported}"):
        family_named("qwen9")


def test_a_preset_of_an_unknown_family_is_refused(tiny_presets):
    with pytest.raises(ValueError, match="model_type 'llava' is not a supported backbone family"):
        build_tiny_backbone(["a red circle"], tiny_presets, "llava")


def test_an_image_processor_that_cuts_other_patches_than_the_vision_tower_takes_is_refused(
    family_backbone_dir, tmp_path
):
    directory = tmp_path / "qwen3_vl"
    shutil.copytree(family_backbone_dir("qwen3_vl"), directory)
    preprocessor = json.loads((directory / "preprocessor_config.json").read_text())
    (directory / "preprocessor_config.json").write_text(json.dumps({**preprocessor, "patch_size": 14}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json cuts patches .*'patch_size': 14.*takes .*16"):
        load_backbone(str(directory))


@pytest.mark.parametrize(
    "family, expected",
    [
        ("qwen2_vl", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"),
        ("qwen2_5_vl", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"),
        ("qwen3_vl", "<|im_start|>user\nhi<|im_end|>\n"),  # no default system prompt from Qwen3-VL on
        ("qwen3_5", "<|im_start|>user\nhi<|im_end|>\n"),
    ],
)
def test_each_preset_carries_its_familys_chat_template(family, expected, family_backbone_dir):
    tokenizer, _ = load_processors(str(family_backbone_dir(family)))
    written = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert written == expected


def family_processor(family: str, tokenizer, image_processor):
    """The family's own transformers processor around muco-flow's tokenizer and image processor.

    Its constructor checks the class of every sub-processor, and the video
    processor's class needs torchvision, which this machine lacks; images
    never reach the video processor, so it is left out of that check.
    """
    processor_class = getattr(transformers, family_named(family).processor_class_name)

    class WithoutVideo(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    return WithoutVideo(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_image_inputs_equal_the_familys_own_processor(family, family_backbone_dir):
    tokenizer, image_processor = load_processors(str(family_backbone_dir(family)))
    assert_inputs_equal(family, tokenizer, image_processor, family_processor(family, tokenizer, image_processor))


def assert_inputs_equal(family, tokenizer, image_processor, processor) -> None:
    """muco-flow's inputs from ``tokenizer`` and ``image_processor`` are ``processor``'s, image size by size."""
    rng = np.random.default_rng(0)
    for width, height in IMAGE_SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ours = build_model_inputs(tokenizer, image_processor, [TEXT], [image])
        theirs = processor(text=[TEXT], images=[image], return_tensors="pt")
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "pixel_values"):
            assert ours[key].tolist() == theirs[key].tolist(), (family, (width, height), key)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_large_image_takes_the_visual_tokens_its_familys_grid_gives(family, family_backbone_dir):
    """1000 x 750 under the tiny preset's 224 x 224 pixels, worked by hand from smart_resize (qwen2_vl's
    image_processing_pil_qwen2_vl.py): 28 px tokens give 168 x 252 px, 6 x 9 tokens; 32 px ones 192 x 256, 6 x 8."""
    tokenizer, image_processor = load_processors(str(family_backbone_dir(family)))
    batch = build_model_inputs(tokenizer, image_processor, [TEXT], [Image.new("RGB", (1000, 750))])
    image_tokens = int((batch["input_ids"] == tokens.token_id(tokenizer, tokens.IMAGE_PAD)).sum())
    assert image_tokens == {28: 6 * 9, 32: 6 * 8}[RELEASED[family][1]]


@pytest.mark.slow  # kedro runs: torchrun with 2 processes, evaluation, MLflow registry
@pytest.mark.timeout(2400)  # a loaded 2-core machine; one stage per run, so that a failure names its stage
def test_a_qwen3_vl_preset_trains_evaluates_and_registers_a_model_that_serves(project):
    """The default run's pipelines on a non-default family, a few steps on the small sample."""
    kedro_run(project, "--pipelines=sample", f"--params={SMALL_RUN_PARAMS}")
    kedro_run(project, "--pipelines=backbone,data", "--params=backbone.family=qwen3_vl")
    steps = "training.max_steps=2,training.save_every=2,training.micro_batch_size=4,training.warmup_steps=1"
    kedro_run(project, "--pipelines=train", f"--params={steps}", timeout_s=900)
    kedro_run(project, "--pipelines=evaluate,register", timeout_s=900)
    record = json.loads((project / "data/06_models/train_run.json").read_text())
    assert record["steps"] == 2
    assert json.loads((project / record["model_dir"] / "config.json").read_text())["model_type"] == "qwen3_vl"
    metrics = json.loads((project / "data/08_reporting/metrics.json").read_text())
    assert 0 <= metrics["model"]["mmeb"]["average"] <= 1 and 0 <= metrics["baseline"]["mmeb"]["average"] <= 1
    uri = f"sqlite:///{project / 'mlflow.db'}"
    version = MlflowClient(uri).get_model_version_by_alias("muco-embedder", "challenger")
    assert version.run_id == record["mlflow_run_id"]
    with fluent_tracking_uri(uri):
        served = mlflow.pyfunc.load_model("models:/muco-embedder@challenger")
    vectors = served.predict(pd.DataFrame([{"text": "a red circle", "image": None}]))
    assert vectors.shape == (1, 128)  # the qwen3_vl preset's text.hidden_size
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
