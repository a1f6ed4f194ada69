"""The native CPU kernels (``cpu_kernels/*.cpp`` through ``NativeBackend``): values, gradients, special
values, determinism, the narrower instruction sets, and the build (cache, concurrency, fallback).

The library under test is the real one, compiled by the machine's C++ compiler (cached per user,
so later runs only load it).  Accuracy uses the float64-referenced tolerances of
:mod:`tests.ops.lp_accuracy`: the native backend must be within them and no less accurate than the
torch backend; at p = inf its values equal the torch backend's bit for bit.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .lp_accuracy import check_accuracy, interval_outputs, lp_outputs, rel_err, rel_tol

from linf_plugin.ops import BACKEND_ENV, get_backend, lp_dist, resolve_backend
from linf_plugin.ops.native_build import ARCH_ENV, CACHE_ENV, NativeBuildError, compiler, load_library
from linf_plugin.ops.reference import ReferenceBackend

INF = math.inf
PS = (1.0, 2.0, 8.0, 8.5, 100.0, 1000.0, INF)
DTYPES = (torch.float32, torch.float64)
REF = ReferenceBackend()
lp_mod = importlib.import_module("linf_plugin.ops.lp_dist")

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler: the native backend cannot be built")


@pytest.fixture(scope="module")
def native():
    return get_backend("native")


@pytest.fixture(scope="module")
def torch_eager():
    from linf_plugin.ops.torch_backend import TorchBackend

    return TorchBackend(compile=False)


def _xwg(B, N, D, dtype, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:
        x = torch.randint(-2, 3, (B, D), generator=g).to(dtype)
        w = torch.randint(-2, 3, (N, D), generator=g).to(dtype)
    else:
        x = torch.randn(B, D, generator=g, dtype=dtype)
        w = torch.randn(N, D, generator=g, dtype=dtype)
    return x, w, torch.randn(B, N, generator=g, dtype=dtype)


# -- values and gradients against the float64 reference --------------------------------
# D off the vector widths (4, 8 and 16 lanes), N off the neuron tiles (up to 80 columns), B off the row tiles;
# 1s everywhere; one shape large enough for two threads and several tiles.
SHAPES = [(5, 7, 19), (1, 1, 1), (3, 1, 17), (1, 9, 33), (6, 83, 16), (9, 37, 130)]


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_and_gradients_match_the_float64_reference(native, p, dtype):
    for B, N, D in SHAPES:
        x, w, g = _xwg(B, N, D, dtype, seed=B + N + D)
        errors = check_accuracy(lp_outputs, (x, w, g), p, max(B, N, D), "native")
        assert set(errors) == {"y", "grad_x", "grad_w"}
        if math.isinf(p):
            y, aux = native.forward(x, w, p)
            y_ref, aux_ref = REF.forward(x, w, p)
            assert torch.equal(y, y_ref) and torch.equal(aux.long(), aux_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_gradient_alone(native, dtype):
    x, w, g = _xwg(6, 21, 13, dtype, seed=3)
    for p in (INF, 8.0, 2.5):
        for need in (("x",), ("w",)):
            check_accuracy(lambda *a: lp_outputs(*a, need=need), (x, w, g), p, 21, "native")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linf_is_bit_exact_with_the_torch_backend_and_ties_take_the_lowest_index(native, torch_eager, dtype):
    x, w, g = _xwg(13, 70, 37, dtype, seed=5, ties=True)         # small integers: ties everywhere
    y, aux = native.forward(x, w, INF)
    y_t, aux_t = torch_eager.forward(x, w, INF)
    y_r, aux_r = REF.forward(x, w, INF)
    assert torch.equal(y, y_t) and torch.equal(aux.long(), aux_t) and torch.equal(aux.long(), aux_r)
    assert torch.equal(native.forward(x, w, INF, need_aux=False)[0], y)
    for got, want in zip(native.backward(g, x, w, y, aux, INF), REF.backward(g, x, w, y_r, aux_r, INF)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
    # the subgradient of the op's docstring, through autograd
    xs = torch.tensor([[0.0, 2.0, -2.0, 1.0]], dtype=dtype, requires_grad=True)
    ws = torch.zeros(2, 4, dtype=dtype)
    ws[1, 1] = 1.0
    ws.requires_grad_(True)
    lp_dist(xs, ws, backend="native").sum().backward()
    assert xs.grad.tolist() == [[0.0, 1.0, -1.0, 0.0]]
    assert ws.grad.tolist() == [[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]


# -- the interval ----------------------------------------------------------------------------
def _box(B, N, D, dtype, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:
        c = torch.randint(-2, 3, (B, D), generator=g).to(dtype)
        r = torch.randint(0, 2, (B, D), generator=g).to(dtype)
        w = torch.randint(-3, 4, (N, D), generator=g).to(dtype)
    else:
        c = torch.randn(B, D, generator=g, dtype=dtype)
        r = 0.3 * torch.rand(B, D, generator=g, dtype=dtype)
        w = torch.randn(N, D, generator=g, dtype=dtype)
        w[: N // 3] = c[0] + 0.1 * w[: N // 3]        # neurons near (some inside) box 0: the near end is 0 there
    return c - r, c + r, w


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interval_values_and_gradients_match_the_float64_reference(native, torch_eager, p, dtype):
    for B, N, D in SHAPES[:5]:
        lower, upper, w = _box(B, N, D, dtype, seed=B + 2 * N + D)
        check_accuracy(interval_outputs, (lower, upper, w), p, max(B, N, D), "native")
    if math.isinf(p):
        lower, upper, w = _box(9, 70, 37, dtype, seed=3, ties=True)
        lo, hi, aux = native.interval_forward(lower, upper, w, p)
        want = torch_eager.interval_forward(lower, upper, w, p)
        assert torch.equal(lo, want[0]) and torch.equal(hi, want[1]) and torch.equal(aux.long(), want[2])


def test_interval_with_an_unbounded_box_is_the_torch_backends(native, torch_eager):
    lower, upper, w = _box(5, 9, 12, torch.float64, seed=8)
    lower[1, 2], upper[3, 0] = -INF, INF
    for p in (INF, 8.0, 8.5):
        lo, hi, aux = native.interval_forward(lower, upper, w, p)
        want = torch_eager.interval_forward(lower, upper, w, p)
        g = torch.ones_like(lo)
        got_grads = native.interval_backward(g, g, lower, upper, w, lo, hi, aux, p)
        want_grads = torch_eager.interval_backward(g, g, lower, upper, w, *want, p)
        for a, b in zip((lo, hi, *got_grads), (*want[:2], *want_grads)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        assert not torch.isfinite(hi[[1, 3]]).any()


# -- special values ---------------------------------------------------------------------------
@pytest.mark.parametrize("p", (1.0, 2.0, 8.0, 8.5, INF))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inf_and_nan_follow_the_torch_backend(native, torch_eager, p, dtype):
    """The backends take NaN (lp_dist refuses it; the margin pass calls the backend directly) and inf;
    inf - inf is NaN.  Outputs and gradients are NaN exactly where the torch backend's are."""
    x, w, g = _xwg(7, 23, 19, dtype, seed=11)
    x[1, 3], x[2, 5], w[4, 5], x[5, 0], w[6, 18] = INF, INF, INF, math.nan, -INF
    y, aux = native.forward(x, w, p)
    y_t, aux_t = torch_eager.forward(x, w, p)
    assert torch.equal(torch.isnan(y), torch.isnan(y_t)) and torch.isnan(y).any() and torch.isinf(y).any() == \
        torch.isinf(y_t).any()
    ok = torch.isfinite(y_t)
    if math.isinf(p):
        assert torch.equal(y[ok], y_t[ok]) and torch.equal(torch.isinf(y), torch.isinf(y_t))
        if dtype == torch.float64:
            return   # the torch backend's float64 argmax has no index for a NaN maximum; ours points at it
        assert torch.equal(aux.long(), aux_t)
    else:
        torch.testing.assert_close(y[ok], y_t[ok], rtol=10 * rel_tol(dtype, p, 23), atol=0)
    for got, want in zip(native.backward(g, x, w, y, aux, p), torch_eager.backward(g, x, w, y_t, aux_t, p)):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        torch.testing.assert_close(got[~torch.isnan(got)], want[~torch.isnan(want)], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_zero_output_passes_no_gradient(native, dtype):
    x, w, g = _xwg(4, 6, 9, dtype)
    w[2] = x[1]                                   # y[1, 2] == 0, and lo[1, 2] == 0 for a box around x[1]
    only = torch.zeros_like(g)
    only[1, 2] = g[1, 2]
    for p in PS:
        y, aux = native.forward(x, w, p)
        assert y[1, 2] == 0
        gx, gw = native.backward(only, x, w, y, aux, p)
        assert not gx.any() and not gw.any()
        lo, hi, aux = native.interval_forward(x - 0.5, x + 0.5, w, p)
        assert lo[1, 2] == 0
        assert not any(t.any() for t in native.interval_backward(only, None, x - 0.5, x + 0.5, w, lo, hi, aux, p))


@pytest.mark.parametrize("dtype, scales", [(torch.float32, (1e-42, 1e-30, 1e-7, 1e7, 1e30)),
                                           (torch.float64, (1e-310, 1e-200, 1e200))], ids=str)
def test_any_scale_any_p_is_stable_and_accurate(native, dtype, scales):
    """Tiny (even subnormal) and huge data: the p = 8 raw sum's fixup, the normalised path's per-output
    reference fallback, and the p = 1000 normalisation."""
    x0, w0, _ = _xwg(5, 21, 40, torch.float64, seed=2)
    for scale in scales:
        x, w = (x0 * scale).to(dtype), (w0 * scale).to(dtype)
        for p in (2.0, 8.0, 8.5, 100.0, 1000.0):
            y = native.forward(x, w, p)[0]
            want = REF.forward(x.double(), w.double(), p)[0]
            assert torch.isfinite(y).all(), (scale, p)
            # subnormal inputs carry fewer digits; elsewhere the usual tolerance (element-wise: a norm of
            # 1e200s overflows)
            tol = 1e-3 if abs(scale) < torch.finfo(dtype).tiny * 1e3 else 4 * rel_tol(dtype, p, 40)
            err = ((y.double() - want) / want).abs().max().item()
            assert err <= tol, (scale, p, err)


def test_p8_mixes_raw_and_fixed_up_outputs_in_one_tile(native):
    x, w, _ = _xwg(8, 40, 24, torch.float32, seed=4)
    x[::2] *= 1e-6                                 # rows below the raw sum's safe range
    w[::3] *= 1e6                                  # neurons whose raw sum overflows
    y = native.forward(x, w, 8.0)[0]
    assert rel_err(y, REF.forward(x.double(), w.double(), 8.0)[0]) <= rel_tol(torch.float32, 8.0, 40)


def test_mismatched_tensors_are_refused_before_any_pointer_is_read(native):
    x, w, g = _xwg(3, 4, 5, torch.float32)
    with pytest.raises(TypeError, match="needs rows as torch.float64"):
        native.forward(x, w.double(), 8.0)
    with pytest.raises(ValueError, match=r"got rows of shape \(3, 4\), expected \(3, 5\)"):
        native.forward(x[:, :4], w, INF)
    y, aux = native.forward(x, w, INF)
    with pytest.raises(ValueError, match=r"got grad_y of shape \(4, 3\)"):
        native.backward(g.t(), x, w, y, aux, INF)
    with pytest.raises(TypeError, match="needs aux as torch.int32"):
        native.backward(g, x, w, y, aux.long(), INF)
    with pytest.raises(ValueError, match="needs the argmax"):
        native.backward(g, x, w, y, None, INF)
    with pytest.raises(ValueError, match="got upper of shape"):
        native.interval_forward(x, x[:2], w, 8.0)


def test_empty_inputs(native):
    x, w, g = _xwg(3, 4, 5, torch.float32)
    for xx, ww in ((x[:0], w), (x, w[:0])):
        for p in (INF, 8.0):
            y, aux = native.forward(xx, ww, p)
            assert y.shape == (xx.shape[0], ww.shape[0])
            gx, gw = native.backward(g[:xx.shape[0], :ww.shape[0]], xx, ww, y, aux, p)
            assert gx.shape == xx.shape and gw.shape == ww.shape and not gx.any() and not gw.any()
            xg, wg = xx.clone().requires_grad_(), ww.clone().requires_grad_()
            lp_dist(xg, wg, p, backend="native").sum().backward()
            assert torch.equal(xg.grad, torch.zeros_like(xg))


@pytest.mark.parametrize("p", (1.0, 2.0, 8.0, 8.5, 100.0, INF))
def test_gradcheck(p):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: lp_dist(a, b, p, backend="native"), (x, w))


