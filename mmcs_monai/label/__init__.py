"""MONAI Label app for mmcs-monai (install the ``label`` extra, in its own environment).

- :mod:`.app`: :class:`~.app.MMCSLabelApp`, which ``apps/mmcs/main.py`` exposes to ``monailabel start_server``;
- :mod:`.datastore`: checked uploads, atomic writes, shared safely with the training process;
- :mod:`.infer`, :mod:`.train`, :mod:`.activelearning`: the tasks;
- :mod:`.model`: the served model file, reloaded when training replaces it;
- :mod:`.uncertainty`, :mod:`.geojson`, :mod:`.asap`, :mod:`.publishing`: plain functions (no MONAI Label import)
  also used by experiments/active_learning and tested in the main environment.
"""
