"""The `training` parameters (conf/base/parameters_train.yml) as one typed, validated object.

``TrainingConfig.from_dict`` is the one way in: the `train` and `finetune`
nodes build it from their parameters, each rank from the run config that
torchrun hands it (``to_dict`` wrote it there). A bad value stops the run
before anything starts, with one error naming its dotted key.

The YAML is where every value lives: no field here has a default, so no code
default can disagree with it (the embedder's settings are the model's own,
``EmbedderSettings``, whose defaults are MuCo's reference values and are tested
equal to the YAML's). Whether a setting decides the weights, and so enters the
resume fingerprint, is declared on its field: ``field(metadata=setting(fingerprint=False))``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from muco_flow.modeling.backbone import PRECISIONS
from muco_flow.modeling.embedder import EmbedderSettings
from muco_flow.modeling.matryoshka import dimensions_problem
from muco_flow.settings_schema import read_settings, setting
from muco_flow.training.schedule import SCHEDULES

PARAMETERS_FILE = "conf/base/parameters_train.yml"


# A field's metadata: it does not enter the resume fingerprint (see ``setting``)
NOT_FINGERPRINTED = {"fingerprint": False}


class TrainingConfigError(ValueError):
    """A `training` parameter is unknown, missing, of the wrong type or out of range; names its dotted key."""


@dataclass(frozen=True)
class GradCacheSettings:
    # n: GradCache, embed n conversations at a time; None: the whole micro batch with one graph
    chunk_size: int | None = field(metadata=setting(minimum=1))


@dataclass(frozen=True)
class MatryoshkaSettings:
    """Matryoshka representation learning (modeling/loss.py ``matryoshka_loss``); null dims: off."""

    # the nested prefix widths the loss is computed on, increasing; list the full width to train it too
    dims: list[int] | None = field(metadata=setting(minimum=1))
    # one per width; null: 1 each (the loss is the sum over widths, as in Kusupati et al. and sentence-transformers)
    weights: list[float] | None = field(metadata=setting(minimum=0, exclusive_minimum=True))

    def __post_init__(self) -> None:
        if self.dims is not None:
            problem = dimensions_problem(self.dims)
            if problem:
                raise TrainingConfigError(f"training.matryoshka.dims {problem}")
        if self.weights is not None and len(self.weights) != len(self.dims or []):
            raise TrainingConfigError(
                f"training.matryoshka.weights must have one weight per dimension of training.matryoshka.dims "
                f"({len(self.dims or [])}), got {len(self.weights)}"
            )

    def check_width(self, width: int) -> None:
        """Refuses dims wider than the model's embeddings (known once the model is loaded)."""
        if self.dims is not None and (problem := dimensions_problem(self.dims, width)):
            raise TrainingConfigError(f"training.matryoshka.dims {problem}")


@dataclass(frozen=True)
class DeepSpeedSettings:
    # the template's path: its content enters the fingerprint through the resolved DeepSpeed config
    config: str = field(metadata=setting(fingerprint=False))
    offload_optimizer: bool


@dataclass(frozen=True)
class LauncherSettings:
    """How torchrun lays the ranks out: 1 node x 2 processes resumes the checkpoints of 2 nodes x 1 process."""

    processes_per_node: int = field(metadata=setting(minimum=1))
    nodes: int = field(metadata=setting(minimum=1))
    node_rank: int = field(metadata=setting(minimum=0))
    master_addr: str
    master_port: int | None = field(metadata=setting(minimum=1, maximum=65535))


@dataclass(frozen=True)
class PreemptionSettings:
    """What a training does with SIGTERM or SIGUSR1 (preemption, a time limit): see training/preemption.py."""

    # seconds from the signal to the end of every process: the ranks finish their step and checkpoint it if
    # that fits, then the launcher and torchrun kill what is left; below SLURM's KillWait
    grace_s: float = field(metadata=setting(minimum=0, exclusive_minimum=True))


@dataclass(frozen=True)
class DataMixSettings:
    """Which conversations of which dataset an epoch trains on, and how batches mix datasets (training/data.py)."""

    # per dataset (stage 2: the MMEB-train folder): an epoch takes round(weight x its samples), cycling through
    # them in a new order each pass; a dataset not named has weight 1 (each sample once)
    weights: dict[str, float] = field(metadata=setting(minimum=0))
    # per dataset: at most this many samples an epoch, a new draw each epoch; a dataset not named has no cap
    caps: dict[str, int] = field(metadata=setting(minimum=1))
    # true: each global batch holds one dataset's samples (VLM2Vec's interleave_batch_size), false: any mix
    homogeneous_batches: bool


# What ``training.select`` chooses from: the last step's weights, or the checkpoint with the best held-out score
SELECTIONS = ("last", "best")


@dataclass(frozen=True)
class DuringTrainingSettings:
    """Evaluation during training on a held-out slice of the training data (training/heldout.py)."""

    # steps between evaluations (and every checkpoint is evaluated too); 0: off. Eval mode draws no random
    # numbers, so it leaves the weights as they were: not fingerprinted
    every: int = field(metadata=setting(fingerprint=False, minimum=0))
    # records (stage 1: images with all their turns; stage 2: samples) drawn once, with a fixed seed, and
    # never trained on; 0: none. Changes the training data, so it is fingerprinted
    heldout_conversations: int = field(metadata=setting(minimum=0))
    # conversations per forward pass when the slice is scored
    batch_size: int = field(metadata=setting(fingerprint=False, minimum=1))

    def __post_init__(self) -> None:
        if self.every and not self.heldout_conversations:
            raise TrainingConfigError(
                "training.during_training.every needs a held-out slice: set "
                "training.during_training.heldout_conversations above 0"
            )


