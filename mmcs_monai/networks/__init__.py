"""Networks: :class:`CPnet` (Cellpose 3 compatible), its checkpoint loader and its TorchScript export."""

from .cpnet import CPnet, load_cellpose_checkpoint
from .torchscript import export_torchscript, load_model, load_torchscript

__all__ = ["CPnet", "load_cellpose_checkpoint", "export_torchscript", "load_model", "load_torchscript"]
