"""Augmentation and sample order: correct crops/flips, determinism, and DDP shards that rebuild the global batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from linf_plugin.training.augment import AugmentParams, apply_augment, draw_augment
from linf_plugin.training.batches import EpochBatches


def test_crop_and_flip_match_a_per_image_reference():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 5, 7)
    pad = 2
    params = draw_augment(6, pad, True, seed=3, epoch=1)
    out = apply_augment(x, params)
    for i in range(6):
        p = F.pad(x[i:i + 1], (pad,) * 4, mode="replicate")[0]
        dy, dx = int(params.dy[i]), int(params.dx[i])
        ref = p[:, dy:dy + 5, dx:dx + 7]
        if params.flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)
    # offsets of `padding` on both axes and no flip leave an image unchanged
    same = AugmentParams(torch.full((6,), pad), torch.full((6,), pad), torch.zeros(6, dtype=torch.bool), pad)
    assert torch.equal(apply_augment(x, same), x)
    assert apply_augment(x, None) is x
    assert out.min() >= x.min() and out.max() <= x.max()  # edge padding adds no new values


def test_augmentation_depends_on_seed_and_epoch_only():
    a, b = draw_augment(100, 1, False, 7, 4), draw_augment(100, 1, False, 7, 4)
    assert torch.equal(a.dx, b.dx) and torch.equal(a.dy, b.dy)
    c = draw_augment(100, 1, False, 7, 5)
    assert not torch.equal(a.dx, c.dx)
    assert set(a.dx.tolist()) == {0, 1, 2}
    assert draw_augment(100, 0, False, 7, 4) is None


def test_two_ranks_rebuild_the_single_process_batches():
    n, B = 100, 20
    single = EpochBatches(n, B, 1, 0, seed=11, crop_padding=1, hflip=True)
    ranks = [EpochBatches(n, B, 2, r, seed=11, crop_padding=1, hflip=True) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 5
    for epoch in (0, 3):
        whole = list(single.epoch(epoch))
        parts = [list(r.epoch(epoch)) for r in ranks]
        for k, (idx, aug) in enumerate(whole):
            key = {int(i): (int(aug.dx[j]), int(aug.dy[j]), bool(aug.flip[j])) for j, i in enumerate(idx)}
            got = {}
            for r in range(2):
                ridx, raug = parts[r][k]
                assert len(ridx) == B // 2
                for j, i in enumerate(ridx):
                    got[int(i)] = (int(raug.dx[j]), int(raug.dy[j]), bool(raug.flip[j]))
            assert got == key
        # every sample once per epoch, and the order changes with the epoch
        assert sorted(int(i) for idx, _ in whole for i in idx) == list(range(n))
    assert not torch.equal(next(single.epoch(0))[0], next(single.epoch(1))[0])


def test_last_partial_batch_and_divisibility():
    b = EpochBatches(45, 20, 1, 0)
    sizes = [len(idx) for idx, _ in b.epoch(0)]
    assert sizes == [20, 20, 5]
    try:
        EpochBatches(45, 15, 2, 0)
    except ValueError as e:
        assert "divisible" in str(e)
    else:
        raise AssertionError("an odd global batch over 2 ranks must be refused")
