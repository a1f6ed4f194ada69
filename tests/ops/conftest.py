"""Fixtures of the ops tests: the CPU kernel emulator, NVRTC, the backends."""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).parent
_KERNEL_COST = _HERE.parents[1] / "benchmarks" / "kernel_cost.py"


def _load_harness():
    spec = importlib.util.spec_from_file_location("lp_emulation_harness", _HERE / "emulation" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def harness():
    """The emulation harness module (tests/ops/emulation/harness.py)."""
    return _load_harness()


@pytest.fixture(scope="session")
def emulator_lib(harness, request, tmp_path_factory):
    """Every kernel instance compiled for the CPU (skips without g++).

    Built once into pytest's cache directory (a temporary one when the cache
    plugin is off), keyed by a hash of the source, so later runs reuse it.
    """
    if harness.compiler() is None:
        pytest.skip("no C++ compiler: the kernel emulation tests need g++")
    cache = getattr(request.config, "cache", None)
    where = cache.mkdir("lp_kernel_emulation") if cache is not None else tmp_path_factory.mktemp("lp_emu")
    return harness.build_library(where)


@pytest.fixture
def emu_backend(harness, emulator_lib):
    """``CupyBackend`` on the real ``CupyLauncher`` whose device layer is the CPU emulator
    (``harness.EmulatedCupy``, shuffled fiber schedule)."""
    from linf_plugin.ops.cupy_backend import CupyBackend

    return CupyBackend(launcher=harness.EmulatedLauncher(emulator_lib, "shuffled", seed=7))


@pytest.fixture
def cupy_on_cpu(emu_backend):
    """``emu_backend`` serving every ``auto``/``cupy`` call on CPU tensors
    (:func:`linf_plugin.ops.use_backend`): lp_dist, lp_dist_interval and
    linf_box_argmax, inside models too, run the CuPy path with emulated kernels."""
    from linf_plugin.ops import use_backend

    with use_backend(emu_backend, "cpu"):
        yield emu_backend


def _preload_nvrtc() -> None:
    # CuPy finds NVRTC through site.getsitepackages(); a venv that reaches the
    # NVIDIA wheels only through a .pth file on sys.path needs them preloaded.
    for entry in sys.path:
        for lib in sorted(glob.glob(os.path.join(entry, "nvidia", "cu*", "lib", "libnvrtc*.so*"))):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass


@pytest.fixture(scope="session")
def nvrtc():
    """CuPy's NVRTC binding, loadable without a GPU (skips when CuPy or NVRTC is missing)."""
    try:
        from cupy_backends.cuda.libs import nvrtc as module
    except ImportError as exc:
        pytest.skip(f"CuPy is not installed: {exc}")
    try:
        module.getVersion()
    except Exception:  # noqa: BLE001  (library not found by CuPy's loader)
        _preload_nvrtc()
        try:
            module.getVersion()
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"NVRTC is not loadable: {exc}")
    return module


@pytest.fixture(scope="session")
def kc():
    """benchmarks/kernel_cost.py as a module: NVRTC cubins with ptxas reports, nvdisasm, the cost model."""
    spec = importlib.util.spec_from_file_location("kernel_cost", _KERNEL_COST)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def nvrtc_cache(request, tmp_path_factory, nvrtc):
    """Where NVRTC cubins are cached by source, options and architecture (pytest's cache directory, shared
    by the xdist workers; a temporary one when the cache plugin is off)."""
    store = getattr(request.config, "cache", None)
    return Path(store.mkdir("lp_kernel_cost")) if store is not None else tmp_path_factory.mktemp("kernel_cost")
