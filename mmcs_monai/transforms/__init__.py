"""MONAI transforms for microscopy cell segmentation (array forms and their ``...d`` twins)."""

from mmcs_monai.transforms.array import (
    CellDiameter,
    FlowsToMasks,
    LabelsToFlows,
    LoadMicroscopyImage,
    NormalizePercentile,
    RandCellAffine,
    StackNucleusChannel,
)
from mmcs_monai.transforms.dictionary import (
    AttachPseudoTargetd,
    CellDiameterd,
    DiameterInPixelsd,
    FlowsToMasksd,
    LabelsToFlowsd,
    LoadMicroscopyd,
    NormalizePercentiled,
    RandCellAffined,
    SaveCellOutputsd,
    StackNucleusChanneld,
    inference_preprocessing,
)
