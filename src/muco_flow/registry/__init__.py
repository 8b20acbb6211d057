"""The MLflow Model Registry side: a servable pyfunc embedder, versions with lineage, promotion by alias.

``serving``: what a registered version does when it is loaded or served
(requests in, limits, images, `MuCoEmbeddingModel`); ``registration``: a new
version with its lineage and alias `challenger`; ``promotion``: `champion`
moves to the challenger when it is better. This module holds what the three
share: the aliases, the error, and finding a version by alias.
"""

from __future__ import annotations

CHALLENGER = "challenger"
CHAMPION = "champion"


class RegistryError(RuntimeError):
    """The registry is not in the state an operation needs (no challenger, a tag missing)."""


def version_by_alias(client, name: str, alias: str):
    """The version of model ``name`` that ``alias`` points to, or None (no such alias or model)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