# -- determinism ------------------------------------------------------------------------------
def test_results_are_bit_identical_across_runs_and_thread_counts(native):
    """Every output is a fixed-order reduction whatever the partition: the same bits with 1 and 2 threads,
    under torch.use_deterministic_algorithms (the distance and the interval, forward and backward)."""
    x, w, g = _xwg(37, 50, 40, torch.float32, seed=9)        # 74,000 triples: above the serial threshold
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    results = []
    try:
        torch.use_deterministic_algorithms(True)
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            out = []
            for p in (INF, 8.0, 8.5):
                y, aux = native.forward(x, w, p)
                out += [y, *native.backward(g, x, w, y, aux, p)]
                lo, hi, aux = native.interval_forward(x - 0.1, x + 0.1, w, p)
                out += [lo, hi, *native.interval_backward(g, g.flip(0), x - 0.1, x + 0.1, w, lo, hi, aux, p)]
            results.append(out)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# -- narrower instruction sets ----------------------------------------------------------------
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 targets")
@pytest.mark.parametrize("march, lanes", [("x86-64-v3", 32), ("x86-64", 16)])
def test_avx2_and_sse2_builds_compute_the_same(native, monkeypatch, march, lanes):
    """The build for an older target (the AVX2 and SSE2 code paths: 16 registers, bit-trick log2/exp2)
    meets the same accuracy, and its p = inf values are the AVX-512 build's bits."""
    from linf_plugin.ops.native_backend import NativeBackend

    monkeypatch.setenv(ARCH_ENV, march)
    narrow = NativeBackend(library=load_library(), fallback=native.fallback)
    assert narrow.vector_bytes == lanes
    for dtype in DTYPES:
        x, w, g = _xwg(7, 45, 21, dtype, seed=6)
        for p in (INF, 2.0, 8.0, 8.5, 1000.0):
            y, aux = narrow.forward(x, w, p)
            gx, gw = narrow.backward(g, x, w, y, aux, p)
            y_r, aux_r = REF.forward(x.double(), w.double(), p)
            gx_r, gw_r = REF.backward(g.double(), x.double(), w.double(), y_r, aux_r, p)
            if math.isinf(p):
                assert torch.equal(y, native.forward(x, w, p)[0]) and torch.equal(aux.long(), aux_r)
            for got, want in ((y, y_r), (gx, gx_r), (gw, gw_r)):
                assert rel_err(got, want) <= rel_tol(dtype, p, 45), (dtype, p)
            lower, upper, wb = _box(7, 45, 21, dtype, seed=7)
            lo, hi, aux = narrow.interval_forward(lower, upper, wb, p)
            grads = narrow.interval_backward(g, g, lower, upper, wb, lo, hi, aux, p)
            want = REF.interval_forward(lower.double(), upper.double(), wb.double(), p)
            want_grads = REF.interval_backward(g.double(), g.double(), lower.double(), upper.double(), wb.double(),
                                               *want, p)
            for got, ref in zip((lo, hi, *grads), (*want[:2], *want_grads)):
                assert rel_err(got, ref) <= rel_tol(dtype, p, 45), (dtype, p)


