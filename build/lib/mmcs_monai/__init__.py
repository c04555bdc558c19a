"""mmcs-monai: semi-supervised multi-modality cell instance segmentation on MONAI.

Modules (one home for each concept):

- ``networks``: CPnet (Cellpose-3 compatible).
- ``flows``: labels -> flows and flows -> masks.
- ``diameters``: cell diameters from labels.
- ``transforms``: MONAI array and dictionary transforms.
- ``io``: image readers/writers and input validation.
- ``data``: data lists and manifests.
- ``losses`` / ``metrics``: Cellpose loss, F1 at IoU 0.5.
- ``engines``: Ignite trainers, evaluators and handlers.
- ``inference``: tiled prediction.
- ``cli``: the ``mmcs`` command.
"""

__version__ = "0.1.0"
