"""torch.distributed for training and inference under ``torchrun``: process group, devices, rank-0 writes, shards.

Everything here is a no-op in a single process, so the same configs and code run with and without
``torchrun``. Conventions:

- one process per GPU (``LOCAL_RANK`` picks it), or per CPU share with the ``gloo`` backend;
- every rank holds the same model; only rank 0 writes files (checkpoints, best model, TensorBoard,
  bad-sample reports);
- work is split by striding (``items[rank::world_size]``) so the shards are disjoint, cover the
  list, and keep its order within each rank.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

__all__ = [
    "init_process_group",
    "destroy_process_group",
    "quiet_other_ranks",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "local_device",
    "shard",
    "all_gather_objects",
    "broadcast_object",
    "barrier",
    "broadcast_buffers",
    "wrap_ddp",
    "distributed_sampler",
    "set_sampler_epoch",
    "summary_writer",
    "NullSummaryWriter",
]


def init_process_group(backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); returns whether distributed.

    Args:
        backend: ``nccl`` (GPUs) or ``gloo`` (CPU); default ``nccl`` when CUDA is available, else ``gloo``.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def destroy_process_group() -> None:
    """Leave the process group, all ranks together: a rank that tore down its gloo connections while another still
    used them once aborted at exit ("terminate called without an active exception", SIGABRT) after a finished run."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def quiet_other_ranks() -> None:
    """Log only warnings and errors on ranks other than 0, so progress is reported once."""
    if get_rank() > 0:
        import logging

        logging.disable(logging.INFO)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that writes files."""
    return get_rank() == 0


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` where there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item starting at ``rank``."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return list(items[rank::world_size])


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (batch-norm running statistics) to every rank.

    DDP broadcasts them before each forward, so after the last step each rank still holds its own
    update; calling this after every step keeps validation, the teacher and the final models identical.
    """
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=src)


def wrap_ddp(network: torch.nn.Module, device: torch.device | str | None = None) -> torch.nn.Module:
    """``network`` on ``device`` (default :func:`local_device`), wrapped in ``DistributedDataParallel`` when
    distributed (``device_ids`` on GPU).

    DDP broadcasts rank 0's weights when it wraps, so every rank starts from the same model.
    """
    device = torch.device(device) if device is not None else local_device()
    network = network.to(device)
    if not is_distributed():
        return network
    device_ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=device_ids)


def distributed_sampler(dataset, shuffle: bool = True, even_divisible: bool = True):
    """MONAI's ``DistributedSampler`` over ``dataset`` when distributed, else None (the loader's own order).

    ``even_divisible`` pads the shards to equal length, which DDP training needs (every rank must run
    the same number of steps); inference and validation pass False so no image is done twice. With
    fewer items than ranks (and False) there is no sampler: every rank takes every item, which leaves
    an all-reduced mean (the validation F1) unchanged and writes the same outputs twice, atomically.
    """
    if not is_distributed() or (not even_divisible and len(dataset) < get_world_size()):
        return None
    from monai.data import DistributedSampler

    return DistributedSampler(dataset, shuffle=shuffle, even_divisible=even_divisible)


def weighted_sampler(weights: Sequence[float], num_samples: int | None = None):
    """Draw items with replacement in proportion to ``weights``, ``num_samples`` per epoch (default: one pass).

    Not distributed: torch's ``WeightedRandomSampler`` over the whole list. Distributed: MONAI's
    ``DistributedWeightedRandomSampler``, each rank drawing ``num_samples / world_size`` from its own
    shard (``set_epoch`` gives a new draw every epoch, as :func:`set_sampler_epoch` does).
    """
    weights = [float(w) for w in weights]
    num_samples = len(weights) if num_samples is None else int(num_samples)
    if not is_distributed():
        return torch.utils.data.WeightedRandomSampler(weights, num_samples=num_samples, replacement=True)
    from monai.data import DistributedWeightedRandomSampler

    return DistributedWeightedRandomSampler(
        list(range(len(weights))),
        weights=weights,
        num_samples_per_rank=max(1, num_samples // get_world_size()),
        shuffle=True,
        even_divisible=True,
    )


def set_sampler_epoch(loader, epoch: int) -> None:
    """``loader.sampler.set_epoch(epoch)`` when the loader shards with a distributed sampler (new shuffle per epoch)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


class NullSummaryWriter:
    """Stands in for TensorBoard's ``SummaryWriter`` on ranks other than 0: accepts every call, writes nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def summary_writer(log_dir: str):
    """A TensorBoard ``SummaryWriter`` on rank 0, a :class:`NullSummaryWriter` on the other ranks."""
    if not is_main_process():
        return NullSummaryWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)
