"""`data`: ingest then format, a snapshot to model input in one command; no nodes of its own.

A folder, not an entry built in pipeline_registry.py: Kedro (1.7) imports only
the folders of the pipelines a run names, so `kedro run --pipelines=data`
finds a pipeline only here. Its nodes are the library's, in `muco_flow.data`.
"""

from muco_flow.pipelines.data.pipeline import create_pipeline

__all__ = ["create_pipeline"]
