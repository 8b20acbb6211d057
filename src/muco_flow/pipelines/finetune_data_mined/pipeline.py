from kedro.pipeline import Pipeline, pipeline

from muco_flow.pipelines.finetune_data import create_pipeline as create_finetune_data_pipeline


def create_pipeline(**kwargs) -> Pipeline:
    # the same nodes and outputs; only the rows come from the mined folder (its images from the snapshot)
    return pipeline(create_finetune_data_pipeline(), inputs={"mmeb_train_source": "mmeb_train_mined"})