@dataclass(frozen=True)
class TrainingConfig:
    """The `training` parameters; conf/base/parameters_train.yml says what each one does."""

    run_name: str | None = field(metadata=setting(fingerprint=False))
    output_dir: str = field(metadata=setting(fingerprint=False))
    # null: start from the backbone; a model directory a training stage wrote (e.g. CoCoA's stage 0) or a
    # models:/ URI (training/init_model.py). Fingerprinted as a name; the directory's content enters through
    # the checkpoint's content hash
    init_from: str | None
    seed: int = field(metadata=setting(minimum=0))
    precision: str = field(metadata=setting(choices=PRECISIONS))
    learning_rate: float = field(metadata=setting(minimum=0, exclusive_minimum=True))
    # the rate after warmup (training/schedule.py); lr_min_ratio is where cosine and linear end
    lr_schedule: str = field(metadata=setting(choices=SCHEDULES))
    warmup_steps: int = field(metadata=setting(minimum=0))
    lr_min_ratio: float = field(metadata=setting(minimum=0, maximum=1))
    epochs: int = field(metadata=setting(minimum=1))
    max_steps: int | None = field(metadata=setting(minimum=1))
    micro_batch_size: int = field(metadata=setting(minimum=1))
    gradient_accumulation_steps: int = field(metadata=setting(minimum=1))
    gradient_clipping: float = field(metadata=setting(minimum=0))
    temperature: float = field(metadata=setting(minimum=0, exclusive_minimum=True))
    symmetric_loss: bool
    mask_duplicate_targets: bool
    hard_negatives: bool
    data_mix: DataMixSettings
    # where batches are made, not what they hold
    data_workers: int = field(metadata=setting(fingerprint=False, minimum=0))
    grad_cache: GradCacheSettings
    matryoshka: MatryoshkaSettings
    during_training: DuringTrainingSettings
    # which weights become the model: "last" (the last step's) or "best" (the checkpoint with the highest
    # held-out hit@1, training/heldout.py); not fingerprinted: the checkpoints are the same either way
    select: str = field(metadata=setting(fingerprint=False, choices=SELECTIONS))
    save_every: int = field(metadata=setting(fingerprint=False, minimum=1))
    keep_last: int = field(metadata=setting(fingerprint=False, minimum=1))
    log_every: int = field(metadata=setting(fingerprint=False, minimum=1))
    progress_every_s: float = field(metadata=setting(fingerprint=False, minimum=0, exclusive_minimum=True))
    embedder: EmbedderSettings
    deepspeed: DeepSpeedSettings
    launcher: LauncherSettings = field(metadata=NOT_FINGERPRINTED)
    preemption: PreemptionSettings = field(metadata=NOT_FINGERPRINTED)

    def __post_init__(self) -> None:
        if self.launcher.node_rank >= self.launcher.nodes:
            raise TrainingConfigError(
                f"training.launcher.node_rank must be below training.launcher.nodes ({self.launcher.nodes}), "
                f"got {self.launcher.node_rank}"
            )
        if self.select == "best" and not self.during_training.every:
            raise TrainingConfigError(
                "training.select: best needs evaluation during training: set training.during_training.every "
                "above 0 (and training.during_training.heldout_conversations)"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainingConfig:
        """The settings in ``values`` (the `training` parameters, or ``to_dict``'s output), checked.

        Raises TrainingConfigError naming the dotted key (``training.…``) of a setting that is
        unknown, missing, of the wrong type or out of range.
        """
        return read_settings(cls, values, "training", PARAMETERS_FILE, TrainingConfigError)

    def to_dict(self) -> dict[str, Any]:
        """The settings as the parameters hold them (JSON-serialisable); ``from_dict`` reads them back."""
        return dataclasses.asdict(self)

    def fingerprinted(self) -> dict[str, Any]:
        """The settings that decide the weights (``to_dict`` without those declared ``fingerprint=False``)."""
        return _fingerprinted(self)

    def total_steps(self, steps_per_epoch: int) -> int:
        """The optimizer steps a run takes: ``max_steps`` when set, else ``epochs`` x ``steps_per_epoch``."""
        return self.max_steps or self.epochs * steps_per_epoch

    @property
    def world_size(self) -> int:
        """The training processes, all nodes together."""
        return self.launcher.processes_per_node * self.launcher.nodes


def laid_over(training: Mapping[str, Any], overrides: Mapping[str, Any], block: str) -> dict[str, Any]:
    """``training`` with a stage's own settings (the parameters' ``block``, e.g. `finetune.training`) laid over
    it, nested mappings merged key by key; a key `training` does not have is an error naming it."""
    merged = dict(training)
    for key, value in overrides.items():
        if key not in training:
            raise ValueError(f"{block}.{key} is not a training setting ({PARAMETERS_FILE})")
        merged[key] = laid_over(training[key], value, f"{block}.{key}") if isinstance(value, dict) else value
    return merged


def _fingerprinted(settings: Any) -> dict[str, Any]:
    kept = {}
    for spec in dataclasses.fields(settings):
        if spec.metadata.get("fingerprint", True):
            value = getattr(settings, spec.name)
            kept[spec.name] = _fingerprinted(value) if dataclasses.is_dataclass(value) else value
    return kept
