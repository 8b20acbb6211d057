"""Pools encoded to disk in blocks: the same ranks and metrics as in memory, resumed after a kill, keyed by model."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import muco_flow
from muco_flow.evaluation.config import EvaluationConfig
from muco_flow.evaluation.datasets import Item, RetrievalSet
from muco_flow.evaluation.encoded_pool import EncodedPool, InMemoryPool
from muco_flow.evaluation.encoding import ENCODING_MODULES, EncodingCache
from muco_flow.evaluation.retrieval import chunked_positive_ranks, chunked_top_k


def stub_vectors(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    vectors = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)
    vectors[5] = vectors[3]  # a tie
    return vectors


class Encoder:
    """Item i's vector is row i of a fixed table; records the calls, and can fail on one block like a kill."""

    def __init__(self, table: torch.Tensor, fail_at: int | None = None) -> None:
        self.table, self.fail_at, self.calls = table, fail_at, []

    def __call__(self, items):
        if self.fail_at is not None and items[0] == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.calls.append(list(items))
        return self.table[list(items)]


def brute_force_ranks(queries, pool, positives):
    scores = queries @ pool.T
    return [[int((scores[i] >= scores[i, p] - 1e-6).sum()) for p in pos] for i, pos in enumerate(positives)]


def test_ranks_rows_and_top_k_from_disk_blocks_equal_the_in_memory_ones(tmp_path):
    table = stub_vectors(53)
    queries = stub_vectors(9, seed=1)
    queries[0] = table[3]  # its positive 5 ties with row 3: the tie counts against it
    positives = [[5], [1, 2], [], [52], [0], [10, 11, 12], [3], [7], [8]]
    on_disk = EncodedPool(tmp_path, list(range(53)), Encoder(table), key_parts=["model"], block_rows=7)
    expected = brute_force_ranks(queries, table, positives)
    assert expected[0] == [2]  # hand check: row 3 scores the same as the positive row 5
    for pool in (on_disk, InMemoryPool(table, block_rows=10), table):
        assert chunked_positive_ranks(queries, pool, positives, query_chunk=4) == expected
        # with the other positives ignored, row 5's rank among the rest is the same, rows 10-12 rank higher
        ignoring = chunked_positive_ranks(queries, pool, positives, query_chunk=4, ignore_other_positives=True)
        assert ignoring == chunked_positive_ranks(queries, table, positives, ignore_other_positives=True)
    assert [b.shape[0] for b in on_disk.blocks()] == [7] * 7 + [4]  # read a block of at most 7 rows at a time
    assert torch.equal(on_disk.rows([29, 0, 8, 52, 29]), table[[29, 0, 8, 52, 29]])
    assert on_disk.rows([]).shape == (0, 8)
    with pytest.raises(IndexError, match="pool of 53"):
        on_disk.rows([53])
    scores, indices = chunked_top_k(queries, on_disk.blocks(), 4)
    torch.testing.assert_close(scores, (queries @ table.T).topk(4, dim=1).values)
    torch.testing.assert_close((queries[:, None, :] * table[indices]).sum(-1), scores)  # the rows it names


def test_a_killed_encoding_resumes_at_the_first_missing_block(tmp_path):
    table = stub_vectors(30)
    items = list(range(30))
    killed = Encoder(table, fail_at=14)
    with pytest.raises(KeyboardInterrupt):
        EncodedPool(tmp_path, items, killed, key_parts=["m"], block_rows=7).ensure()
    assert [c[0] for c in killed.calls] == [0, 7]
    again = Encoder(table)
    pool = EncodedPool(tmp_path, items, again, key_parts=["m"], block_rows=7)
    assert pool.missing_blocks() == [2, 3, 4]
    assert torch.equal(torch.cat(list(pool.blocks())), table)
    assert [c[0] for c in again.calls] == [14, 21, 28]  # blocks 0 and 1 were not encoded again
    assert sorted(pool.directory.iterdir()) == sorted(pool.directory.glob("block-*.npy"))  # nothing half-written
    # another model, block size, item list or item key is another pool
    for other in (
        EncodedPool(tmp_path, items, Encoder(table), key_parts=["other model"], block_rows=7),
        EncodedPool(tmp_path, items, Encoder(table), key_parts=["m"], block_rows=6),
        EncodedPool(tmp_path, items[::-1], Encoder(table), key_parts=["m"], block_rows=7),
        EncodedPool(tmp_path, items, Encoder(table), key_parts=["m"], block_rows=7, item_key=lambda i: f"{i}!"),
    ):
        assert other.directory != pool.directory and other.missing_blocks() == list(range(other.block_count))


