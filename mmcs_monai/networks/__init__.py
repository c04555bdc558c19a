"""Networks: :class:`CPnet` (Cellpose 3 compatible) and its checkpoint loader."""

from .cpnet import CPnet, load_cellpose_checkpoint

__all__ = ["CPnet", "load_cellpose_checkpoint"]