# -- dispatch and the build -------------------------------------------------------------------
def test_auto_picks_native_on_cpu_and_the_environment_forces_either_path(native, monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(None, x) == "native"
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend(None, x) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "native")
    assert resolve_backend(None, x) == "native"
    with pytest.raises(ValueError, match="native backend needs CPU tensors"):
        lp_dist(torch.zeros(2, 3, device="meta"), torch.zeros(4, 3, device="meta"), backend="native")


@pytest.fixture
def fresh_dispatch(monkeypatch, tmp_path):
    """lp_dist's backend registry as in a new process, building into an empty cache folder."""
    monkeypatch.setattr(lp_mod, "_instances", {"reference": ReferenceBackend()})
    monkeypatch.setattr(lp_mod, "_unavailable", {})
    monkeypatch.setattr(lp_mod, "_announced", set())
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    return tmp_path


def _fake_compiler(folder: Path, fail_compile: bool) -> str:
    """A 'compiler' that answers --version and then fails to compile (or, without fail_compile, is missing)."""
    script = folder / "fake-c++"
    script.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                      "echo 'lp_power.cpp:1: error: this compiler is broken' >&2\nexit 1\n")
    script.chmod(0o755)
    return str(script) if fail_compile else str(folder / "missing-c++")


@pytest.mark.parametrize("broken", ["missing compiler", "failing build"])
def test_without_a_working_compiler_cpu_tensors_use_torch_after_one_warning(fresh_dispatch, monkeypatch, caplog,
                                                                            broken):
    monkeypatch.setenv("CXX", _fake_compiler(fresh_dispatch, broken == "failing build"))
    x, w, _ = _xwg(4, 5, 6, torch.float64)
    with caplog.at_level(logging.WARNING, logger="linf_plugin.ops.lp_dist"):
        assert resolve_backend(None, x) == "torch"
        y = lp_dist(x, w, 8.0)
        lp_dist(x, w)
    warnings = [r.getMessage() for r in caplog.records if "native CPU kernels are not available" in r.getMessage()]
    assert len(warnings) == 1
    assert ("could not run" in warnings[0]) if broken == "missing compiler" else ("this compiler is broken" in warnings[0])
    torch.testing.assert_close(y, REF.forward(x, w, 8.0)[0], rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="native CPU kernels are not available"):
        lp_dist(x, w, backend="native")
    with pytest.raises(NativeBuildError):
        load_library()
    assert not list((fresh_dispatch / "cache").glob("*.so"))          # nothing half-built left behind


