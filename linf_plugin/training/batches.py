"""The order in which training samples are visited, shared by one process and by DDP ranks.

Each epoch's global order is the permutation that torch's
``DistributedSampler`` draws from ``seed + epoch``; rank ``r`` of ``R``
takes positions ``r, r + R, r + 2R, ...``.  Local batch ``k`` of every rank
together cover global positions ``[k·B, (k+1)·B)`` (``B`` the global
batch), so ``R`` ranks with local batch ``B/R`` see the same global batches
as one process with batch ``B`` (when ``R`` divides the data set size; else
the sampler pads the last batch by repeating the first samples).

The order depends on (seed, epoch) only: resuming needs no sampler state.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data.distributed import DistributedSampler

from .augment import AugmentParams, draw_augment

__all__ = ["EpochBatches"]


class EpochBatches:
    """Per-rank batches of sample indices (and their augmentation) for any epoch.

    Args:
        n: number of training samples.
        global_batch: batch size summed over ranks; must be divisible by ``world_size``.
        world_size, rank: the DDP layout (1, 0 for one process).
        seed: the run's seed.
        crop_padding, hflip: augmentation (see :mod:`linf_plugin.training.augment`).
    """

    def __init__(self, n: int, global_batch: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 crop_padding: int = 0, hflip: bool = False):
        if global_batch % world_size:
            raise ValueError(f"the global batch size {global_batch} must be divisible by the number of "
                             f"processes {world_size}")
        if n < 1:
            raise ValueError("the training set is empty")
        self.n = n
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.local_batch = global_batch // world_size
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=False)

    @property
    def samples_per_rank(self) -> int:
        return self.sampler.num_samples

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank)."""
        return math.ceil(self.samples_per_rank / self.local_batch)

    def epoch(self, epoch: int) -> Iterator[Tuple[torch.Tensor, Optional[AugmentParams]]]:
        """Yield ``(indices (b,), augment params or None)`` for each local batch of ``epoch``."""
        self.sampler.set_epoch(epoch)
        indices = torch.tensor(list(iter(self.sampler)), dtype=torch.int64)
        aug = draw_augment(self.sampler.total_size, self.crop_padding, self.hflip, self.seed, epoch)
        positions = torch.arange(len(indices), dtype=torch.int64) * self.world_size + self.rank
        for k in range(len(self)):
            sl = slice(k * self.local_batch, (k + 1) * self.local_batch)
            yield indices[sl], (aug.take(positions[sl]) if aug is not None else None)
