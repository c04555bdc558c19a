"""napari plugin (npe2): the "MMCS segmentation" dock widget and the bundle's sample images as sample data.

Install with the ``napari`` extra (``pip install "mmcs-monai[napari]"``); napari finds the manifest,
``napari.yaml``, through the ``napari.manifest`` entry point. Importing this package imports neither napari nor Qt:

- :mod:`.core`: layer data -> network input (as ``mmcs infer``), segmentation in cancellable steps, training sets;
- :mod:`.finetune`: ``mmcs train`` in a low-priority child process, and its progress;
- :mod:`.client`: the MONAI Label REST client of the server mode (standard library only);
- :mod:`._widget`: the Qt widget over them; :mod:`._sample_data`: the sample images.

Guide: docs/napari.md.
"""
