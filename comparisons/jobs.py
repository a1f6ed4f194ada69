"""The long steps of ``python -m comparisons run``, saved chunk by chunk and shared out over ``torchrun`` ranks.

Certification (one ``certify`` per ε), the per-point radius bisection and
PGD run through :func:`linf_plugin.certification.distributed.run_chunks`:
each rank takes its share of the batches, rank 0 saves every finished
batch at once under the run folder, and a run stopped by Ctrl-C, SIGTERM
or a dead rank continues with ``--resume`` without computing a saved batch
again.  The run folder then holds

* ``chunks/run.json``: the run's settings that decide its results (suite,
  models, methods, ε grid, subsets, batch size, attack, seed, ...); a
  resume with other settings is refused, naming them;
* ``chunks/<model>/<step>/eps-<k>/``: one job folder per step and ε
  (:class:`~linf_plugin.certification.chunks.ChunkStore`, which also checks
  the model's and the data's hashes).

Times recorded are the sums of the chunks' compute times: the cost of the
step in one process, whatever the number of ranks and sessions.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from linf_plugin import distributed as pg
from linf_plugin.attacks import pgd_attack
from linf_plugin.certification import bisect_radius, certify
from linf_plugin.certification.chunks import ChunkStore, ResumeError, describe_job, job_differences
from linf_plugin.certification.distributed import (RankRaised, agree, effective_batch_size, reusing_certifiers,
                                                   run_chunks)
from linf_plugin.io import atomic_write_json

__all__ = ["Saving", "check_run_state", "pgd_accuracy", "certify_at", "bisect_radii", "is_fatal", "resume_command",
           "RUN_STATE"]

RUN_STATE = "run.json"


@dataclass(frozen=True)
class Saving:
    """Where a step's chunks go (None: nowhere) and whether a stopped run is being resumed."""

    root: Optional[Path] = None
    resume: bool = False
    progress: bool = False

    def sub(self, *parts: str) -> "Saving":
        return Saving(None if self.root is None else self.root.joinpath(*parts), self.resume, self.progress)

    def store(self, job: dict, n: int, chunk_points: int) -> Optional[ChunkStore]:
        """The step's store on rank 0 (the only writer), else None."""
        if self.root is None or not pg.is_main():
            return None
        return ChunkStore(self.root, job, n, chunk_points, resume=self.resume)


def is_fatal(exc: BaseException) -> bool:
    """Errors that stop the whole run instead of being recorded: a refused resume, a dead or hung rank."""
    return isinstance(exc, ResumeError) or (isinstance(exc, pg.RankFailure) and not isinstance(exc, RankRaised))


def check_run_state(chunks_dir: Path, settings: dict, resume: bool) -> None:
    """Refuse to overwrite or to resume with other settings; record the settings of a new run.

    Args:
        chunks_dir: the run folder's ``chunks`` folder.
        settings: the JSON-able settings that decide the results.
        resume: ``--resume`` was given.

    Raises:
        ResumeError: the folder holds a run and ``resume`` is False, or it
            holds a run with other settings (named); on every rank.
    """
    error = None
    if pg.is_main():
        path = Path(chunks_dir) / RUN_STATE
        if path.exists():
            saved = json.loads(path.read_text())
            if not resume:
                error = (f"{chunks_dir.parent} holds the saved results of an earlier run: add --resume to continue "
                         "it, or choose another --out (or delete the folder) to start over")
            else:
                diff = job_differences(saved, settings)
                if diff:
                    error = (f"cannot resume the run in {chunks_dir.parent}: it was started with another "
                             + "; ".join(diff) + "; rerun with its settings or choose another --out")
        else:
            atomic_write_json(path, settings)
    error = pg.broadcast_object(error, what="checking the run folder")
    if error:
        raise ResumeError(error)


def certify_at(model, data, eps: float, method: str, *, saving: Saving, batch_size: int, device,
               alpha_iterations: int):
    """``certify`` at one ε, saved in ``saving``; returns ``(result, seconds)`` (the chunks' compute time)."""
    res = certify(model, data, eps, method, batch_size=batch_size, device=device, alpha_iterations=alpha_iterations,
                  chunk_dir=saving.root, resume=saving.resume, progress=saving.progress)
    seconds = float(res.extra["chunks"]["compute_time"]) if "chunks" in res.extra else res.wall_time
    return res, seconds


