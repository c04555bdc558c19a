"""Which labelled images train and which validate a label-server run, and whether its model is published.

No MONAI Label import here, so the rules are tested in the main environment.
"""

from __future__ import annotations

import random


def split_labelled(items: list[dict], val_fraction: float, min_val_images: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val): hold out ``round(val_fraction * n)`` (>= 1) images when there are ``min_val_images`` or
    more; with fewer, every image is in both (the best epoch is then chosen on the training images).

    The hold-out is a seeded shuffle, so the same datastore and seed give the same split."""
    if len(items) < max(int(min_val_images), 2) or val_fraction <= 0:
        return list(items), list(items)
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(val_fraction * len(items)))
    return shuffled[n_val:], shuffled[:n_val]


def should_publish(mode: str, run_f1: float | None, served_f1: float | None) -> bool:
    """Whether a finished run's model replaces the served one.

    Args:
        mode: ``"always"``, or ``"if_better"``: only when the run's best validation F1 is at least the
            served model's F1 on the same validation images.
        run_f1: the run's best validation F1 (None when no validation ran).
        served_f1: the served model's F1 on the validation images (measured before training).
    """
    if mode == "always":
        return True
    if mode != "if_better":
        raise ValueError(f"publish {mode!r}: use 'if_better' or 'always'")
    return run_f1 is not None and served_f1 is not None and run_f1 >= served_f1
