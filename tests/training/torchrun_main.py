"""``python -m linf_plugin.training`` for one torchrun rank, then a check that the rank leaves nothing running.

After :func:`linf_plugin.training.train` returns, the process group it
created must be gone, and with it gloo's threads: a group that outlives
``destroy_process_group`` keeps them running into interpreter exit, where a
rank now and then aborts after its work is done (``terminate called without
an active exception``) and torchrun fails the whole run.
"""
import gc
import os
import sys
import weakref

import torch.distributed as dist

from linf_plugin.training import trainer
from linf_plugin.training.__main__ import main

groups = []
_init = trainer.init_distributed


def _spy(*args, **kwargs):
    ctx = _init(*args, **kwargs)
    if dist.is_initialized():
        groups.append(weakref.ref(dist.group.WORLD))
    return ctx


trainer.init_distributed = _spy
rc = main(sys.argv[1:])
gc.collect()
assert groups, "train() did not join a process group"
assert groups[0]() is None, "the process group outlived train()"
if os.path.isdir("/proc/self/task"):
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    assert not any("gloo" in n for n in names), f"gloo threads outlived train(): {names}"
print(f"rank {os.environ.get('RANK')}: nothing left running", file=sys.stderr)
sys.exit(rc)
