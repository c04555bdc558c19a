"""mmcs-monai: semi-supervised multi-modality cell instance segmentation on MONAI.

Modules, bottom layer first (``tests/test_layers.py`` keeps the order; ``docs/architecture.md`` draws it):

- ``io`` (image and label readers/writers, :class:`~mmcs_monai.io.InputError`, image stems), ``options``
  (option values as strings spell them), ``distributed`` (ranks and the device default: the only module
  that knows about them), ``flows`` (labels -> flows, flows -> masks, :class:`~mmcs_monai.flows.MaskSettings`),
  ``diameters``, ``size_estimate`` (the ``auto`` search), ``metrics`` (F1 at IoU 0.5), ``losses``,
  ``cells`` (cell tables and summaries), ``reporting`` (progress and summary lines);
- ``networks`` (CPnet, Cellpose-3 compatible; model files, TorchScript, compilation), ``precision``
  (precision and compile policy), ``data`` (data lists, manifests, bad samples), ``transforms`` (array
  transforms and their ``...d`` dictionary twins);
- ``inference`` (tiled prediction at the model's scale), ``segmentation`` (:class:`~mmcs_monai.segmentation.CellSegmenter`:
  the one image -> masks path, and which diameter an image gets), ``engines`` (ignite handlers by concern:
  checkpointing, training, reports; schedules; the semi-supervised phase);
- ``evaluation``, ``wholeslide`` (slides block by block), ``workflows`` (the bundle's workflows, recipes,
  command lines);
- ``cli`` (the ``mmcs`` command); the applications ``label`` (MONAI Label server) and ``deploy`` (MONAI Deploy app).
"""

__version__ = "0.1.0"
