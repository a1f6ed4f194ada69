"""Environment report: versions, devices, CuPy / NVRTC, auto_LiRPA and data sets.

``python -m linf_plugin.env`` prints it; ``--short`` prints the version lines
only (the setup script ends with that); ``--json`` prints the dict.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

__all__ = ["environment_report"]


def _cupy_status() -> dict:
    out = {"cupy": None, "nvrtc": None, "nvrtc_compiles": False, "cupy_error": None}
    try:
        import cupy  # noqa: F401

        out["cupy"] = cupy.__version__
    except Exception as exc:  # CuPy is optional; report why it is unusable
        out["cupy_error"] = f"{type(exc).__name__}: {exc}"
        return out
    try:
        from cupy_backends.cuda.libs import nvrtc

        out["nvrtc"] = ".".join(map(str, nvrtc.getVersion()))
        prog = nvrtc.createProgram('extern "C" __global__ void k(float* x) { x[0] = 1.f; }', "probe.cu", [], [])
        nvrtc.compileProgram(prog, ["--gpu-architecture=compute_80"])
        out["nvrtc_compiles"] = True
    except Exception as exc:
        out["cupy_error"] = f"NVRTC: {type(exc).__name__}: {exc}"
    return out


def _datasets() -> dict:
    from .data import DATA_ROOT_ENV, DataNotFoundError, load_dataset

    found = {"digits": "embedded (scikit-learn)"}
    root = os.environ.get(DATA_ROOT_ENV)
    for name in ("mnist", "cifar10"):
        if not root:
            found[name] = f"not configured (set {DATA_ROOT_ENV} or pass --data-root)"
            continue
        try:
            found[name] = f"{len(load_dataset(name, 'test', root=root))} test samples in {root}"
        except (DataNotFoundError, ValueError) as exc:
            found[name] = f"unavailable: {str(exc).splitlines()[0][:160]}"
    return found


def environment_report(datasets: bool = True) -> dict:
    """Collect the report as a JSON-able dict."""
    import torch

    from .lirpa import applied_operator_fixes, compat

    rep = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "cpu_threads": torch.get_num_threads(),
        "auto_LiRPA": compat.auto_lirpa_version(),
        "auto_LiRPA_fixes": compat.applied_fixes(),
        "auto_LiRPA_operator_fixes": applied_operator_fixes(),
    }
    rep.update(_cupy_status())
    if datasets:
        rep["datasets"] = _datasets()
    return rep


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linf_plugin.env", description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="versions only")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    rep = environment_report(datasets=not args.short)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"torch {rep['torch']} (CUDA {rep['torch_cuda']}, available: {rep['cuda_available']}"
          f"{', ' + ', '.join(rep['devices']) if rep['devices'] else ''})")
    print(f"CuPy {rep['cupy'] or 'not importable'}; NVRTC {rep['nvrtc'] or '-'}"
          f" (compiles: {rep['nvrtc_compiles']}){'; ' + rep['cupy_error'] if rep['cupy_error'] else ''}")
    print(f"auto_LiRPA {rep['auto_LiRPA']}; compat fixes applied: {len(rep['auto_LiRPA_fixes'])}"
          + "".join(f"\n  - {f}" for f in rep["auto_LiRPA_fixes"]))
    print(f"auto_LiRPA 0.3 operator fixes applied: {len(rep['auto_LiRPA_operator_fixes'])}"
          + "".join(f"\n  - {f}" for f in rep["auto_LiRPA_operator_fixes"]))
    if not args.short:
        print(f"python {rep['python']} on {rep['platform']}, {rep['cpu_threads']} CPU threads")
        for name, status in rep["datasets"].items():
            print(f"data set {name}: {status}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
