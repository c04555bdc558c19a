"""MONAI Deploy App SDK application: a folder of microscopy images -> label TIFFs and per-cell CSVs.

Run it in the environment the ``deploy`` extra installs (the SDK makes every ``import monai`` load
holoscan, so it lives apart from the training environment)::

    python mmcs_monai/deploy/app.py -i IMAGES -o OUTPUT -m model.ts

Nothing here is imported by the rest of the package.
"""
