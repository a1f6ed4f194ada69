"""Build the CPU kernel library (``cpu_kernels/*.cpp``) at first use and load it with ctypes.

The library is plain C++ (no torch headers), compiled with the system C++
compiler for the machine it runs on (``-march=native``) in about two
seconds per source file, and cached:

* cache folder: ``$LINF_LP_DIST_CACHE``, else ``$XDG_CACHE_HOME/linf_plugin/cpu_kernels``,
  else ``~/.cache/linf_plugin/cpu_kernels`` (a per-user temporary folder when
  that is not writable);
* cache key: a hash of the sources (every ``.cpp`` built and every ``.h`` in
  the folder), the compiler (its path and ``--version``), the flags, the CPU
  (model and feature flags) and the OpenMP runtime, so a new compiler, CPU,
  source or header builds a new library;
* built atomically (objects and library in a private temporary folder, then
  renamed into place) under an exclusive file lock, so processes that build
  at the same time (pytest-xdist workers) wait for one build and reuse it.

Threads: the kernels use OpenMP, linked against the runtime torch has
loaded (found in ``/proc/self/maps``), so they share torch's thread pool
instead of starting a second one; without one the library is built
single-threaded.  ``lp_exact.cpp`` (p = inf) is compiled with
``-ffp-contract=off`` (every value rounds exactly as the torch backend's
do), ``lp_power.cpp`` and ``lp_interval.cpp`` (finite p) with
``-ffp-contract=fast``; none with ``-ffast-math``.

The compiler is ``$CXX`` when set, else the first of ``c++``, ``g++``,
``clang++`` on the ``PATH``.  ``$LINF_LP_DIST_MARCH`` (default ``native``)
is passed as ``-march=``: an older target (``x86-64-v3`` for AVX2,
``x86-64`` for SSE2) builds the narrower code paths, which is how the tests
check them on a machine with AVX-512.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["load_library", "library_path", "cache_dir", "compiler", "openmp_runtime", "NativeBuildError",
           "CACHE_ENV", "ARCH_ENV", "SOURCE_DIR"]

log = logging.getLogger(__name__)
CACHE_ENV = "LINF_LP_DIST_CACHE"
ARCH_ENV = "LINF_LP_DIST_MARCH"
SOURCE_DIR = Path(__file__).resolve().parent / "cpu_kernels"
_SOURCES = {"lp_exact.cpp": ["-ffp-contract=off"], "lp_power.cpp": ["-ffp-contract=fast"],
            "lp_interval.cpp": ["-ffp-contract=fast"]}
_COMMON = ["-O3", "-std=c++17", "-fPIC", "-fno-math-errno", "-Wno-unknown-pragmas"]
_OMP_NAME = re.compile(r"lib(g|i|)omp[\w.+-]*\.(so|dylib)[\d.]*$")


class NativeBuildError(RuntimeError):
    """The CPU kernel library could not be built or loaded (the message says why)."""


def compiler() -> list[str] | None:
    """The C++ compiler command (``$CXX``, split like a shell would, else ``c++``/``g++``/``clang++``), or None."""
    env = os.environ.get("CXX", "").strip()
    if env:
        return shlex.split(env)
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def openmp_runtime() -> str | None:
    """The path of the OpenMP runtime this process has loaded (torch's), or None."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        path = line.split()[-1] if line.strip() else ""
        if path.startswith("/") and _OMP_NAME.search(os.path.basename(path)):
            return path
    return None


def cache_dir() -> Path:
    """The folder the library is built into (created when missing)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        where = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        where = Path(base) / "linf_plugin" / "cpu_kernels"
    try:
        where.mkdir(parents=True, exist_ok=True)
        if os.access(where, os.W_OK):
            return where
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"linf_plugin-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / \
        "cpu_kernels"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(keep)))


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"could not run {cmd[0]!r}: {type(exc).__name__}: {exc}") from exc


def _march() -> str:
    value = os.environ.get(ARCH_ENV, "native").strip() or "native"
    if not re.fullmatch(r"[\w.+-]+", value):
        raise NativeBuildError(f"{ARCH_ENV} must name a -march target (native, x86-64-v3, ...), got {value!r}")
    return value


def _plan():
    """``(cxx, omp, march, key)``; raises NativeBuildError without a compiler."""
    cxx = compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (set CXX, or install g++ or clang++)")
    version = _run(cxx + ["--version"], timeout=60)
    if version.returncode != 0:
        raise NativeBuildError(f"the C++ compiler {' '.join(cxx)!r} does not run: {version.stderr.strip()[-300:]}")
    omp = openmp_runtime()
    march = _march()
    digest = hashlib.sha256()
    # every header in the folder, not a list of them: a header added later is in the key without a second edit
    for name in (*_SOURCES, *sorted(path.name for path in SOURCE_DIR.glob("*.h"))):
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    for part in (" ".join(cxx), version.stdout, repr(_COMMON), repr(_SOURCES), march, _cpu_signature(),
                 platform.machine(), omp or "no openmp"):
        digest.update(part.encode() + b"\0")
    return cxx, omp, march, digest.hexdigest()[:20]


def library_path() -> Path:
    """Where the library for this machine, compiler and source lives (built or not)."""
    key = _plan()[-1]
    return cache_dir() / f"lp_cpu_{key}.so"


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # no POSIX locks: concurrent builds are still safe, only duplicated
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _compile(cxx, omp, target: Path, march: str | None) -> None:
    """Compile every source (in parallel) and link ``target``; raises NativeBuildError with the compiler's words."""
    arch = [f"-march={march}"] if march else []
    openmp = ["-fopenmp"] if omp else []
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as tmp:
        jobs = []
        for name, flags in _SOURCES.items():
            obj = Path(tmp) / (name + ".o")
            cmd = cxx + _COMMON + arch + openmp + flags + ["-c", str(SOURCE_DIR / name), "-o", str(obj)]
            try:
                jobs.append((cmd, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                        text=True)))
            except OSError as exc:
                raise NativeBuildError(f"could not run {cxx[0]!r}: {exc}") from exc
        for cmd, _, proc in jobs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise NativeBuildError(f"compiling {cmd[-3]} failed ({' '.join(cmd)}):\n{err.strip()[-2000:]}")
        out = Path(tmp) / target.name
        link = cxx + ["-shared", "-o", str(out)] + [str(obj) for _, obj, _ in jobs]
        if omp:
            # the runtime torch loaded, by path: the library then shares torch's OpenMP thread pool
            link += [omp, f"-Wl,-rpath,{os.path.dirname(omp)}"]
        done = _run(link)
        if done.returncode != 0:
            raise NativeBuildError(f"linking failed ({' '.join(link)}):\n{done.stderr.strip()[-2000:]}")
        os.replace(out, target)


def load_library() -> ctypes.CDLL:
    """Build (once per cache key) and load the kernel library.

    Returns:
        The loaded ``ctypes.CDLL``.

    Raises:
        NativeBuildError: no compiler, or the build or the load failed.
    """
    cxx, omp, march, key = _plan()
    target = cache_dir() / f"lp_cpu_{key}.so"
    if not target.exists():
        with _locked(target.with_suffix(".lock")):
            if not target.exists():
                start = time.perf_counter()
                try:
                    _compile(cxx, omp, target, march)
                except NativeBuildError as first:
                    if march != "native":
                        raise
                    log.info("lp_dist: building the CPU kernels with -march=native failed, retrying without: %s",
                             str(first).splitlines()[0])
                    _compile(cxx, omp, target, None)
                log.info("lp_dist: built the CPU kernels in %.1f s: %s%s", time.perf_counter() - start, target,
                         "" if omp else " (no OpenMP runtime loaded: single-threaded)")
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        raise NativeBuildError(f"could not load {target}: {exc}") from exc
