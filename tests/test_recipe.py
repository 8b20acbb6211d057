"""docs/recipe.md says what conf/cluster and the sample run: every keyed row is checked against conf/."""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from muco_flow.pipelines.finetune.nodes import finetuning_settings
from muco_flow.training.config import TrainingConfig
from muco_flow.training.deepspeed_config import load_deepspeed_template, training_deepspeed_config
from tests.conftest import PROJECT_ROOT, load_params

RECIPE = PROJECT_ROOT / "docs" / "recipe.md"
KEY_COLUMN, COLUMNS = "muco-flow key", {"cluster": "conf/cluster", "base": "Sample"}
DEEPSPEED, STAGE_2 = "deepspeed:", "finetune.training."
NOT_A_SETTING = "—"  # a key cell that starts so names code, not a setting

# What the recipe must cover (issue 24): one key per hyperparameter it lists
REQUIRED_KEYS = {
    "deepspeed:optimizer.type",
    "training.learning_rate",
    "training.lr_schedule",
    "training.warmup_steps",
    "training.embedder.lora.r",
    "training.embedder.lora.alpha",
    "training.embedder.lora.dropout",
    "training.embedder.lora.init",
    "training.temperature",
    "format.turns_per_conversation",
    "format.shuffle_turns",
    "format.target_layout",
    "format.image_short_side",
    "backbone.image.max_pixels",
    "training.precision",
    "deepspeed:zero_optimization.stage",
    "training.deepspeed.offload_optimizer",
    "training.save_every",
    "training.hard_negatives",
    "finetune_format.hard_negatives",
    "finetune_format.mask.whole_probability",
    "finetune_format.mask.word_probability",
    "finetune.training.learning_rate",
}


@dataclass(frozen=True)
class Row:
    name: str  # "<section>: <setting>"
    key: str
    values: dict[str, Any]  # environment -> the value the row gives


def _cells(line: str) -> list[str]:
    # a cell may hold an escaped pipe (`<\|emb\|>`), which is a pipe inside it
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [cell.strip().replace("\\|", "|") for cell in cells]


def _code(cell: str) -> str | None:
    found = re.fullmatch(r"`([^`]+)`", cell)
    return found.group(1) if found else None


def parse_recipe(text: str) -> list[Row]:
    """The rows of every table with a key column whose key cell names a setting."""
    rows, section, header = [], "", None
    for line in text.splitlines():
        if line.startswith("#"):
            section, header = line.lstrip("#").strip(), None
        elif not line.startswith("|"):
            header = None
        elif header is None:
            header = _cells(line)
        elif not set(line) <= set("|- "):
            cells = dict(zip(header, _cells(line), strict=True))
            if KEY_COLUMN not in cells:
                continue
            name, key = f"{section}: {cells[header[0]]}", _code(cells[KEY_COLUMN])
            if key is None:
                if not cells[KEY_COLUMN].startswith(NOT_A_SETTING):
                    raise ValueError(f"{name}: the key cell is neither `a.key` nor '{NOT_A_SETTING} ...'")
                continue
            values = {}
            for env, column in COLUMNS.items():
                value = _code(cells[column])
                if value is None:
                    raise ValueError(f"{name}: the {column} cell must be one `value`, got {cells[column]!r}")
                values[env] = yaml.safe_load(value)
            rows.append(Row(name, key, values))
    return rows


ROWS = parse_recipe(RECIPE.read_text())


@functools.cache
def environment(env: str) -> dict[str, Any]:
    return load_params(env)


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            raise KeyError(part)
        tree = tree[part]
    return tree


def resolve(params: dict[str, Any], key: str) -> Any:
    """The value ``key`` has in ``params``: a parameter, a stage-2 training setting or a DeepSpeed entry."""
    if key.startswith(DEEPSPEED):
        training = TrainingConfig.from_dict(params["training"])
        template = load_deepspeed_template(PROJECT_ROOT / training.deepspeed.config)
        config = training_deepspeed_config(training, on_cpu=False, template=template)
        return _lookup(config, key.removeprefix(DEEPSPEED))
    if key.startswith(STAGE_2):
        # what the finetune pipeline runs: `training` with `finetune.training` laid over it
        stage_2 = finetuning_settings(params["training"], params["finetune"]["training"])
        return _lookup(stage_2, key.removeprefix(STAGE_2))
    return _lookup(params, key)


def _same(documented: Any, actual: Any) -> bool:
    if isinstance(documented, bool) or isinstance(actual, bool):
        return documented is actual  # 1 is not true
    return documented == actual


def disagreement(row: Row, env: str, params: dict[str, Any]) -> str | None:
    """Why ``row`` is wrong about ``params``, or None."""
    try:
        actual = resolve(params, row.key)
    except KeyError:
        return f"{row.name}: {row.key} is not set in {COLUMNS[env]}"
    if not _same(row.values[env], actual):
        return f"{row.name}: docs/recipe.md says {row.key} = {row.values[env]!r}, {COLUMNS[env]} has {actual!r}"
    return None


@pytest.mark.parametrize("env", COLUMNS)
@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_the_table_says_what_conf_runs(row, env):
    problem = disagreement(row, env, environment(env))
    assert problem is None, problem


def test_the_table_covers_the_recipe():
    missing = REQUIRED_KEYS - {row.key for row in ROWS}
    assert not missing, f"docs/recipe.md has no row for {sorted(missing)}"


def test_a_changed_value_is_reported_by_row():
    params = copy.deepcopy(environment("cluster"))
    params["training"]["learning_rate"] = 1.0e-4
    params["format"]["target_layout"] = "independent"
    params["training"]["deepspeed"]["config"] = "conf/base/deepspeed/zero2.json"  # weight decay 0.0
    problems = [p for row in ROWS if (p := disagreement(row, "cluster", params))]
    assert problems == [
        "Optimisation: Weight decay: docs/recipe.md says deepspeed:optimizer.params.weight_decay = 0.01, "
        "conf/cluster has 0.0",
        "Optimisation: Learning rate: docs/recipe.md says training.learning_rate = 5e-05, conf/cluster has 0.0001",
        "Optimisation: ZeRO buckets: docs/recipe.md says deepspeed:zero_optimization.reduce_bucket_size = "
        "200000000, conf/cluster has 50000000",
        "Data: Target layout: docs/recipe.md says format.target_layout = 'conversation', "
        "conf/cluster has 'independent'",
    ]


def test_rows_are_read_from_markdown_tables():
    text = (
        "## Stage\n\n| Setting | muco-flow key | conf/cluster | Sample |\n| --- | --- | --- | --- |\n"
        "| Rate | `training.learning_rate` | `5.0e-5` | `5.0e-4` |\n"
        "| Token | — (`<\\|emb\\|>` rows) | same | same |\n"
        "| Flag | `training.hard_negatives` | `false` | `true` |\n"
        "| Pattern | `training.embedder.lora.target_modules` | `(q\\|k)_proj` | `q_proj` |\n"
    )
    assert parse_recipe(text) == [
        Row("Stage: Rate", "training.learning_rate", {"cluster": 5.0e-5, "base": 5.0e-4}),
        Row("Stage: Flag", "training.hard_negatives", {"cluster": False, "base": True}),
        Row("Stage: Pattern", "training.embedder.lora.target_modules", {"cluster": "(q|k)_proj", "base": "q_proj"}),
    ]
    with pytest.raises(ValueError, match="Stage: Rate: the conf/cluster cell must be one `value`"):
        parse_recipe(text.replace("`5.0e-5`", "5e-5 (official)"))
