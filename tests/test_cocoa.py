"""CoCoA's stage 0 objective (modeling/cocoa.py): which positions are hidden or reconstructed, and its loss."""

from __future__ import annotations

import contextlib

import pytest
import torch
from PIL import Image

from muco_flow.modeling import tokens
from muco_flow.modeling.attention_masks import pattern_mask, per_layer_type, truncated_mask
from muco_flow.modeling.backbone import load_backbone
from muco_flow.modeling.cocoa import BRIDGED, WARMUP, CocoaObjective, bridged_batch, mask_seed, warmup_masks
from muco_flow.modeling.embedder import EmbedderSettings, MuCoEmbedder
from muco_flow.modeling.families import FAMILIES
from muco_flow.modeling.inputs import build_model_inputs
from muco_flow.modeling.reconstruction_loss import masked_next_token_loss, masked_patch_loss, patch_targets
from muco_flow.training.cocoa_config import CocoaConfig, CocoaConfigError
from muco_flow.training.config import TrainingConfig, laid_over
from muco_flow.training.data import Batch
from muco_flow.training.launch import resolve_run_config
from muco_flow.training.train import cocoa_step, forward_backward
from tests.conftest import load_params, with_value

# a hand-built vocabulary: structure ids (special) and content ids
BOS, IMG, EMB, END, PAD = 1, 2, 3, 4, 0
SPECIAL = [BOS, IMG, EMB, END, PAD]
A, B, C, D, X = 11, 12, 13, 14, 15


def test_warmup_hides_the_given_share_of_content_text_and_image_tokens_only():
    input_ids = torch.tensor(
        [
            [A, B, IMG, IMG, IMG, IMG, C, D, EMB, END],  # position 0 is content but has no predecessor
            [BOS, A, B, C, D, EMB, END, PAD, PAD, PAD],  # no image
        ]
    )
    attention_mask = (input_ids != PAD).long()

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        return warmup_masks(
            input_ids,
            attention_mask,
            image_pad_id=IMG,
            special_ids=SPECIAL,
            text_ratio=0.5,
            image_ratio=0.75,
            generator=torch.Generator().manual_seed(0),
        )

    text, image = draw()
    # row 0: content text at 1, 6, 7 (0 excluded) -> round(1.5) = 2 hidden; images at 2..5 -> 3 hidden
    assert text[0].sum() == 2 and set(text[0].nonzero().flatten().tolist()) <= {1, 6, 7}
    assert image[0].sum() == 3 and set(image[0].nonzero().flatten().tolist()) <= {2, 3, 4, 5}
    # row 1: content text at 1..4 -> 2 hidden; no image token, none hidden
    assert text[1].sum() == 2 and set(text[1].nonzero().flatten().tolist()) <= {1, 2, 3, 4}
    assert not image[1].any()
    again = draw()
    assert torch.equal(again[0], text) and torch.equal(again[1], image)  # the same seed, the same masks