_BUILD_SCRIPT = """
import importlib.util, logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
spec = importlib.util.spec_from_file_location("native_build", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
lib = module.load_library()
print("LIB", lib._name, lib.lp_vector_bytes())
"""


def test_concurrent_builds_make_one_library(tmp_path):
    """Three processes (no torch: the module loads on its own) start building into one empty cache at
    once: one builds under the lock, the others wait and load its library."""
    import linf_plugin.ops.native_build as nb

    env = dict(os.environ, **{CACHE_ENV: str(tmp_path)})
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, nb.__file__], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outs]
    libs = {line for out, _ in outs for line in out.splitlines() if line.startswith("LIB")}
    assert len(libs) == 1
    assert sum("built the CPU kernels" in err for _, err in outs) == 1
    assert len(list(tmp_path.glob("*.so"))) == 1 and not list(tmp_path.glob(".build-*"))


def test_every_source_and_header_is_in_the_cache_key(tmp_path, monkeypatch):
    """A changed .cpp or .h, or a header added to the folder (a source may include it), names a new library:
    a stale build is never loaded for new code."""
    import linf_plugin.ops.native_build as nb

    folder = tmp_path / "cpu_kernels"
    shutil.copytree(nb.SOURCE_DIR, folder)
    monkeypatch.setattr(nb, "SOURCE_DIR", folder)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    keys = {nb.library_path()}
    files = sorted(folder.glob("*.cpp")) + sorted(folder.glob("*.h"))
    assert {f.name for f in files} >= {"lp_exact.cpp", "lp_power.cpp", "lp_interval.cpp", "simd.h", "tiles.h"}
    for path in files:
        text = path.read_text()
        path.write_text(text + "\n// edited\n")
        keys.add(nb.library_path())
        path.write_text(text)
        assert nb.library_path() in keys
    (folder / "added.h").write_text("#pragma once\n")
    keys.add(nb.library_path())
    assert len(keys) == len(files) + 2
