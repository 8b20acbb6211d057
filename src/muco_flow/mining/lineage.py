"""What a folder of mined negatives records about how it was made, and the tags that carry it onward.

The `mine` pipeline writes ``mining_manifest.json`` beside the meta files it
mined (``mining.mine``). Stage 2 ingests those meta files; the ingest manifest
of its shards names the folder they came from (``source.uri``), so the run
that trains on them and the version registered from it can name the mining
model, pool and settings (``mined_negatives_lineage``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from muco_flow.tracking import canonical_hash

MANIFEST_FILE = "mining_manifest.json"
MANIFEST_SCHEMA = "muco-flow/mined-negatives/1"
# what a registered version carries (a version keeps a few tags; the run that trained it has them all)
VERSION_KEYS = ("negatives", "mining_model", "mining_model_content_hash", "mining_manifest_sha256")


def mined_negatives_lineage(shards_dir: str | Path) -> dict[str, str]:
    """Tags naming how the negatives of ``shards_dir``'s rows were mined; {} if they were not mined.

    Keys (bare, as registered versions carry them; a training run prefixes ``muco_flow.``):
    ``negatives`` ("mined"), ``mining_model`` (as configured), ``mining_model_run_id``,
    ``mining_model_version`` (a models:/ reference, or ""), ``mining_model_content_hash``,
    ``mining_pool``, ``mining_settings_hash``, ``mining_code_commit``, ``mining_manifest_sha256``.
    """
    ingest_manifest = Path(shards_dir) / "manifest.json"
    if not ingest_manifest.is_file():
        return {}
    source = json.loads(ingest_manifest.read_text()).get("source") or {}
    uri = str(source.get("uri", ""))
    if not uri or "://" in uri:
        return {}  # mined folders are local (the `mine` pipeline writes them)
    path = Path(uri) / MANIFEST_FILE
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    manifest: dict[str, Any] = json.loads(raw)
    model = manifest["model"]
    return {
        "negatives": "mined",
        "mining_model": str(model["reference"]),
        "mining_model_run_id": str(model["mlflow_run_id"] or ""),
        "mining_model_version": str(model["registered"] or ""),
        "mining_model_content_hash": str(model["content_hash"]),
        "mining_pool": str(manifest["pool"]["kind"]),
        "mining_settings_hash": canonical_hash(manifest["settings"]),
        "mining_code_commit": str(manifest["code"]["git_commit"]),
        "mining_manifest_sha256": hashlib.sha256(raw).hexdigest(),
    }


def version_lineage_tags(shards_dir: str | Path) -> dict[str, str]:
    """The few of ``mined_negatives_lineage``'s tags a registered version carries (VERSION_KEYS); {} if not mined."""
    return {key: value for key, value in mined_negatives_lineage(shards_dir).items() if key in VERSION_KEYS}
