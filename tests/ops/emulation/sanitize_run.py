"""The child process of the sanitizer tests: runs emulated kernels built with a sanitizer.

A library built with ``-fsanitize=thread`` or ``address,undefined``
(:func:`harness.build_library_file`) only runs in a process that loaded the
sanitizer's runtime first, so tests/ops/test_sanitizers.py starts this script
with ``LD_PRELOAD`` set, once per sanitizer, with every case to run:

    python sanitize_run.py CASE=SCENARIO=LIBRARY [...]
    python sanitize_run.py --cuda       # on a GPU, under compute-sanitizer (make gpu-check)

Each case loads its library, runs its scenario through the real
:class:`~linf_plugin.ops.cupy_backend.CupyBackend` and launcher with real
threads (the ``threads`` schedule: 256 OS threads per block, which
ThreadSanitizer watches) and compares every result with the plain reference
backend.  Before and after a case it writes ``@@begin CASE`` and ``@@end
CASE`` to stderr, so the sanitizers' reports (printed as they happen) can be
attributed to it, and one JSON line ``{"case", "scenario", "ok", "errors"}``
to stdout.  The sanitizers are built to recover: every case runs and reports.

Scenarios (:data:`SCENARIOS`): ``families`` (every kernel family of
:data:`MODULES` on shapes with partial tiles), and the planted-bug ones
(``raw_p8``: lp_dist at p = 8, whose raw sum spans 3 D-tiles, ``raw_p8_tiny``
the same at a scale where every block of the raw sum needs the fixup; ``resolve_inf``:
the p = inf argmax with the maximum of every row in the last, partial
D-tile; ``interval_p8``: lp_dist_interval at p = 8 on one partial D-tile).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from linf_plugin.ops.cupy_backend import CupyBackend  # noqa: E402
from linf_plugin.ops.reference import ReferenceBackend  # noqa: E402

__all__ = ["MODULES", "SCENARIOS", "run_scenario", "main"]

REF = ReferenceBackend()
# The catalogue modules the sanitizer builds hold (one build per sanitizer, cached by source hash): every
# kernel family, float with the p-variants whose code differs (the exact chain with the raw sum, the general
# p), and double for the lp family (another tile shape and the fused backward's double layout).
MODULES = (("linf", "float", None), ("lp", "float", 8), ("lp", "float", 0), ("lp", "double", 2),
           ("interval_inf", "float", None), ("interval_lp", "float", 8), ("box_argmax", "float", None))


def _harness():
    spec = importlib.util.spec_from_file_location("lp_emulation_harness", _HERE / "harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _oracles():
    spec = importlib.util.spec_from_file_location("lp_oracles", _HERE.parent / "oracles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEVICE = "cpu"     # "cuda" in the --cuda mode


def _data(B, N, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(B, D, generator=g, dtype=dtype), torch.randn(N, D, generator=g, dtype=dtype)
    gy = torch.randn(B, N, generator=g, dtype=dtype)
    r = torch.rand(B, D, generator=g, dtype=dtype)
    return tuple(t.to(DEVICE) for t in (x, w, gy, x - r, x + r))


def _close(errors, what, got, want, tol):
    if got is None and want is None:
        return
    if not torch.allclose(got, want, rtol=tol, atol=tol, equal_nan=True):
        errors.append(f"{what}: max difference {(got - want).abs().max().item():.3g}")


@contextlib.contextmanager
def _reference_mode():
    """The reference runs with torch's own settings (on CUDA some of its ops have no deterministic version)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _check_pair(backend, errors, p, data, tol, need=(True, True)):
    x, w, gy, lower, upper = data
    y, aux = backend.forward(x, w, p)
    got = backend.backward(gy, x, w, y, aux, p, *need)
    with _reference_mode():
        y_ref, aux_ref = REF.forward(x, w, p)
        want = REF.backward(gy, x, w, y_ref, aux_ref, p, *need)
    _close(errors, f"y p={p}", y, y_ref, tol)
    for name, a, b in zip(("grad_x", "grad_w"), got, want):
        _close(errors, f"{name} p={p} need={need}", a, b, tol)


def _check_interval(backend, errors, p, data, tol):
    x, w, gy, lower, upper = data
    lo, hi, aux = backend.interval_forward(lower, upper, w, p)
    got = backend.interval_backward(gy, 0.5 * gy, lower, upper, w, lo, hi, aux, p)
    with _reference_mode():
        lo_ref, hi_ref, aux_ref = REF.interval_forward(lower, upper, w, p)
        want = REF.interval_backward(gy, 0.5 * gy, lower, upper, w, lo_ref, hi_ref, aux_ref, p)
    _close(errors, f"lo p={p}", lo, lo_ref, tol)
    _close(errors, f"hi p={p}", hi, hi_ref, tol)
    for name, a, b in zip(("grad_lower", "grad_upper", "grad_w"), got, want):
        _close(errors, f"interval {name} p={p}", a, b, tol)


