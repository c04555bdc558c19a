"""Networks: the model (:mod:`.cpnet`), its TorchScript shim (:mod:`.torchscript`) and model files (:mod:`.model_files`).

Imports go one way: ``padding`` <- ``torchscript`` <- ``cpnet`` <- ``model_files``; ``padding`` <- ``quantized`` <- ``model_files``.
"""

from .cpnet import CPnet
from .model_files import (
    ModelFileError,
    export_torchscript,
    extract_state_dict,
    infer_cpnet_args,
    load_cellpose_checkpoint,
    load_model,
    load_torchscript,
    save_release_file,
    size_network_file,
)

__all__ = [
    "CPnet",
    "ModelFileError",
    "export_torchscript",
    "extract_state_dict",
    "infer_cpnet_args",
    "load_cellpose_checkpoint",
    "load_model",
    "load_torchscript",
    "save_release_file",
    "size_network_file",
]
