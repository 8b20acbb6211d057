"""The registered pyfunc as MLflow models-from-code: `register_model_version` logs this file's source.

Loading the model runs this file (with the logged muco_flow package on the
path); no pickle is written or read.
"""

import mlflow

from muco_flow.registry.serving import MuCoEmbeddingModel

mlflow.models.set_model(MuCoEmbeddingModel())
