"""Learning-rate schedules, as epoch -> multiplier functions for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations


class WarmupHalvingSchedule:
    """Linear warm-up, constant, then halving every ``halving_every`` epochs down to a floor.

    ``factor(epoch)`` (epoch counted from 0) is
    ``(epoch + 1) / warmup_epochs`` during warm-up, 1 afterwards, and from ``halving_start`` on
    ``0.5 ** (1 + (epoch - halving_start) // halving_every)``, never below ``min_factor``.
    The MMCS paper: lr 0.1, 10 warm-up epochs, halving every 100 epochs from epoch 1500 of 2500,
    floor 0.0016 (``min_factor=0.016``).

    Args:
        warmup_epochs: epochs of linear warm-up (0 disables).
        halving_start: first epoch with a halved rate; None never halves.
        halving_every: epochs between halvings.
        min_factor: floor of the multiplier.
    """

    def __init__(
        self,
        warmup_epochs: int = 10,
        halving_start: int | None = None,
        halving_every: int = 100,
        min_factor: float = 0.0,
    ):
        if halving_every < 1:
            raise ValueError("halving_every must be >= 1")
        self.warmup_epochs = warmup_epochs
        self.halving_start = halving_start
        self.halving_every = halving_every
        self.min_factor = min_factor

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / self.warmup_epochs
        if self.halving_start is None or epoch < self.halving_start:
            return 1.0
        halvings = 1 + (epoch - self.halving_start) // self.halving_every
        return max(0.5**halvings, self.min_factor)
