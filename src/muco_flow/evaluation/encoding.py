"""Items to vectors for evaluation: each distinct item encoded once, candidate pools in memory or on disk.

``EncodingCache`` keeps query vectors in memory and builds candidate pools
(``evaluation.encoded_pool``); a pool on disk is keyed by everything its
vectors depend on: the model (``checkpoint_identity`` and the load settings),
the encoding code (``encoding_code_key``), the prompt template and the items.
Scoring the vectors is ``evaluation.scoring``'s job.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from muco_flow.data.images import confined_path
from muco_flow.data.sources import model_content_hash
from muco_flow.evaluation.datasets import Item
from muco_flow.evaluation.encoded_pool import DEFAULT_BLOCK_ROWS, EncodedPool, InMemoryPool, VectorPool
from muco_flow.modeling.backbone import resolve_checkpoint
from muco_flow.modeling.embedder import MuCoEmbedder

# The code between an item and its vector: a change to any of them makes pools on disk stale
# (this module opens the items' images: EncodingCache._encode)
ENCODING_MODULES = (
    "muco_flow.data.images",
    "muco_flow.evaluation.encoding",
    "muco_flow.modeling.backbone",
    "muco_flow.modeling.embedder",
    "muco_flow.modeling.families",
    "muco_flow.modeling.image_sizing",
    "muco_flow.modeling.inputs",
    "muco_flow.modeling.prompt",
    "muco_flow.modeling.tokens",
)


class EncodingCache:
    """Vectors by (root, item): an image shared by several sets is encoded once.

    Candidate pools come from ``pool``: in memory by default; with
    ``pool_dir``, encoded to disk ``block_rows`` at a time (EncodedPool) under
    a key naming ``model`` (the model's identity and how it was loaded), the
    encoding code and the items, so memory does not grow with the pool, a
    re-run after a kill keeps the blocks already written, and another model
    never reads these vectors. As rank r of n (``share``), each pool's blocks
    r, r + n, ... are encoded here, then ``barrier`` waits for the other
    ranks' blocks, so every rank reads the whole pool.
    """

    def __init__(
        self,
        embedder: MuCoEmbedder,
        template: str,
        batch_size: int,
        *,
        pool_dir: str | Path | None = None,
        model: str = "",
        block_rows: int = DEFAULT_BLOCK_ROWS,
        share: tuple[int, int] = (0, 1),
        barrier: Callable[[], None] | None = None,
    ) -> None:
        if pool_dir is not None and not model:
            raise ValueError("pools on disk need the model's identity (`model`) in their key")
        if share[1] > 1 and (pool_dir is None or barrier is None):
            raise ValueError("evaluation on several processes needs evaluate.pool_cache_dir (and a barrier)")
        self.share, self.barrier = share, barrier
        self.embedder, self.template, self.batch_size = embedder, template, batch_size
        self.pool_dir, self.model, self.block_rows = pool_dir, model, block_rows
        self._vectors: dict[tuple[str, Item], torch.Tensor] = {}
        self._pools: dict[tuple[str, int], tuple[Sequence[Item], EncodedPool]] = {}

    def _encode(self, items: Sequence[Item], root, *, progress: bool) -> torch.Tensor:
        inputs = [
            (item.text, Image.open(confined_path(root, item.image)).convert("RGB") if item.image else None)
            for item in items
        ]
        return self.embedder.encode(inputs, template=self.template, batch_size=self.batch_size, progress=progress)

    def vectors(self, items: Sequence[Item], root) -> torch.Tensor:
        keys = [(str(root), item) for item in items]
        missing = list(dict.fromkeys(k for k in keys if k not in self._vectors))
        # images are opened a slice at a time, so memory does not grow with the set
        step = self.batch_size * 8
        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]
            encoded = self._encode([item for _, item in chunk], root, progress=len(missing) > step)
            self._vectors.update(zip(chunk, encoded, strict=True))
        return torch.stack([self._vectors[k] for k in keys]) if keys else torch.empty(0)

    def pool(self, items: Sequence[Item], root) -> VectorPool:
        """A candidate pool: in memory, or with ``pool_dir`` on disk in blocks."""
        if self.pool_dir is None:
            return InMemoryPool(self.vectors(items, root), self.block_rows)
        known = self._pools.get((str(root), id(items)))
        if known is not None and known[0] is items:  # the same list again (M-BEIR's global pool, every task)
            return known[1]
        step = self.batch_size * 8  # images opened a slice at a time

        def encode(block: Sequence[Item]) -> torch.Tensor:
            return torch.cat(
                [self._encode(block[s : s + step], root, progress=False) for s in range(0, len(block), step)]
            )

        def item_key(item: Item) -> str:
            # an image rewritten in place (a regenerated sample) is another item
            image = confined_path(root, item.image).stat() if item.image else None
            return repr((item, image and (image.st_size, image.st_mtime_ns)))

        pool = EncodedPool(
            self.pool_dir,
            items,
            encode,
            key_parts=[self.model, encoding_code_key(), self.template, str(Path(root).resolve())],
            block_rows=self.block_rows,
            item_key=item_key,
        )
        if self.share[1] > 1:
            assert self.barrier is not None  # __init__ refuses several ranks without one
            pool.ensure(*self.share)
            self.barrier()  # every rank's blocks are on disk after this
        self._pools[(str(root), id(items))] = (items, pool)
        return pool


@functools.cache
def encoding_code_key() -> str:
    """What else decides a vector: the code that encodes (prompt, inputs, model, images) and its libraries' versions."""
    import PIL
    import transformers

    digest = hashlib.sha256(f"{torch.__version__} {transformers.__version__} {PIL.__version__}".encode())
    for module in ENCODING_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:  # renamed or moved: say which, not AttributeError on None
            raise ModuleNotFoundError(f"ENCODING_MODULES names {module}, which has no source file")
        digest.update(Path(spec.origin).read_bytes() + b"\0")
    return digest.hexdigest()


def checkpoint_identity(name_or_path: str) -> str:
    """Names a model's weights: a local directory by its content hash, a hub id by the commit it was loaded at.

    A hub id's files are in the Hugging Face cache once the model is loaded;
    the snapshot there is named by its commit, and a commit's files never change.
    """
    source, local = resolve_checkpoint(name_or_path)
    if local:
        return model_content_hash(source)
    from huggingface_hub import snapshot_download

    return f"{source}@{Path(snapshot_download(source, local_files_only=True)).name}"
