"""Run linf_plugin's CUDA kernels on the CPU: g++ + cuda_shim.h + ctypes.

``build_library(dir)`` compiles ONE shared library holding every kernel
instance of the catalogue (:mod:`linf_plugin.ops.kernel_specs`): the source
is ``full_source`` of the real ``.cu`` files (the text NVRTC compiles),
included after ``cuda_shim.h``, plus one ``extern "C"`` launcher per template
instance.  :class:`EmulatedLauncher` has the signature of
:class:`linf_plugin.ops.cupy_backend.CupyLauncher`, so
``CupyBackend(launcher=EmulatedLauncher(lib))`` runs the backend's own
orchestration, the real launcher (:class:`EmulatedCupy` stands in for the
``cupy`` module) and the launch grids with CPU tensors.

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
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import numpy
from filelock import FileLock

from linf_plugin.ops.cupy_backend import CupyLauncher
from linf_plugin.ops.kernel_specs import all_module_specs, full_source

__all__ = ["compiler", "harness_source", "build_library", "EmulatedCupy", "EmulatedLauncher", "Launch", "symbol"]

SHIM = Path(__file__).with_name("cuda_shim.h")
CXXFLAGS = ("-std=c++20", "-O0", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
            "-Wno-unused-variable", "-Wno-unused-but-set-variable")


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
    # pytest-xdist workers share the cache directory: the lock makes the second
    # worker wait for the first one's build instead of compiling the same
    # library again (or reading a half-written one).
    with FileLock(str(directory / f"lp_kernels_emu_{digest}.lock")):
        if not lib.exists():
            src = directory / f"lp_kernels_emu_{digest}.{os.getpid()}.cpp"
            src.write_text(source)
            tmp = directory / f"lp_kernels_emu_{digest}.{os.getpid()}.tmp.so"
            proc = subprocess.run([cxx, *CXXFLAGS, f"-I{SHIM.parent}", str(src), "-o", str(tmp)],
                                  capture_output=True, text=True)
            src.unlink()
            if proc.returncode != 0:
                raise RuntimeError(f"g++ failed:\n{proc.stderr[-4000:]}")
            os.replace(tmp, lib)
    return ctypes.CDLL(str(lib))


class _Namespace:
    def __init__(self, **attrs):
        self.__dict__.update(attrs)


class _Context:
    """``with``-able entry on one of the stand-in's stacks (current device, current stream)."""

    def __init__(self, stack: list, value):
        self.stack, self.value = stack, value

    def __enter__(self):
        self.stack.append(self.value)
        return self

    def __exit__(self, *exc):
        assert self.stack.pop() is self.value, "device/stream contexts must nest"


class Launch(NamedTuple):
    """One kernel launch as the stand-in saw it (``args``: as marshalled; arrays share the tensors' memory,
    so what a kernel wrote can be read after the launch)."""

    name: str
    grid: tuple
    block: tuple
    stream: int
    device: object
    args: tuple = ()


