"""One torchrun rank (or the only process) of the sharded-certification tests.

    python dist_worker.py --out results.pt --model relu=relu.pt --job relu:crown:0.05 \
        [--points N] [--batch-size B] [--chunk-dir DIR] [--resume] [--pids DIR]

Loads the checkpoints, certifies each ``MODEL:METHOD:EPS`` job with plain
``certify`` (which shards by itself under torchrun), and on rank 0 saves
every result's per-point tensors and ``extra``.  With ``--chunk-dir`` job k
saves its chunks in ``DIR/k``.  ``--pids`` makes each rank write its pid to
``DIR/rank<r>`` first (the kill tests signal one rank).  SIGTERM or Ctrl-C:
the message of :class:`~linf_plugin.certification.distributed.Interrupted`
on stderr and its exit code.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

from linf_plugin.certification import certify
from linf_plugin.certification.distributed import Interrupted
from linf_plugin.data import load_dataset
from linf_plugin.models import load_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", action="append", default=[])
    p.add_argument("--job", action="append", default=[])
    p.add_argument("--points", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--alpha-iterations", type=int, default=3)
    p.add_argument("--chunk-dir", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--pids", default=None)
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    if args.pids:
        Path(args.pids).mkdir(parents=True, exist_ok=True)
        (Path(args.pids) / f"rank{rank}").write_text(str(os.getpid()))
    torch.set_num_threads(1)
    models = {k: load_checkpoint(v).model.eval() for k, v in (m.split("=", 1) for m in args.model)}
    data = load_dataset("digits", "test").subset(args.points)
    out = {}
    try:
        for k, job in enumerate(args.job):
            name, method, eps = job.split(":")
            res = certify(models[name], data, float(eps), method, batch_size=args.batch_size,
                          alpha_iterations=args.alpha_iterations, resume=args.resume,
                          chunk_dir=None if args.chunk_dir is None else Path(args.chunk_dir) / str(k))
            out[job] = {"correct": torch.as_tensor(res.correct), "certified": torch.as_tensor(res.certified),
                        "radius": None if res.radius is None else torch.as_tensor(res.radius), "extra": res.extra,
                        "float_rigorous": res.float_rigorous}
    except Interrupted as exc:
        print(f"rank {rank}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    if rank == 0:
        torch.save(out, args.out)
    print(f"rank {rank}: done", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
