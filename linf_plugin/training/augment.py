"""Batched data augmentation on tensors: random crop after edge padding, horizontal flip.

The random offsets of a whole epoch are drawn up front from a generator
seeded by ``(seed, epoch)`` and indexed by the sample's POSITION in the
epoch's global order.  So the augmentation of every sample is a pure function
of (seed, epoch, position): a resumed run and a DDP rank (which sees every
``world_size``-th position) apply exactly what a single uninterrupted
process applies, with no generator state to save.

The authors of the paper pad with the edge value (``padding_mode='edge'``):
pad 1 for MNIST, 3 for CIFAR-10, plus horizontal flips for CIFAR-10.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["AugmentParams", "draw_augment", "apply_augment", "epoch_generator"]


@dataclass
class AugmentParams:
    """Per-position augmentation of one epoch.

    Attributes:
        dx, dy: ``(n,)`` int64 crop offsets in ``[0, 2·padding]`` (``padding`` = no shift).
        flip: ``(n,)`` bool, flip horizontally.
        padding: the padding the offsets refer to.
    """

    dx: torch.Tensor
    dy: torch.Tensor
    flip: torch.Tensor
    padding: int

    def take(self, positions: torch.Tensor) -> "AugmentParams":
        """The parameters of the given epoch positions (``(b,)`` int64)."""
        return AugmentParams(self.dx[positions], self.dy[positions], self.flip[positions], self.padding)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded by ``(seed, epoch, stream)`` (independent streams for different uses)."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch) * 7_919 + int(stream) * 104_729) % (2 ** 63 - 1))
    return g


def draw_augment(n: int, padding: int, hflip: bool, seed: int, epoch: int) -> Optional[AugmentParams]:
    """Draw the augmentation of the ``n`` positions of one epoch, or None when it is off.

    Args:
        n: number of positions (the epoch's padded global length).
        padding: crop padding (0 = no crop).
        hflip: random horizontal flips with probability 1/2.
        seed, epoch: what the draw depends on.
    """
    if padding <= 0 and not hflip:
        return None
    g = epoch_generator(seed, epoch, stream=1)
    if padding > 0:
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=g)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    else:
        dx = dy = torch.zeros(n, dtype=torch.int64)
    flip = torch.rand(n, generator=g) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool)
    return AugmentParams(dx, dy, flip, max(int(padding), 0))


def apply_augment(x: torch.Tensor, params: Optional[AugmentParams]) -> torch.Tensor:
    """Crop and flip a batch of images.

    Args:
        x: ``(B, C, H, W)`` images.
        params: from :meth:`AugmentParams.take` for this batch, or None.

    Returns:
        ``(B, C, H, W)``: each image padded by repeating its edge, cropped at
        its offset, and flipped where asked.  Values stay in the data range
        (edge padding never invents new pixel values).
    """
    if params is None:
        return x
    if x.dim() != 4:
        raise ValueError(f"augmentation needs image batches (B, C, H, W), got shape {tuple(x.shape)}; "
                         f"set crop_padding=0 and hflip=False for vector data")
    b, c, h, w = x.shape
    dev = x.device
    if params.padding > 0:
        pad = params.padding
        xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        rows = params.dy.to(dev).view(b, 1) + torch.arange(h, device=dev).view(1, h)  # (B, H)
        cols = params.dx.to(dev).view(b, 1) + torch.arange(w, device=dev).view(1, w)  # (B, W)
        bidx = torch.arange(b, device=dev).view(b, 1, 1)
        # advanced indexing over (batch, row, col) with the channel slice in between -> (B, H, W, C)
        x = xp.permute(0, 2, 3, 1)[bidx, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2)
    flip = params.flip.to(dev)
    if bool(flip.any()):
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    return x.contiguous()
