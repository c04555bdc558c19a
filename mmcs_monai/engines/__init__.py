"""Ignite engines' building blocks: batch preparation, handlers and schedules."""

from mmcs_monai.engines.handlers import (
    BestModelSaver,
    CheckpointHandler,
    F1ReportHandler,
    LearningRateLogger,
    TimeBudgetHandler,
    TrainingDiameterHandler,
    datalist_mean_diameter,
    save_atomic,
    set_diameter_labels,
)
from mmcs_monai.engines.schedules import WarmupHalvingSchedule
from mmcs_monai.engines.utils import PrepareFlowBatch
