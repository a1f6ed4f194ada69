"""Sharded certification on a real device: 2 torchrun processes against 1, the same results bit for bit.

    python scripts/sharded_check.py --device cuda --out sharded-cuda.json
    python scripts/sharded_check.py --device cpu  --out sharded-cpu.json

On CUDA the 2 ranks use NCCL when the machine has 2 GPUs (each rank its
own ``cuda:LOCAL_RANK``), and gloo with both ranks on the one GPU
otherwise (NCCL refuses two ranks on one device); the JSON says which.
Certified: margin on an l_inf-dist MLP, IBP, CROWN and alpha-CROWN on a
small digits CNN (seeded untrained weights, the same in every process), 48
points in batches of 8 (6 chunks).  Exit code 1 when a flag or radius of
the 2-process run differs from the 1-process run, or a run fails.

For ``make gpu-check`` (:mod:`scripts.gpu_check`): one step,
``[python, "scripts/sharded_check.py", "--device", "cuda", "--out", OUT/"sharded-cuda.json"]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = (("linf", "margin", 0.0), ("cnn", "ibp", 0.002), ("cnn", "crown", 0.002), ("cnn", "alpha-crown", 0.002))


def _worker(args) -> None:
    """One process (alone or a torchrun rank): certify every job with plain ``certify``; rank 0 writes."""
    import torch

    from linf_plugin import distributed as pg
    from linf_plugin.certification import certify
    from linf_plugin.data import dataset_info, load_dataset
    from linf_plugin.io import atomic_write_json
    from linf_plugin.models import create_model

    torch.set_num_threads(1)
    if pg.launched():
        pg.join_group(args.device)
    info = dataset_info("digits")
    torch.manual_seed(0)
    models = {"linf": create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=3, width=64,
                                   mean=info.mean, std=info.std).eval(),
              "cnn": create_model("cnn_7layer", input_shape=(1, 8, 8), num_classes=10, width=4, linear_size=32,
                                  mean=info.mean, std=info.std).eval()}
    te = load_dataset("digits", "test")
    data = (te.x[:args.points], te.y[:args.points])
    dev = torch.device(args.device)
    out = {"world_size": pg.world_size(), "backend": pg.dist.get_backend() if pg.is_initialized() else None,
           "gpus": torch.cuda.device_count() if dev.type == "cuda" else 0, "jobs": {}}
    for name, method, eps in JOBS:
        model = models[name].to(dev)
        t0 = time.perf_counter()
        res = certify(model, data, eps, method, batch_size=8, alpha_iterations=5, device=args.device)
        wall = time.perf_counter() - t0
        chunks = res.extra.get("chunks", {})
        out["jobs"][f"{name}:{method}"] = {
            "wall_s": wall, "rank_time_s": chunks.get("rank_time"),
            "certified": int(torch.as_tensor(res.certified).sum()),
            "correct_flags": torch.as_tensor(res.correct).tolist(),
            "certified_flags": torch.as_tensor(res.certified).tolist(),
            "radius": None if res.radius is None else [float(r).hex() for r in torch.as_tensor(res.radius)]}
    if pg.is_main():
        atomic_write_json(args.worker_out, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="the JSON report (required)")
    parser.add_argument("--points", type=int, default=48)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.out is None:
        parser.error("--out is required")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    me = [str(Path(__file__).resolve()), "--worker", "--device", args.device, "--points", str(args.points)]
    report = {"device": args.device, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, launch in (("1 process", [sys.executable]),
                              ("2 processes", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc-per-node", "2"])):
            path = Path(tmp) / f"{len(report['runs'])}.json"
            t0 = time.perf_counter()
            proc = subprocess.run(launch + me + ["--worker-out", str(path)], cwd=ROOT, env=env, capture_output=True,
                                  text=True)
            if proc.returncode != 0 or not path.exists():
                report["runs"][label] = {"error": proc.stderr[-4000:], "exit": proc.returncode}
                break
            report["runs"][label] = {**json.loads(path.read_text()), "command_s": time.perf_counter() - t0}
    runs = report["runs"]
    ok = len(runs) == 2 and all("error" not in r for r in runs.values())
    if ok:
        one, two = runs["1 process"]["jobs"], runs["2 processes"]["jobs"]
        report["identical"] = {k: one[k]["certified_flags"] == two[k]["certified_flags"]
                               and one[k]["correct_flags"] == two[k]["correct_flags"]
                               and one[k]["radius"] == two[k]["radius"] for k in one}
        ok = all(report["identical"].values())
        for r in runs.values():
            for j in r["jobs"].values():
                for k in ("correct_flags", "certified_flags", "radius"):
                    j.pop(k)
    report["ok"] = ok
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    two = runs.get("2 processes", {})
    print(f"sharded check on {args.device}: 2 ranks over {two.get('backend')} ({two.get('gpus', 0)} GPU(s)): "
          f"{'identical to 1 process' if ok else 'FAILED'}; see {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