def bisect_radii(model, data, method: str, eps_max: float, *, saving: Saving, batch_size: int, device,
                 alpha_iterations: int, bisect_steps: int) -> Tuple[torch.Tensor, dict, float]:
    """Per-point bisected radii on ``[0, eps_max]`` (:func:`~linf_plugin.certification.bisect_radius`) in chunks.

    Returns:
        ``(radius, extra, seconds)``: ``(n,)`` float64 radii, the first chunk's ``extra`` with
        ``float_rigorous`` over all chunks and the chunks' summary, the chunks' compute time.
    """
    x, y, data_range = data.x, data.y, tuple(data.data_range)
    dtype = next(iter(model.parameters())).dtype
    b = effective_batch_size(method, model, x[:1].to(device, dtype), batch_size)
    job = describe_job("bisect", model, x, y, device, method=method, eps_max=float(eps_max), steps=int(bisect_steps),
                       batch_size=b, alpha_iterations=int(alpha_iterations), data_range=list(data_range))
    agree(job, f"bisect {method}")

    def compute(start, stop, bsz):
        res = bisect_radius(model, (x[start:stop], y[start:stop]), method, eps_max, int(bisect_steps),
                            data_range=data_range, batch_size=bsz, device=device, alpha_iterations=alpha_iterations)
        return {"radius": torch.as_tensor(res.radius, dtype=torch.float64)}, {
            "extra": {**res.extra, "float_rigorous": bool(res.float_rigorous)}}

    with reusing_certifiers():
        run = run_chunks(compute, x.shape[0], b, store=saving.store(job, x.shape[0], b), progress=saving.progress,
                         desc=f"bisect {method}", what=f"bisect {method}")
    extra = dict(run.metas[0]["extra"])
    extra["float_rigorous"] = all(m["extra"].get("float_rigorous", False) for m in run.metas)
    extra["chunks"] = run.summary()
    return run.values["radius"], extra, float(extra["chunks"]["compute_time"])


def pgd_accuracy(model, x, y, eps: float, *, saving: Saving, steps: int, restarts: int, batch_size: int, data_range,
                 seed: int, device) -> Tuple[torch.Tensor, float, list]:
    """PGD at ``eps`` in chunks of ``batch_size`` points.

    Returns:
        ``(broken, seconds, oom_retries)``: ``broken`` is the ``(n,)`` bool mask of the points the attack
        broke (the accuracy is the share not broken; the mask also serves the check that PGD breaks no
        certified point).

    Each batch draws its random starts from a generator seeded with
    ``(seed, first point of the batch)``, so a point's attack does not
    depend on the number of ranks or on what ran before it.
    """
    job = describe_job("pgd", model, x, y, device, eps=float(eps), steps=int(steps), restarts=int(restarts),
                       seed=int(seed), batch_size=int(batch_size), data_range=[float(v) for v in data_range])
    agree(job, "PGD")

    def compute(start, stop, bsz):
        broken = []
        for s in range(start, stop, bsz):
            gen = torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + s)
            xb, yb = x[s:min(stop, s + bsz)].to(device), y[s:min(stop, s + bsz)].to(device)
            res = pgd_attack(model, xb, yb, eps, steps=steps, restarts=restarts, data_range=tuple(data_range),
                             generator=gen)
            broken.append(res.success.cpu())
        return {"broken": torch.cat(broken)}, {}

    run = run_chunks(compute, x.shape[0], int(batch_size), store=saving.store(job, x.shape[0], int(batch_size)),
                     progress=saving.progress, desc=f"PGD eps={eps:g}", what=f"PGD eps={eps:g}")
    broken = run.values["broken"]
    summary = run.summary()
    return broken, float(summary["compute_time"]), summary["oom_retries"]


def resume_command(argv: List[str]) -> str:
    """The command that resumes this run: the same arguments plus ``--resume`` (under torchrun: its launch line)."""
    args = list(argv) + ([] if "--resume" in argv else ["--resume"])
    if pg.launched():
        nodes = "" if os.environ.get("GROUP_WORLD_SIZE", "1") == "1" else " <your --nnodes/--rdzv flags>"
        head = f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', '?')}{nodes} -m comparisons"
    else:
        head = f"{Path(sys.executable).name} -m comparisons"
    return head + " " + " ".join(shlex.quote(a) for a in args)
