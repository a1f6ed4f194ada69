"""lirpa tests work on tiny tensors: one intra-op thread is faster, and immune to
OpenMP spin-waits on a loaded machine (``max(dim)`` on a 60x4x4 tensor took 16 ms
with two threads on a busy 2-core box, 6 us with one)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
