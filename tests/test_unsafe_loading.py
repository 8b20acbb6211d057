"""Nothing muco-flow loads can run code: weights_only unpickling, safetensors, no remote code."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from muco_flow.modeling.backbone import BackboneConfig, load_backbone
from tests.conftest import PROJECT_ROOT, load_params
from tests.servers import free_port

SOURCE = PROJECT_ROOT / "src" / "muco_flow"


class WritesAFile:
    """A pickle payload: unpickling it creates ``path``. Loading must never get that far."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_the_source_never_unpickles_or_trusts_remote_code_on_its_own():
    """Every torch.load in src/ passes weights_only=True; no pickle loads; trust_remote_code is never literally on."""
    problems, loads = [], 0
    for path in sorted(SOURCE.rglob("*.py")):
        for call, name in _calls(ast.parse(path.read_text())):
            where = f"{path.relative_to(PROJECT_ROOT)}:{call.lineno}"
            if name in ("torch.load", "torch.serialization.load"):
                loads += 1
                flag = _keyword(call, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: {name} without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
                problems.append(f"{where}: {name}")
            for keyword, unsafe in (("trust_remote_code", True), ("use_safetensors", False), ("weights_only", False)):
                value = _keyword(call, keyword)
                if isinstance(value, ast.Constant) and value.value is unsafe:
                    problems.append(f"{where}: {keyword}={unsafe}")
    assert loads >= 1  # the scan sees the loads there are
    assert problems == []


def test_trust_remote_code_is_off_unless_configured(tiny_backbone_dir, tmp_path):
    for env in ("base", "cluster"):
        assert BackboneConfig.from_params(load_params(env)["backbone"]).trust_remote_code is False
    assert BackboneConfig().trust_remote_code is False
    # A checkpoint that asks for its own code: loading it runs none of it.
    model_dir = tmp_path / "remote-code"
    shutil.copytree(tiny_backbone_dir, model_dir)
    marker = tmp_path / "remote-code-ran"
    (model_dir / "modeling_evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    for name in ("config.json", "tokenizer_config.json"):
        config = json.loads((model_dir / name).read_text())
        config["auto_map"] = {"AutoConfig": "modeling_evil.Config", "AutoModel": "modeling_evil.Model"}
        (model_dir / name).write_text(json.dumps(config))
    backbone = load_backbone(str(model_dir))
    assert backbone.model is not None and not marker.exists()


def test_backbone_weights_load_from_safetensors_only(tiny_backbone_dir, tmp_path):
    from safetensors.torch import load_file

    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_backbone_dir, model_dir)
    marker = tmp_path / "pickle-ran"
    state = load_file(model_dir / "model.safetensors")
    torch.save({**state, "payload": WritesAFile(marker)}, model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(OSError, match="safetensors"):
        load_backbone(str(model_dir))
    assert not marker.exists()


# --- DeepSpeed checkpoints -----------------------------------------------------------------


@pytest.fixture(scope="module")
def process_group():
    """One gloo process, as torchrun would set it up, for an in-process DeepSpeed engine."""
    import deepspeed
    import torch.distributed as dist

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    saved = {k: os.environ.get(k) for k in [*env, "MASTER_PORT"]}
    os.environ.update(env, MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def zero2_engine(seed: int):
    """A small model under the DeepSpeed config of conf/base (ZeRO-2), as training builds it.

    Its first layer is frozen (like the backbone: the same in every run, and
    not in checkpoints); ``seed`` initialises the trainable one.
    """
    import deepspeed

    from muco_flow.training.config import TrainingConfig
    from muco_flow.training.launch import resolve_run_config

    training = load_params()["training"]
    training["deepspeed"]["config"] = str(PROJECT_ROOT / training["deepspeed"]["config"])
    config = resolve_run_config(
        training=TrainingConfig.from_dict(training),
        backbone={},
        encode_template="",
        tracking_uri="",
        experiment="",
        checkpoint="",
        conversations_dir=str(PROJECT_ROOT / "no-such-dir"),
        shards_dir="",
    )["deepspeed"]  # the configuration training runs with
    torch.manual_seed(0)
    frozen = torch.nn.Linear(6, 6).requires_grad_(False)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(frozen, torch.nn.Tanh(), torch.nn.Linear(6, 3))
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1)),
    )
    return engine