def test_bad_settings_and_encoders_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"evaluate.pool_block_rows must be an integer of at least 1, got 0"):
        EncodedPool(tmp_path, [], Encoder(stub_vectors(6)), key_parts=[], block_rows=0)
    with pytest.raises(ValueError, match=r"pool_block_rows .* got 2.5"):
        InMemoryPool(stub_vectors(6), block_rows=2.5)
    short = EncodedPool(tmp_path, [0, 1, 2], lambda items: torch.zeros(2, 8), key_parts=["a"], block_rows=3)
    with pytest.raises(ValueError, match=r"the encoder gave \(2, 8\) torch.float32 vectors for 3 items"):
        short.ensure()
    half = EncodedPool(tmp_path, [0, 1], lambda items: torch.zeros(2, 8, dtype=torch.bfloat16), key_parts=["b"])
    with pytest.raises(ValueError, match=r"bfloat16 vectors for 2 items \(one float32 vector per item expected\)"):
        half.ensure()
    assert not any(tmp_path.rglob("block-*.npy"))
    with pytest.raises(ValueError, match="pools on disk need the model's identity"):
        EncodingCache(None, "{text}", 2, pool_dir=tmp_path)


class StubEmbedder:
    """Encodes an item as a function of its text and its image's pixels; counts what it encodes."""

    def __init__(self) -> None:
        self.encoded = 0

    def encode(self, inputs, *, template, batch_size, progress):
        self.encoded += len(inputs)
        rows = [[len(text), float(image.getpixel((0, 0))[0]) if image else -1.0] for text, image in inputs]
        return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_a_rewritten_image_or_another_model_is_encoded_again(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    Image.new("RGB", (4, 4), (200, 0, 0)).save(root / "a.png")
    candidates = [Item("a", "a.png"), Item("bb"), Item("ccc")]
    retrieval = RetrievalSet("set", "group", root, [Item("q")], candidates, [[0, 1, 2]], [[0]])
    embedder = StubEmbedder()

    def encoded_pool(model: str):
        cache = EncodingCache(embedder, "{text}", 2, pool_dir=tmp_path / "pools", model=model, block_rows=2)
        return cache.pool(retrieval.candidates, retrieval.root)

    first = torch.cat(list(encoded_pool("model A").blocks()))
    assert embedder.encoded == 3
    assert torch.equal(torch.cat(list(encoded_pool("model A").blocks())), first) and embedder.encoded == 3
    encoded_pool("model B").ensure()
    assert embedder.encoded == 6  # another model: every candidate again
    Image.new("RGB", (4, 4), (10, 0, 0)).save(root / "a.png")  # same path, same size, other pixels
    rewritten = torch.cat(list(encoded_pool("model A").blocks()))
    assert embedder.encoded == 9
    assert not torch.equal(rewritten[0], first[0]) and torch.equal(rewritten[1:], first[1:])


@pytest.fixture(scope="module")
def sample_sets(small_sample_root):
    from muco_flow.pipelines.evaluate.nodes import load_evaluation_sets
    from tests.conftest import load_params

    sets = load_evaluation_sets(str(small_sample_root), load_params()["evaluate"])
    assert sets["mmeb"] and sets["mbeir"] and sets["m3t"]  # every kind of pool the node scores
    return sets


def distinct_queries(sets) -> int:
    """What the node encodes when every pool is on disk: each (root, query) once."""
    queries = {(str(s.root), q) for s in [*sets["mmeb"], *sets["m3t"]] for q in s.queries}
    queries |= {(str(sets["mbeir"].root), q) for task in sets["mbeir"].tasks for q in task.queries}
    return len(queries)


@pytest.mark.slow  # starts nothing, but scores the whole sample seven times (minutes)
def test_the_sample_scores_the_same_with_pools_on_disk_and_a_rerun_encodes_only_the_queries(
    sample_sets, tiny_backbone_dir, model_dir, tmp_path, monkeypatch
):
    from muco_flow.modeling.embedder import MuCoEmbedder
    from muco_flow.pipelines.evaluate.nodes import _score
    from tests.conftest import load_params

    params = load_params()
    evaluate, fmt, backbone = params["evaluate"], params["format"], params["backbone"]
    assert evaluate["pool_cache_dir"] is None  # the sample's default: in memory, as before
    in_memory = _score(str(tiny_backbone_dir), sample_sets, EvaluationConfig.from_dict(evaluate), fmt, backbone)
    on_disk = EvaluationConfig.from_dict({**evaluate, "pool_cache_dir": str(tmp_path / "pools"), "pool_block_rows": 5})
    encoded = []
    original = MuCoEmbedder.encode
    monkeypatch.setattr(
        MuCoEmbedder, "encode", lambda self, items, **kw: encoded.append(len(items)) or original(self, items, **kw)
    )
    assert _score(str(tiny_backbone_dir), sample_sets, on_disk, fmt, backbone) == in_memory
    first_pools = {p.parent for p in (tmp_path / "pools").glob("*/block-*.npy")}
    # MMEB's sets, M-BEIR's local pools and its global pool, held-out M3T's sets: each a pool of its own
    pool_count = len(sample_sets["mmeb"]) + len(sample_sets["mbeir"].local_pools) + 1 + len(sample_sets["m3t"])
    assert len(first_pools) == pool_count
    assert any(len(list(p.glob("block-*.npy"))) > 1 for p in first_pools)  # blocks of 5 rows

    encoded.clear()
    assert _score(str(tiny_backbone_dir), sample_sets, on_disk, fmt, backbone) == in_memory
    assert sum(encoded) == distinct_queries(sample_sets)  # every pool block was on disk

    # the same files elsewhere are the same model: its blocks are read, not encoded again
    copy = tmp_path / "copy" / "tiny"
    shutil.copytree(tiny_backbone_dir, copy)
    encoded.clear()
    assert _score(str(copy), sample_sets, on_disk, fmt, backbone) == in_memory
    assert sum(encoded) == distinct_queries(sample_sets)

    # another model never reads these vectors: its pools are encoded anew, and score as its own in memory do
    encoded.clear()
    trained = _score(str(model_dir), sample_sets, on_disk, fmt, backbone)
    assert sum(encoded) > distinct_queries(sample_sets)
    trained_pools = {p.parent for p in (tmp_path / "pools").glob("*/block-*.npy")} - first_pools
    assert len(trained_pools) == pool_count
    assert trained == _score(str(model_dir), sample_sets, EvaluationConfig.from_dict(evaluate), fmt, backbone)
    assert trained != in_memory


@pytest.mark.slow
def test_two_processes_split_every_pool_and_score_as_one(sample_sets, tiny_backbone_dir, tmp_path, monkeypatch):
    import io

    from muco_flow.evaluation.ranks import score_on_ranks
    from muco_flow.evaluation.scoring import score_model
    from muco_flow.modeling.embedder import MuCoEmbedder
    from tests.conftest import load_params

    params = load_params()
    evaluate, fmt, backbone = params["evaluate"], params["format"], params["backbone"]
    one_process = score_model(str(tiny_backbone_dir), sample_sets, EvaluationConfig.from_dict(evaluate), fmt, backbone)
    on_ranks = {**evaluate, "pool_cache_dir": str(tmp_path / "pools"), "pool_block_rows": 5, "processes": 2}
    output = io.StringIO()
    root = sample_sets["data_root"]  # each rank reads the sets from it
    ranks = EvaluationConfig.from_dict(on_ranks)
    assert score_on_ranks(str(tiny_backbone_dir), root, ranks, fmt, backbone, stream=output) == one_process
    # each rank encoded its own blocks of the pools, and between them every block
    shares = re.findall(r"rank (\d) of 2: encoding (\d+) of (\d+) blocks", output.getvalue())
    assert {rank for rank, _, _ in shares} == {"0", "1"}
    blocks = sorted((tmp_path / "pools").glob("*/block-*.npy"))
    assert sum(int(n) for _, n, _ in shares) == len(blocks)
    # the pools are those one process reads: a re-run in this process encodes only the queries
    encoded = []
    original = MuCoEmbedder.encode
    monkeypatch.setattr(
        MuCoEmbedder, "encode", lambda self, items, **kw: encoded.append(len(items)) or original(self, items, **kw)
    )
    one = EvaluationConfig.from_dict({**on_ranks, "processes": 1})
    assert score_model(str(tiny_backbone_dir), sample_sets, one, fmt, backbone) == one_process
    assert sum(encoded) == distinct_queries(sample_sets)
    with pytest.raises(ValueError, match=r"evaluate\.processes is 2: .* set it"):
        score_on_ranks(
            str(tiny_backbone_dir), root, EvaluationConfig.from_dict({**evaluate, "processes": 2}), fmt, backbone
        )


def test_a_checkpoint_is_named_by_its_content_or_its_hub_commit(tiny_backbone_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from muco_flow.evaluation.encoding import checkpoint_identity
    from muco_flow.training.model_identity import content_hash

    copy = tmp_path / "copy"
    shutil.copytree(tiny_backbone_dir, copy)
    assert checkpoint_identity(str(copy)) == checkpoint_identity(str(tiny_backbone_dir)) == content_hash(copy)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("{", '{"edited": 1, ', 1))
    assert checkpoint_identity(str(copy)) != checkpoint_identity(str(tiny_backbone_dir))
    # a hub id: the commit of the snapshot it was loaded from (the cache, as from_pretrained leaves it)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--some-org--some-model"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        assert checkpoint_identity("some-org/some-model") == f"some-org/some-model@{commit}"
    with pytest.raises(FileNotFoundError, match="neither a local model directory nor a hub id"):
        checkpoint_identity(str(tmp_path / "nowhere"))


def source_file(module: str) -> Path | None:
    """The file that defines muco_flow module ``module`` (None: not a module, e.g. a function's name)."""
    base = Path(muco_flow.__file__).parent.parent.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def imported_muco_flow_modules(module: str) -> set[str]:
    """``module`` and every muco_flow module it imports, directly or not (imports inside functions included)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = source_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.startswith("muco_flow.")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("muco_flow"):
                # `from muco_flow.modeling import tokens` imports a module, `... import load_backbone` a name
                todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return seen


def test_the_pool_key_names_every_module_between_an_item_and_its_vector():
    # the encoder (the embedder and what it runs) and the module that opens the items' images
    encoding_code = imported_muco_flow_modules("muco_flow.modeling.embedder") | {
        "muco_flow.evaluation.encoding",
        "muco_flow.data.images",
    }
    packages = {name for name in encoding_code if source_file(name).name == "__init__.py"}
    assert sorted(ENCODING_MODULES) == sorted(encoding_code - packages)