def _families(backend, errors):
    # 70 rows: two 64-row batch blocks (the fused backward's grad_w atomics); 41 features: three D-tiles, the
    # last partial; 37 and 13 neurons: partial tiles.  p = inf on a small batch: its argmax and scatter kernels
    # take a block per 16 outputs, per row and per 32 columns, and every block costs 256 threads here.
    tiled, small = _data(70, 37, 41), _data(9, 13, 37, seed=2)
    _check_pair(backend, errors, math.inf, small, 5e-5)
    for p in (8.0, 8.5):
        _check_pair(backend, errors, p, tiled, 5e-5)
    _raw_p8_tiny(backend, errors)     # every block of the raw sum flags itself: the flag's barrier, the fixup
    _check_pair(backend, errors, 8.5, _data(21, 13, 41, seed=6), 5e-5, need=(True, False))   # single-gradient
    _check_pair(backend, errors, 2.0, _data(21, 9, 19, torch.float64, seed=1), 1e-10)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _check_pair(backend, errors, math.inf, small, 5e-5)
        _check_interval(backend, errors, math.inf, small, 5e-5)
    finally:
        torch.use_deterministic_algorithms(before)
    for p in (math.inf, 8.0):
        _check_interval(backend, errors, p, small, 5e-5)
    x, w, gy, lower, upper = small
    for got, want in zip(backend.linf_box_argmax(lower, upper, w), _oracles().box_argmax_oracle(lower, upper, w)):
        if not torch.equal(got, want):
            errors.append("linf_box_argmax differs")


def _raw_p8(backend, errors):
    _check_pair(backend, errors, 8.0, _data(37, 21, 41, seed=3), 5e-5)


def _raw_p8_tiny(backend, errors):
    # |x - w| ~ 1e-8: (x - w)^8 underflows, so every output of the raw sum is outside its safe range and
    # marks its block for the fixup
    x, w, gy, lower, upper = _data(37, 21, 41, seed=3)
    _check_pair(backend, errors, 8.0, (x * 1e-8, w * 1e-8, gy, lower, upper), 5e-5)


def _resolve_inf(backend, errors):
    x, w, gy, lower, upper = _data(19, 11, 21, seed=4)
    x[:, 18] += 10.0            # every row's maximum in the last, partial D-tile (coordinates 16..20)
    _check_pair(backend, errors, math.inf, (x, w, gy, lower, upper), 5e-5)


def _interval_p8(backend, errors):
    _check_interval(backend, errors, 8.0, _data(9, 13, 13, seed=5), 5e-5)


SCENARIOS = {"families": _families, "raw_p8": _raw_p8, "raw_p8_tiny": _raw_p8_tiny, "resolve_inf": _resolve_inf,
             "interval_p8": _interval_p8}


def run_scenario(lib, scenario: str, schedule: str = "threads", seed: int = 1) -> list:
    """Run ``scenario`` on the loaded library ``lib``; the list of mismatches with the reference (empty: all
    agree, within float32 tolerance)."""
    backend = CupyBackend(launcher=_harness().EmulatedLauncher(lib, schedule, seed=seed))
    errors: list = []
    SCENARIOS[scenario](backend, errors)
    return errors


def run_on_gpu() -> int:
    """``--cuda``: the ``families`` scenario with the real CuPy backend on the GPU (what make gpu-check runs
    under NVIDIA's compute-sanitizer); one JSON line, exit 1 on a mismatch, 2 without a GPU."""
    global DEVICE
    if not torch.cuda.is_available():
        print("sanitize_run.py --cuda needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    DEVICE = "cuda"
    errors: list = []
    _families(CupyBackend(), errors)
    torch.cuda.synchronize()
    print(json.dumps({"case": "gpu", "scenario": "families", "ok": not errors, "errors": errors}), flush=True)
    return 1 if errors else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--cuda"]:
        return run_on_gpu()
    torch.set_num_threads(1)      # the kernels' threads are the emulator's; torch's pool would only add noise
    harness = _harness()
    for arg in argv:
        case, scenario, path = arg.split("=", 2)
        print(f"@@begin {case}", file=sys.stderr, flush=True)
        try:
            errors = run_scenario(harness.load_library(Path(path)), scenario)
        except Exception as exc:  # noqa: BLE001  (reported, and the next case still runs)
            errors = [f"{type(exc).__name__}: {exc}"]
        sys.stderr.flush()
        print(f"@@end {case}", file=sys.stderr, flush=True)
        print(json.dumps({"case": case, "scenario": scenario, "ok": not errors, "errors": errors}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