class EmulatedCupy:
    """A CPU stand-in for the part of the ``cupy`` module :class:`CupyLauncher` uses.

    ``CupyLauncher(device=EmulatedCupy(lib), current_stream=emu.current_stream)``
    runs the launcher's real code (argument marshalling, device and stream
    contexts, module cache, grid and dtype dispatch) with CPU tensors, and the
    kernels it names run from the g++-built library ``lib``
    (:func:`build_library`).  It is as strict as CuPy and the CUDA ABI, so a
    launcher bug fails here the way it would on a GPU:

    * ``from_dlpack`` is ``numpy.from_dlpack``: like ``cupy.from_dlpack`` it
      goes through ``tensor.__dlpack__``, so a tensor that requires grad
      raises ``BufferError``;
    * ``RawModule`` accepts only a catalogue module's exact source, options
      and name expressions; ``get_function`` only a compiled module's names,
      inside a ``cuda.Device`` context;
    * a launch needs a current device and a current stream (recorded in
      :attr:`calls`), the kernel's block shape, a 3-D grid, and argument
      types matching the kernel's parameters: C-contiguous arrays of the
      module dtype (``int32`` for ``int*``) or the null ``numpy.uint64(0)``,
      ``numpy.int32`` for ``int``, ``numpy.float32``/``float64`` for ``T``
      (a Python float would be marshalled as a double by CuPy).
    """

    def __init__(self, lib: ctypes.CDLL, schedule: str = "shuffled", seed: int = 1):
        self.lib = lib
        self.calls: list = []
        self.compiled: list = []
        self.stream_handle = 0x5151           # what "torch's current stream" is; tests may change it
        self._devices: list = []
        self._streams: list = []
        self._specs = {tuple(s.name_expressions): s for s in all_module_specs()}
        self.configure(schedule, seed)
        stream = _Namespace(from_external=self._from_external)
        self.cuda = _Namespace(runtime=_Namespace(getDeviceCount=lambda: 1), Device=self._device, Stream=stream)

    def configure(self, schedule: str, seed: int = 1) -> None:
        """How a block's threads run: fibers (``ascending``, ``descending``, ``shuffled`` per barrier
        phase) or real ``threads``."""
        self.lib.emu_configure.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
        self.lib.emu_configure(EmulatedLauncher.MODES[schedule], seed)
        self.schedule = schedule

    def current_stream(self, device) -> int:
        """The ``current_stream`` hook for :class:`CupyLauncher`: the pretend torch stream."""
        return self.stream_handle

    # -- the cupy interface ---------------------------------------------------
    def _device(self, index):
        return _Context(self._devices, index)

    def _from_external(self, obj):
        version, handle = obj.__cuda_stream__()
        if version != 0 or not isinstance(handle, int):
            raise TypeError(f"__cuda_stream__ must return (0, int), got {(version, handle)!r}")
        return _Context(self._streams, handle)

    @staticmethod
    def from_dlpack(obj):
        return numpy.from_dlpack(obj)

    def RawModule(self, code, options, name_expressions):  # noqa: N802  (cupy's name)
        spec = self._specs.get(tuple(name_expressions))
        if spec is None:
            raise ValueError(f"no catalogue module has the name expressions {name_expressions}")
        if code != spec.source or tuple(options) != tuple(spec.options):
            raise ValueError(f"module {spec.key}: source or options differ from the catalogue's")
        return _EmulatedModule(self, spec)

    def _launch(self, kernel, grid, block, args):
        if not self._devices or not self._streams:
            raise RuntimeError(f"{kernel.name}: launched outside a device or stream context")
        if len(grid) != 3 or not all(type(g) is int and g >= 1 for g in grid):
            raise ValueError(f"{kernel.name}: grid must be three positive ints, got {grid!r}")
        if tuple(block) != kernel.block:
            raise ValueError(f"{kernel.name}: block {block!r}, the kernel is written for {kernel.block}")
        if len(args) != len(kernel.params):
            raise TypeError(f"{kernel.name}: {len(args)} arguments for {len(kernel.params)} parameters")
        scalar = numpy.float32 if kernel.ctype == "float" else numpy.float64
        cargs = [ctypes.c_uint(g) for g in grid] + [ctypes.c_uint(b) for b in kernel.block]
        for pos, (kind, arg) in enumerate(zip(kernel.params, args)):
            where = f"{kernel.name} argument {pos} ({kind})"
            if kind in ("T*", "int*"):
                if isinstance(arg, numpy.uint64) and int(arg) == 0:
                    cargs.append(ctypes.c_void_p(None))
                    continue
                want = numpy.int32 if kind == "int*" else scalar
                if not isinstance(arg, numpy.ndarray) or arg.dtype != want or not arg.flags.c_contiguous:
                    raise TypeError(f"{where}: want a C-contiguous {numpy.dtype(want)} array, got "
                                    f"{type(arg).__name__} {getattr(arg, 'dtype', '')}")
                cargs.append(ctypes.c_void_p(arg.ctypes.data))
            elif kind == "int":
                if type(arg) is not numpy.int32:
                    raise TypeError(f"{where}: want numpy.int32, got {type(arg).__name__}")
                cargs.append(ctypes.c_int(int(arg)))
            else:
                if type(arg) is not scalar:
                    raise TypeError(f"{where}: want {scalar.__name__}, got {type(arg).__name__}")
                cargs.append(ctypes.c_float(arg) if kernel.ctype == "float" else ctypes.c_double(arg))
        fn = getattr(self.lib, symbol(kernel.name))
        fn.restype = ctypes.c_int
        self.calls.append(Launch(kernel.name, tuple(grid), tuple(block), self._streams[-1], self._devices[-1],
                                 tuple(args)))
        if fn(*cargs) != 0:
            raise AssertionError(f"{kernel.name}: threads of a block passed different numbers of __syncthreads()")


class _EmulatedModule:
    def __init__(self, emu: EmulatedCupy, spec):
        self.emu, self.spec, self.is_compiled = emu, spec, False

    def compile(self):
        if not self.emu._devices:
            raise RuntimeError("RawModule.compile() needs a current device")
        self.is_compiled = True
        self.emu.compiled.append((self.emu._devices[-1], self.spec.key))

    def get_function(self, name):
        kernel = next((k for k in self.spec.kernels.values() if k.name == name), None)
        if kernel is None or not self.is_compiled:
            raise ValueError(f"{name!r} is not a compiled name expression of module {self.spec.key}")
        return lambda grid, block, args: self.emu._launch(kernel, grid, block, args)


class EmulatedLauncher(CupyLauncher):
    """The real :class:`CupyLauncher` over :class:`EmulatedCupy` (same signature, CPU tensors).

    ``calls`` lists ``(kernel name, grid)`` per launch; ``device`` is the stand-in.
    """

    MODES = {"ascending": 0, "descending": 1, "shuffled": 2, "threads": 3}

    def __init__(self, lib: ctypes.CDLL, schedule: str = "shuffled", seed: int = 1):
        self.device = EmulatedCupy(lib, schedule, seed)
        super().__init__(device=self.device, current_stream=self.device.current_stream)

    @property
    def calls(self) -> list:
        return [(c.name, c.grid) for c in self.device.calls]

    def configure(self, schedule: str, seed: int = 1) -> None:
        self.device.configure(schedule, seed)

    def last_launch(self, template: str) -> Launch:
        """The latest launch of kernel template ``template`` (e.g. ``"lp_forward_raw"``), with its arguments."""
        return next(c for c in reversed(self.device.calls) if c.name.split("<")[0] == template)