def test_the_bridged_batch_is_the_input_to_its_last_emb_then_its_text_again():
    input_ids = torch.tensor(
        [
            [BOS, A, B, IMG, IMG, C, EMB, END, BOS, D, EMB, END],
            [BOS, X, EMB, END, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
        ]
    )
    rows, bridges, predict = bridged_batch(
        input_ids, (input_ids != PAD).long(), emb_id=EMB, pad_id=PAD, image_pad_id=IMG, special_ids=SPECIAL
    )
    expected_ids = torch.tensor(
        [
            [BOS, A, B, IMG, IMG, C, EMB, END, BOS, D, EMB, A, B, C, D],
            [BOS, X, EMB, X, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
        ]
    )
    assert torch.equal(rows["input_ids"], expected_ids)
    assert rows["attention_mask"].tolist() == [[1] * 15, [1] * 4 + [0] * 11]
    assert rows["mm_token_type_ids"][0].nonzero().flatten().tolist() == [3, 4]
    assert bridges.tolist() == [10, 2]
    assert predict[0].nonzero().flatten().tolist() == [11, 12, 13, 14]
    assert predict[1].nonzero().flatten().tolist() == [3]


def test_a_bridged_row_needs_an_emb_and_no_image_after_it():
    with pytest.raises(ValueError, match=r"holds no <\|emb\|> to bridge"):
        bridged_batch(
            torch.tensor([[BOS, A]]), torch.ones(1, 2), emb_id=EMB, pad_id=PAD, image_pad_id=IMG, special_ids=SPECIAL
        )
    with pytest.raises(ValueError, match="image tokens after"):
        bridged_batch(
            torch.tensor([[A, EMB, IMG]]),
            torch.ones(1, 3),
            emb_id=EMB,
            pad_id=PAD,
            image_pad_id=IMG,
            special_ids=SPECIAL,
        )


def test_mask_seeds_differ_across_steps_and_ranks():
    assert len({mask_seed(0, step, rank) for step in range(50) for rank in range(8)}) == 400


TURN = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>\n"


@pytest.fixture(scope="module", params=list(FAMILIES))
def objective_and_batch(request, family_backbone_dir):
    """Each family's tiny preset: the objective must hold on every backbone the project trains."""
    torch.manual_seed(0)
    embedder = MuCoEmbedder(load_backbone(str(family_backbone_dir(request.param))), EmbedderSettings())
    with torch.no_grad():  # adapters that change the outputs, so the hand path must run through them too
        for name, parameter in embedder.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    weights = {"text": 0.7, "image": 1.3, "bridged": 0.9}
    objective = CocoaObjective(
        embedder, text_mask_ratio=0.3, image_mask_ratio=0.5, normalize_targets=True, loss_weights=weights
    ).eval()
    picture = Image.new("RGB", (112, 140), (200, 30, 30))
    texts = [
        TURN.format(tokens.VISION_BLOCK + "a red circle") + TURN.format("how many circles"),
        TURN.format(tokens.VISION_BLOCK + "a blue square on the left") + TURN.format("which color"),
    ]
    batch = build_model_inputs(embedder.tokenizer, embedder.image_processor, texts, [picture, picture])
    return objective, batch, weights


def hand_hidden(embedder, inputs, mask, hidden_positions):
    """The language model's last states, its input embeddings (and Qwen3-VL's deepstack features) assembled by hand:
    a hidden position's embedding is <|mask|>'s, and a hidden image token gets no deepstack feature."""
    vlm = embedder.vlm
    embed = vlm.get_input_embeddings()
    embeds = embed(inputs["input_ids"]).clone()
    image_tokens = inputs["input_ids"] == tokens.token_id(embedder.tokenizer, tokens.IMAGE_PAD)
    vision = vlm.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    embeds[image_tokens] = torch.cat(vision.pooler_output)
    hidden_positions = torch.zeros_like(image_tokens) if hidden_positions is None else hidden_positions
    mask_id = tokens.token_id(embedder.tokenizer, tokens.MASK_TOKEN)
    embeds[hidden_positions] = embed(torch.tensor([mask_id]))[0]
    extra = {}
    if getattr(vision, "deepstack_features", None) is not None:  # Qwen3-VL
        kept = (~hidden_positions[image_tokens]).float()[:, None]
        deepstack = [torch.cat(feature) * kept for feature in vision.deepstack_features]
        extra = {"visual_pos_masks": image_tokens, "deepstack_visual_embeds": deepstack}
    masks = per_layer_type(
        mask,
        vlm.config.get_text_config(),
        attn_implementation="sdpa",
        dtype=embeds.dtype,
        padding_mask=inputs["attention_mask"],
    )
    positions = embedder.mrope_positions(inputs)
    language = vlm.language_model
    return language(inputs_embeds=embeds, attention_mask=masks, position_ids=positions, **extra).last_hidden_state


@torch.no_grad()
def test_the_warmup_loss_is_the_weighted_sum_of_the_reconstruction_losses_by_hand(objective_and_batch):
    objective, batch, weights = objective_and_batch
    embedder = objective.embedder
    loss, terms = objective(WARMUP, 7, **batch)

    text, image = warmup_masks(
        batch["input_ids"],
        batch["attention_mask"],
        image_pad_id=objective.image_pad_id,
        special_ids=objective.special_ids,
        text_ratio=0.3,
        image_ratio=0.5,
        generator=torch.Generator().manual_seed(7),
    )
    hidden = hand_hidden(embedder, batch, pattern_mask(batch["attention_mask"], "bidirectional"), text | image)
    logits = embedder.model.get_output_embeddings()(hidden)
    text_loss = masked_next_token_loss(logits, batch["input_ids"], text)
    image_tokens = batch["input_ids"] == objective.image_pad_id
    targets = patch_targets(batch["pixel_values"], embedder.image_processor.merge_size)
    image_loss = masked_patch_loss(
        objective.image_head(hidden[image_tokens]), targets, image[image_tokens], normalize_targets=True
    )
    assert text_loss > 0 and image_loss > 0
    torch.testing.assert_close(terms["text_loss"], text_loss)
    torch.testing.assert_close(terms["image_loss"], image_loss)
    torch.testing.assert_close(loss, weights["text"] * text_loss + weights["image"] * image_loss)


@torch.no_grad()
def test_the_bridged_loss_is_the_reconstructions_next_token_loss_by_hand(objective_and_batch):
    objective, batch, weights = objective_and_batch
    embedder = objective.embedder
    loss, terms = objective(BRIDGED, 7, **batch)

    rows, bridges, predict = bridged_batch(
        batch["input_ids"],
        batch["attention_mask"],
        emb_id=embedder.emb_token_id,
        pad_id=objective.pad_id,
        image_pad_id=objective.image_pad_id,
        special_ids=objective.special_ids,
    )
    mask = truncated_mask(
        rows["attention_mask"], bridges, input_pattern="bidirectional", reconstruction_pattern="causal"
    )
    hidden = hand_hidden(embedder, batch | rows, mask, None)
    expected = masked_next_token_loss(embedder.model.get_output_embeddings()(hidden), rows["input_ids"], predict)
    assert expected > 0
    torch.testing.assert_close(terms["bridged_loss"], expected)
    torch.testing.assert_close(loss, weights["bridged"] * expected)


def test_the_saved_model_is_the_embedder_without_the_image_head(objective_and_batch, tmp_path):
    objective, _, _ = objective_and_batch
    objective.save_merged(tmp_path / "model", TURN)
    reloaded = load_backbone(str(tmp_path / "model"))
    names = {name for name, _ in reloaded.model.named_parameters()}
    assert not any("image_head" in name for name in names)
    assert {name for name, _ in objective.named_parameters() if "image_head" in name} == {
        "image_head.weight",
        "image_head.bias",
    }


def test_conf_base_cocoa_block_validates_and_its_training_block_is_a_training_setting():
    params = load_params()
    config = CocoaConfig.from_dict(params["cocoa"])
    assert config.steps == config.warmup_steps + config.bridged_steps
    assert "training" not in config.objective()
    merged = laid_over(params["training"], config.training or {}, "cocoa.training")
    assert TrainingConfig.from_dict(merged).output_dir == "data/06_models/cocoa"


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("text_mask_ratio", 0, "cocoa.text_mask_ratio must be a number from 0.01 to 0.99, got 0"),
        ("image_mask_ratio", 1.0, "cocoa.image_mask_ratio must be a number from 0.01 to 0.99, got 1.0"),
        ("loss_weights.bridged", -1, "cocoa.loss_weights.bridged must be a non-negative number"),
        ("bridged_step", 3, "cocoa.bridged_step is not a cocoa setting"),
    ],
)
def test_a_bad_cocoa_setting_is_named_by_its_dotted_key(dotted, value, message):
    with pytest.raises(CocoaConfigError) as raised:
        CocoaConfig.from_dict(with_value(load_params()["cocoa"], dotted, value))
    assert str(raised.value).startswith(message)


