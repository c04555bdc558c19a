"""Ignite engines' building blocks: batch preparation (``utils``), checkpoints and resume (``checkpointing``),
training-time handlers (``training``), run reports (``reports``), schedules and the semi-supervised phase (``semi``)."""

from mmcs_monai.engines.checkpointing import BestModelSaver, CheckpointHandler, ModelFileLoader, TransformRandomState
from mmcs_monai.engines.reports import F1ReportHandler, ImageRunReport, SegmentationReport, TrainingReport
from mmcs_monai.engines.schedules import WarmupHalvingSchedule
from mmcs_monai.engines.semi import (
    MixedBatchLoader,
    PseudoLabelRefresher,
    PseudoLabelStore,
    UnlabelledWeightHandler,
    prediction_to_pseudo,
    sigmoid_rampup,
)
from mmcs_monai.engines.training import (
    BadSampleReport,
    LearningRateLogger,
    SyncBuffersHandler,
    TimeBudgetHandler,
    TrainingDiameterHandler,
)
from mmcs_monai.engines.utils import (
    PrepareFlowBatch,
    PrepareImageBatch,
    TeacherValidationHandler,
    run_if_any,
    save_atomic,
    unwrap,
    use_handler,
)