def train_steps(engine, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = engine(torch.randn(2, 6)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def saved_checkpoint(process_group, tmp_path_factory):
    """A ZeRO-2 checkpoint after 3 steps, and the losses of the 3 steps that follow it."""
    from muco_flow.training.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    engine = zero2_engine(seed=0)
    train_steps(engine, 3)
    save_checkpoint(engine, root, 3, rank=0, world_size=1, fingerprint="f", keep_last=2, client_state={"step": 3})
    return root, train_steps(engine, 3)


@pytest.mark.slow  # DeepSpeed builds its CPU Adam op (ninja, c++) on first use
def test_resuming_reads_every_checkpoint_file_weights_only(saved_checkpoint, monkeypatch):
    from muco_flow.training.checkpoint import checkpoint_tag, load_checkpoint

    root, losses_after = saved_checkpoint
    engine = zero2_engine(seed=1)  # other initial weights: the checkpoint must replace them
    seen: list[tuple[str, object]] = []
    original = torch.load

    def spy(path, *args, **kwargs):
        seen.append((Path(path).name, kwargs.get("weights_only")))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    client_state = load_checkpoint(engine, root, checkpoint_tag(3), rank=0)
    monkeypatch.undo()

    assert client_state["step"] == 3
    names = {name for name, _ in seen}
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_state_rank0.pt"} <= names
    assert [flag for _, flag in seen] == [True] * len(seen), seen
    # ...and it restored everything: the next steps repeat the original run's
    assert train_steps(engine, 3) == pytest.approx(losses_after, abs=1e-6)


@pytest.mark.slow  # the same DeepSpeed engine and its compiled op
def test_a_checkpoint_file_that_would_run_code_is_refused(saved_checkpoint, tmp_path):
    from muco_flow.training.checkpoint import UnsafeCheckpointError, checkpoint_tag, load_checkpoint

    source, _ = saved_checkpoint
    root = tmp_path / "tampered"
    shutil.copytree(source, root)
    marker = tmp_path / "payload-ran"
    victim = root / checkpoint_tag(3) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(victim, weights_only=False)  # the test's own file: trusted here
    state["payload"] = WritesAFile(marker)
    torch.save(state, victim)

    engine = zero2_engine(seed=1)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*zero_pp_rank_0_mp_rank_00_optim_states\.pt"):
        load_checkpoint(engine, root, checkpoint_tag(3), rank=0)
    assert not marker.exists()
    # DeepSpeed's own engine would have run it: what this guards against is real
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    TorchCheckpointEngine().load(str(victim))
    assert marker.exists()


# --- the registered pyfunc ---------------------------------------------------------------------

_unpickled: list[str] | None = None  # while a list: every class a pickle asks for lands in it


def _watch_pickle(event: str, args: tuple) -> None:
    # audit hooks cannot be removed: this one records only inside watching_pickle()
    if event == "pickle.find_class" and _unpickled is not None:
        _unpickled.append(".".join(map(str, args)))


@contextlib.contextmanager
def watching_pickle():
    """Records every class any unpickler (pickle, cloudpickle, torch.load) resolves inside the block."""
    global _unpickled
    if not getattr(watching_pickle, "installed", False):
        sys.addaudithook(_watch_pickle)
        watching_pickle.installed = True
    _unpickled = []
    try:
        yield _unpickled
    finally:
        _unpickled = None


def test_the_audit_hook_sees_what_an_unpickler_resolves():
    """The watch below would prove nothing if it missed a real unpickling."""
    payload = pickle.dumps(Path("somewhere"))
    with watching_pickle() as unpickled:
        pickle.loads(payload)
    assert unpickled and any("PosixPath" in name for name in unpickled)


@pytest.mark.slow  # MLflow runs `git` while it logs the model
def test_loading_the_registered_model_unpickles_nothing(model_dir, tmp_path, monkeypatch):
    """The pyfunc is models-from-code: loading it by alias resolves no class from a pickle."""
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from muco_flow.registry import CHALLENGER
    from muco_flow.registry.registration import fluent_tracking_uri, register_model_version

    monkeypatch.chdir(tmp_path)  # MLflow's local artifact root is relative to the working directory
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("unsafe-loading"))
    register_model_version(uri, name="watched", run_id=run.info.run_id, model_dir=str(model_dir), tags={})
    with fluent_tracking_uri(uri):
        local = Path(mlflow.artifacts.download_artifacts(f"models:/watched@{CHALLENGER}", dst_path=str(tmp_path / "m")))
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("*.pickle")), sorted(local.rglob("*"))

    with watching_pickle() as unpickled, fluent_tracking_uri(uri):
        model = mlflow.pyfunc.load_model(f"models:/watched@{CHALLENGER}")
        vectors = model.predict(pd.DataFrame([{"text": "a red circle"}]))
    assert unpickled == []
    assert vectors.shape[0] == 1