def test_stage_0_needs_a_step():
    values = load_params()["cocoa"] | {"warmup_steps": 0, "bridged_steps": 0}
    with pytest.raises(CocoaConfigError, match="at least 1"):
        CocoaConfig.from_dict(values)


def test_a_cocoa_training_key_that_training_lacks_is_named():
    with pytest.raises(ValueError, match=r"^cocoa\.training\.embedder\.lora\.rank is not a training setting"):
        laid_over(load_params()["training"], {"embedder": {"lora": {"rank": 8}}}, "cocoa.training")


class RowSumEngine(torch.nn.Module):
    """A stand-in for the DeepSpeed engine around a CocoaObjective: a row's loss is its ids times a weight, summed;
    a batch's loss is the mean over its rows. Records the (phase, mask seed) each call gets."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.calls: list[tuple[str, int]] = []

    def forward(self, phase, mask_seed, input_ids, attention_mask, **_):
        self.calls.append((phase, mask_seed))
        value = (input_ids.float() * self.weight).sum(-1).mean()
        return value, {"bridged_loss": value * 2}

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def coalesce_grad_reduction(self):
        return contextlib.nullcontext()


def rows_batch(input_ids: torch.Tensor) -> Batch:
    rows = len(input_ids)
    query = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    return Batch(query, {}, 1, [f"c{i}" for i in range(rows)], torch.arange(rows))


def test_the_reconstruction_step_whole_or_in_chunks_gives_the_mean_over_rows_and_its_gradient():
    input_ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 0, 1], [2, 2, 2]])
    # by hand, weights 0.5, 1, 1.5: the rows give 7, 16, 25, 2, 6, a mean of 11.2
    expected = 11.2
    whole = RowSumEngine(3)
    loss, terms = forward_backward(
        whole,
        [rows_batch(input_ids)],
        torch.device("cpu"),
        temperature=1.0,
        symmetric_loss=False,
        mask_duplicate_targets=False,
        reconstruction=("bridged", 40),
    )
    chunked = RowSumEngine(3)
    chunked_loss, chunked_terms = forward_backward(
        chunked,
        [rows_batch(input_ids[:2]), rows_batch(input_ids[2:])],
        torch.device("cpu"),
        temperature=1.0,
        symmetric_loss=False,
        mask_duplicate_targets=False,
        grad_cache=True,
        reconstruction=("bridged", 40),
    )
    for value, named in ((loss, terms), (chunked_loss, chunked_terms)):
        assert value.item() == pytest.approx(expected)
        assert named["bridged_loss"].item() == pytest.approx(2 * expected)
    # d(mean over rows of ids . w)/dw is the mean row: (1+4+7+1+2)/5, (2+5+8+0+2)/5, (3+6+9+1+2)/5
    for engine in (whole, chunked):
        torch.testing.assert_close(engine.weight.grad, torch.tensor([3.0, 3.4, 4.2]))
    assert whole.calls == [("bridged", 40)] and chunked.calls == [("bridged", 40), ("bridged", 41)]


def test_the_warmup_steps_come_first_then_the_bridged_ones():
    cocoa = {"warmup_steps": 2}
    phases = [cocoa_step(cocoa, 0, step, 0)[0] for step in range(4)]
    assert phases == ["warmup", "warmup", "bridged", "bridged"]
    assert cocoa_step(cocoa, 3, 5, 1)[1] == mask_seed(3, 5, 1)


def stage_0_fingerprint(cocoa: dict | None, stage: str = "cocoa") -> str:
    return resolve_run_config(
        training=TrainingConfig.from_dict(load_params()["training"]),
        backbone=load_params()["backbone"],
        encode_template="{text}<|emb|>",
        tracking_uri="sqlite:///mlflow.db",
        experiment="muco",
        checkpoint="no-backbone",
        conversations_dir="no-conversations",
        shards_dir="no-shards",
        stage=stage,
        cocoa=cocoa,
    )["fingerprint"]


def test_every_cocoa_objective_setting_enters_the_resume_fingerprint():
    objective = CocoaConfig.from_dict(load_params()["cocoa"]).objective()
    base = stage_0_fingerprint(objective)
    changed = {
        "warmup_steps": objective["warmup_steps"] + 1,
        "bridged_steps": objective["bridged_steps"] + 1,
        "text_mask_ratio": 0.3,
        "image_mask_ratio": 0.5,
        "normalize_targets": not objective["normalize_targets"],
        "loss_weights": objective["loss_weights"] | {"image": 2.0},
    }
    for key, value in changed.items():
        assert stage_0_fingerprint(objective | {key: value}) != base, key
    assert stage_0_fingerprint(objective) == base
    with pytest.raises(ValueError, match="only it"):
        stage_0_fingerprint(objective, stage="train")
    with pytest.raises(ValueError, match="only it"):
        stage_0_fingerprint(None)
