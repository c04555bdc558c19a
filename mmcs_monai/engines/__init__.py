"""Ignite engines' building blocks: batch preparation, handlers, schedules and the semi-supervised phase."""

from mmcs_monai.engines.handlers import (
    BadSampleReport,
    BestModelSaver,
    CheckpointHandler,
    F1ReportHandler,
    LearningRateLogger,
    ModelFileLoader,
    SegmentationReport,
    SyncBuffersHandler,
    TimeBudgetHandler,
    TrainingDiameterHandler,
    TrainingReport,
    TransformRandomState,
    save_atomic,
)
from mmcs_monai.engines.schedules import WarmupHalvingSchedule
from mmcs_monai.engines.semi import (
    MixedBatchLoader,
    PseudoLabelRefresher,
    PseudoLabelStore,
    UnlabelledWeightHandler,
    prediction_to_pseudo,
    sigmoid_rampup,
)
from mmcs_monai.engines.utils import PrepareFlowBatch, TeacherValidationHandler, run_if_any, use_handler
