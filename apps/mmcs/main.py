"""MONAI Label app folder for mmcs-monai: everything lives in :mod:`mmcs_monai.label`.

    monailabel start_server --app apps/mmcs --studies IMAGES --host 127.0.0.1 --conf models mmcs --conf model MODEL.pt

MONAI Label looks in this file for a subclass of ``MONAILabelApp``; see ``mmcs_monai/label/app.py`` for the
``--conf`` options. The server writes ``model/`` (served model, training runs) and ``logs/`` here.
"""

from mmcs_monai.label.app import MMCSLabelApp

__all__ = ["MMCSLabelApp"]
