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
reference results, with real threads interleaving between barriers, blocks
in shuffled order and shared memory poisoned before every block; the same
IEEE roundings as the GPU for +, -, *, /, sqrt and fma (the kernels write
every fused multiply-add explicitly, and NVRTC compiles them with
--fmad=false).  Sanitizer builds (:data:`SANITIZERS`: ThreadSanitizer,
AddressSanitizer with UndefinedBehaviorSanitizer) compile the same source
for a child process that preloads the runtime (tests/ops/test_sanitizers.py).
What it does not: timing, the GPU memory model beyond barriers, blocks
running at the same time, warp behaviour, register/shared-memory limits, and
CUDA's math-library ulps — see cuda_shim.h.
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

__all__ = ["compiler", "harness_source", "build_library", "build_library_file", "load_library", "SANITIZERS",
           "sanitizer_runtime", "EmulatedCupy", "EmulatedLauncher", "Launch", "symbol"]

SHIM = Path(__file__).with_name("cuda_shim.h")
# -ffp-contract=off: no multiply-add is fused unless the source says so, as in the kernels' NVRTC build.
# -fno-gnu-unique: each library keeps its own kernels' static (shared-memory) variables and emulator state;
# with the default STB_GNU_UNIQUE binding, two libraries loaded in one process (the sm_75 build, planted-bug
# builds) would share one definition of every such variable, whatever its size in each.
CXXFLAGS = ("-std=c++20", "-O0", "-pthread", "-shared", "-fPIC", "-ffp-contract=off", "-fno-gnu-unique", "-Wall",
            "-Wno-unknown-pragmas", "-Wno-unused-variable", "-Wno-unused-but-set-variable")
# Sanitizer builds: name -> (compiler flags replacing -O0, the libraries a child process preloads).  The
# address build adds UndefinedBehaviorSanitizer (alignment of the 16-byte vector loads included); its
# child preloads libstdc++ too, or ASan's C++ exception interceptor finds no __cxa_throw when a module
# loaded later throws.  Both recover from errors, so one child reports every case it runs
# (halt_on_error=0 in its options).
SANITIZERS = {
    "thread": (("-O1", "-g1", "-fsanitize=thread"), ("libtsan.so",)),
    "address": (("-O0", "-g1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                 "-fsanitize-recover=all"), ("libasan.so", "libstdc++.so.6")),
}


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


def harness_source(kernels=None, transform=None) -> str:
    """The C++ translation unit: shim, kernel sources, one launcher per instance.

    Args:
        kernels: name expressions to give launchers (default: every catalogue instance).
        transform: ``str -> str`` applied to the kernel sources (the planted-bug tests).
    """
    source = full_source(_all_files())
    if transform is not None:
        source = transform(source)
    lines = ['#include "cuda_shim.h"', source, "// ---- launchers"]
    everything = _all_kernels()
    chosen = everything if kernels is None else {name: everything[name] for name in kernels}
    for name, k in chosen.items():
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
                     f'    return emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), [&] {{ {name}({", ".join(call)}); }}, '
                     f'"{name}");\n'
                     f'}}')
    return "\n".join(lines) + "\n"


def sanitizer_runtime(name: str) -> str | None:
    """``LD_PRELOAD`` for a child running sanitizer ``name``'s builds (a :data:`SANITIZERS` key): the paths of the
    runtime libraries g++ links, space-separated; ``None`` when one is missing."""
    cxx = compiler()
    if cxx is None:
        return None
    paths = []
    for lib in SANITIZERS[name][1]:
        proc = subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True)
        path = proc.stdout.strip()
        if proc.returncode != 0 or not os.path.isabs(path) or not os.path.exists(path):
            return None
        paths.append(os.path.realpath(path))
    return " ".join(paths)


def _flags(arch: int, sanitizer: str | None) -> list:
    flags = [f for f in CXXFLAGS if not (sanitizer and f == "-O0")]
    if sanitizer is not None:
        flags += SANITIZERS[sanitizer][0]
    return flags + [f"-DLP_EMULATED_ARCH={int(arch)}"]


# A kernel is a function template at namespace scope: its __shared__ variables are the static locals
# "kernel<args>(params)::name"; libstdc++'s own static locals (std::...) are not.
_KERNEL_LOCAL = re.compile(r"^([A-Za-z_]\w*(?:<[^()]*>)?)\(.*\)::\w+$")


def _shared_variables(lib: Path) -> list:
    """``[(kernel name, symbol, size)]`` of the kernels' static locals in ``lib`` (nm and c++filt)."""
    proc = subprocess.run(["nm", "-D", "--defined-only", "-S", str(lib)], capture_output=True, text=True, check=True)
    found = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "uVvBbDdGgSs" and parts[3].startswith("_ZZ"):
            found.append((parts[3], int(parts[1], 16)))
    if not found:
        return []
    names = subprocess.run(["c++filt"], input="\n".join(sym for sym, _ in found), capture_output=True, text=True,
                           check=True).stdout.splitlines()
    out = []
    for (sym, size), demangled in zip(found, names):
        m = _KERNEL_LOCAL.match(demangled.strip())
        if m:
            out.append((m.group(1), sym, size))
    return out


