"""Run linf_plugin's CUDA kernels on the CPU: g++ + cuda_shim.h + ctypes.

``build_library(dir)`` compiles ONE shared library holding every kernel
instance of the catalogue (:mod:`linf_plugin.ops.kernel_specs`): the source
is ``full_source`` of the real ``.cu`` files (the text NVRTC compiles),
included after ``cuda_shim.h``, plus one ``extern "C"`` launcher per template
instance.  :class:`EmulatedLauncher` has the signature of
:class:`linf_plugin.ops.cupy_backend.CupyLauncher`, so
``CupyBackend(launcher=EmulatedLauncher(lib))`` runs the backend's own
orchestration and launch grids with CPU tensors.

What this proves: the kernels' index arithmetic, tiling, bounds handling,
barriers (placement and that all threads reach them), the resolve and
scatter logic, and the backend's buffers and launch shapes produce the
reference results, with real threads interleaving between barriers.  What it
does not: timing, the GPU memory model and races beyond what barriers order,
warp behaviour, register/shared-memory limits, and CUDA's own floating-point
details (FMA contraction, math-library ulps) — see cuda_shim.h.
"""
from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import torch

from linf_plugin.ops.kernel_specs import all_module_specs, full_source

__all__ = ["compiler", "harness_source", "build_library", "EmulatedLauncher", "symbol"]

SHIM = Path(__file__).with_name("cuda_shim.h")
CXXFLAGS = ("-std=c++20", "-O0", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
            "-Wno-unused-variable", "-Wno-unused-but-set-variable")
_TORCH_DTYPES = {"float": torch.float32, "double": torch.float64}


def compiler() -> str | None:
    """Path of g++ (or ``$CXX``-free fallback ``c++``), or ``None``."""
    return shutil.which("g++") or shutil.which("c++")


def symbol(kernel_name: str) -> str:
    return "emu_" + re.sub(r"\W+", "_", kernel_name).strip("_")


def _all_kernels() -> dict:
    return {k.name: k for spec in all_module_specs() for k in spec.kernels.values()}


def _all_files() -> list:
    files = []
    for spec in all_module_specs():
        files.extend(f for f in spec.files if f not in files)
    return files


def harness_source() -> str:
    """The C++ translation unit: shim, kernel sources, one launcher per instance."""
    lines = ['#include "cuda_shim.h"', full_source(_all_files()), "// ---- launchers"]
    for name, k in _all_kernels().items():
        params, call = [], []
        for i, kind in enumerate(k.params):
            if kind == "T*":
                params.append(f"void* a{i}")
                call.append(f"static_cast<{k.ctype}*>(a{i})")
            elif kind == "int*":
                params.append(f"void* a{i}")
                call.append(f"static_cast<int*>(a{i})")
            elif kind == "int":
                params.append(f"int a{i}")
                call.append(f"a{i}")
            else:
                params.append(f"{k.ctype} a{i}")
                call.append(f"a{i}")
        lines.append(f'extern "C" int {symbol(name)}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
                     f'unsigned bz, {", ".join(params)}) {{\n'
                     f'    return emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), [&] {{ {name}({", ".join(call)}); }});\n'
                     f'}}')
    return "\n".join(lines) + "\n"


def build_library(directory: Path, source: str | None = None) -> ctypes.CDLL:
    """Compile ``source`` (default: :func:`harness_source`) into ``directory`` and load it.

    Raises:
        RuntimeError: no compiler, or the compiler's error output.
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    source = harness_source() if source is None else source
    digest = hashlib.sha256((source + SHIM.read_text() + " ".join(CXXFLAGS)).encode()).hexdigest()[:16]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lib = directory / f"lp_kernels_emu_{digest}.so"
    if not lib.exists():
        src = directory / f"lp_kernels_emu_{digest}.cpp"
        src.write_text(source)
        tmp = lib.with_suffix(".tmp.so")
        proc = subprocess.run([cxx, *CXXFLAGS, f"-I{SHIM.parent}", str(src), "-o", str(tmp)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"g++ failed:\n{proc.stderr[-4000:]}")
        tmp.rename(lib)
    return ctypes.CDLL(str(lib))


class EmulatedLauncher:
    """``launcher(module_spec, kernel_spec, grid, args)`` running on the CPU emulator.

    Checks every argument against the kernel's declared parameter kinds
    (dtype, contiguity, CPU) before the call, and fails on barrier divergence.
    """

    MODES = {"ascending": 0, "descending": 1, "shuffled": 2, "threads": 3}

    def __init__(self, lib: ctypes.CDLL, schedule: str = "shuffled", seed: int = 1):
        self.lib = lib
        self.calls: list = []
        self.configure(schedule, seed)

    def configure(self, schedule: str, seed: int = 1) -> None:
        """Select how a block's threads run: fibers (``ascending``, ``descending``,
        ``shuffled`` per barrier phase) or real ``threads``."""
        self.lib.emu_configure.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
        self.lib.emu_configure(self.MODES[schedule], seed)
        self.schedule = schedule

    def __call__(self, spec, kernel, grid, args):
        if len(args) != len(kernel.params):
            raise TypeError(f"{kernel.name}: {len(args)} arguments for {len(kernel.params)} parameters")
        fn = getattr(self.lib, symbol(kernel.name))
        fn.restype = ctypes.c_int
        cargs = [ctypes.c_uint(int(g)) for g in grid] + [ctypes.c_uint(b) for b in kernel.block]
        keep = []
        for pos, (kind, arg) in enumerate(zip(kernel.params, args)):
            if kind in ("T*", "int*"):
                if arg is None:
                    cargs.append(ctypes.c_void_p(None))
                    continue
                want = torch.int32 if kind == "int*" else _TORCH_DTYPES[kernel.ctype]
                if not isinstance(arg, torch.Tensor) or arg.dtype != want or arg.device.type != "cpu" \
                        or not arg.is_contiguous():
                    raise TypeError(f"{kernel.name} argument {pos}: want a contiguous CPU {want} tensor, got "
                                    f"{getattr(arg, 'dtype', type(arg))}")
                keep.append(arg)
                cargs.append(ctypes.c_void_p(arg.data_ptr()))
            elif kind == "int":
                cargs.append(ctypes.c_int(int(arg)))
            else:
                cargs.append(ctypes.c_float(arg) if kernel.ctype == "float" else ctypes.c_double(arg))
        self.calls.append((kernel.name, tuple(int(g) for g in grid)))
        if fn(*cargs) != 0:
            raise AssertionError(f"{kernel.name}: threads of a block passed different numbers of __syncthreads()")
