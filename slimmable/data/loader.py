"""``create_loader``: a ``DataLoader`` whose order depends only on (seed, epoch), sharded across processes.

Training batches of one process with global batch ``B`` and of ``W`` processes with ``B / W`` each cover the same
images: shard ``r`` takes every ``W``-th index of the same permutation, so the union of the shards' ``i``-th
batches is the single process's ``i``-th batch. Evaluation shards are not padded, so every image counts once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

__all__ = ["ShardedSampler", "create_loader"]


class ShardedSampler(Sampler[int]):
    """Indices of one process's shard: a (seed, epoch) permutation, or the natural order, every ``world``-th.

    Args:
        length: dataset size.
        rank, world_size: this process's shard.
        shuffle: permute with ``seed + epoch`` (call :meth:`set_epoch` every epoch).
        seed: base seed of the permutation.
        drop_tail: training: drop the last ``length % world_size`` indices so all shards are equally long;
            evaluation (``False``): shards may differ by one and every index appears exactly once.
    """

    def __init__(
        self,
        length: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_tail: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.length, self.rank, self.world_size = length, rank, world_size
        self.shuffle, self.seed, self.drop_tail = shuffle, seed, drop_tail
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use the permutation of ``epoch``, starting at the ``start``-th index of this shard (to resume)."""
        self.epoch, self.start = int(epoch), int(start)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        if self.drop_tail:
            order = order[: self.length - self.length % self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        n = self.length // self.world_size if self.drop_tail else len(range(self.rank, self.length, self.world_size))
        return max(0, n - self.start)


def _keep_batch(batch: Any) -> Any:
    # the dataset already built the batch (TensorImageDataset.__getitems__)
    return batch


def create_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    collate_fn: Any = None,
) -> DataLoader:
    """A ``DataLoader`` for training (shuffled, full batches) or evaluation (in order, every image once).

    The loader's sampler is a :class:`ShardedSampler` (``loader.batch_sampler.sampler``); call its ``set_epoch``
    before each training epoch. Datasets with ``batched_fetch`` (in-memory tensors) build each batch in one call.

    Args:
        dataset: map-style dataset.
        batch_size: the **global** batch size, split evenly over ``world_size`` processes.
        train: shuffle and drop the last incomplete batch.
        num_workers: data-loading processes.
        seed: base seed of the shuffling (the same on every process).
        rank, world_size: this process's shard.
        pin_memory: page-locked batches (for CUDA).
        collate_fn: how items become a batch (default: stacked tensors; detection data:
            :func:`slimmable.data.coco.collate_detection`, lists of images and targets).

    Raises:
        ValueError: ``batch_size`` not divisible by ``world_size``, or the dataset smaller than one batch.
    """
    if batch_size % world_size:
        raise ValueError(
            f"global batch size {batch_size} is not divisible by {world_size} processes; "
            f"set data.batch_size to a multiple of {world_size}"
        )
    per_rank = batch_size // world_size
    sampler = ShardedSampler(len(dataset), rank, world_size, shuffle=train, seed=seed, drop_tail=train)
    batches = BatchSampler(sampler, per_rank, drop_last=train)
    if train and len(batches) == 0:
        raise ValueError(
            f"the training set has {len(dataset)} images, fewer than one batch of {batch_size}; lower data.batch_size"
        )
    batched = getattr(dataset, "batched_fetch", False)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=_keep_batch if batched else collate_fn,
        persistent_workers=False,
    )
