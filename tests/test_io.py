"""Atomic writes: the file appears whole, with the permissions a plain open() would give it."""
from __future__ import annotations

import os
import stat

import torch

from linf_plugin.io import atomic_torch_save, atomic_write_json, atomic_write_text


def test_atomic_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        paths = [atomic_write_text(tmp_path / "a.md", "x"), atomic_write_json(tmp_path / "b.json", {"a": 1}),
                 atomic_torch_save({"t": torch.zeros(1)}, tmp_path / "c.pt")]
        with open(tmp_path / "plain", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    plain = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    assert plain == 0o644
    for p in paths:
        assert stat.S_IMODE(os.stat(p).st_mode) == plain, p
    assert sorted(os.listdir(tmp_path)) == ["a.md", "b.json", "c.pt", "plain"]  # no temporary left