def build_library_file(directory: Path, source: str | None = None, *, arch: int = 900,
                       sanitizer: str | None = None) -> Path:
    """Compile ``source`` (default: :func:`harness_source`) into ``directory``, once per source, shim and flags.

    Args:
        arch: the ``__CUDA_ARCH__`` the kernels see (``LP_EMULATED_ARCH``): 900, or 750 for the sm_75 paths.
        sanitizer: a :data:`SANITIZERS` key; such a library runs only in a process that preloads the
            sanitizer's runtime (:func:`sanitizer_runtime`), never in the test process itself.

    Returns:
        The path of the shared library; next to it ``<name>.shared`` lists the kernels' shared variables.

    Raises:
        RuntimeError: no compiler, or the compiler's error output.
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    source = harness_source() if source is None else source
    flags = _flags(arch, sanitizer)
    digest = hashlib.sha256((source + SHIM.read_text() + " ".join(flags)).encode()).hexdigest()[:16]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tag = f"lp_kernels_emu_{sanitizer or 'plain'}_{digest}"
    lib = directory / f"{tag}.so"
    table = directory / f"{tag}.shared"
    # pytest-xdist workers share the cache directory: the lock makes the second
    # worker wait for the first one's build instead of compiling the same
    # library again (or reading a half-written one).
    with FileLock(str(directory / f"{tag}.lock")):
        if not (lib.exists() and table.exists()):
            src = directory / f"{tag}.{os.getpid()}.cpp"
            src.write_text(source)
            tmp = directory / f"{tag}.{os.getpid()}.tmp.so"
            proc = subprocess.run([cxx, *flags, f"-I{SHIM.parent}", str(src), "-o", str(tmp)],
                                  capture_output=True, text=True)
            src.unlink()
            if proc.returncode != 0:
                raise RuntimeError(f"g++ failed:\n{proc.stderr[-4000:]}")
            rows = "".join(f"{k}\t{sym}\t{size}\n" for k, sym, size in _shared_variables(tmp))
            tmp_table = directory / f"{tag}.{os.getpid()}.tmp.shared"
            tmp_table.write_text(rows)
            os.replace(tmp, lib)
            os.replace(tmp_table, table)
    return lib


def load_library(path: Path) -> ctypes.CDLL:
    """Load a library from :func:`build_library_file` and register its kernels' shared variables (poisoned
    before every block, see cuda_shim.h)."""
    path = Path(path)
    lib = ctypes.CDLL(str(path))
    lib.emu_add_shared.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.emu_shared_count.restype = ctypes.c_size_t
    if lib.emu_shared_count():       # loaded before in this process (dlopen returns the same library)
        return lib
    table = path.with_suffix(".shared")
    for line in table.read_text().splitlines():
        kernel, sym, size = line.split("\t")
        lib.emu_add_shared(kernel.encode(), ctypes.addressof(ctypes.c_char.in_dll(lib, sym)), int(size))
    return lib


def build_library(directory: Path, source: str | None = None, *, arch: int = 900) -> ctypes.CDLL:
    """:func:`build_library_file` (no sanitizer) and :func:`load_library`."""
    return load_library(build_library_file(directory, source, arch=arch))


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

    ``compute_capability`` is what ``cuda.Device(i).compute_capability`` reports ("90", "75", "61": the
    launcher's device check reads it) and ``nvrtc_error``, when given, what ``cuda.nvrtc.getVersion()`` raises
    (CuPy installed without NVRTC).
    """

    def __init__(self, lib: ctypes.CDLL, schedule: str = "shuffled", seed: int = 1, compute_capability: str = "90",
                 nvrtc_error: str | None = None):
        self.lib = lib
        self.compute_capability = compute_capability   # as cupy.cuda.Device(i).compute_capability reports it
        self.nvrtc_error = nvrtc_error                  # what cupy.cuda.nvrtc.getVersion() raises, if anything
        self.calls: list = []
        self.compiled: list = []
        self.stream_handle = 0x5151           # what "torch's current stream" is; tests may change it
        self._devices: list = []
        self._streams: list = []
        self._specs = {tuple(s.name_expressions): s for s in all_module_specs()}
        self.configure(schedule, seed)
        stream = _Namespace(from_external=self._from_external)
        self.cuda = _Namespace(runtime=_Namespace(getDeviceCount=lambda: 1), Device=self._device, Stream=stream,
                               nvrtc=_Namespace(getVersion=self._nvrtc_version))

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
        context = _Context(self._devices, index)
        context.compute_capability = self.compute_capability
        return context

    def _nvrtc_version(self):
        if self.nvrtc_error is not None:
            raise RuntimeError(self.nvrtc_error)
        return (13, 0)

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

    def __init__(self, lib: ctypes.CDLL, schedule: str = "shuffled", seed: int = 1, **device):
        self.device = EmulatedCupy(lib, schedule, seed, **device)
        super().__init__(device=self.device, current_stream=self.device.current_stream)

    @property
    def calls(self) -> list:
        return [(c.name, c.grid) for c in self.device.calls]

    def configure(self, schedule: str, seed: int = 1) -> None:
        self.device.configure(schedule, seed)

    def last_launch(self, template: str) -> Launch:
        """The latest launch of kernel template ``template`` (e.g. ``"lp_forward_raw"``), with its arguments."""
        return next(c for c in reversed(self.device.calls) if c.name.split("<")[0] == template)
