"""The real ``CupyLauncher`` on the CPU: autograd, streams, devices, dtypes, module cache, linf_box_argmax.

``CupyLauncher`` takes its device layer as an argument; here it is
``harness.EmulatedCupy``, a stand-in for the ``cupy`` module that consumes
tensors through DLPack exactly as CuPy does (``numpy.from_dlpack`` refuses a
tensor that requires grad, as ``cupy.from_dlpack`` does) and runs the kernels
compiled by g++ from the same ``.cu`` sources.  So the launcher's own code
(argument marshalling, device and stream contexts, grid, dtype dispatch)
runs in the CPU suite; on a GPU the same code runs over the real CuPy.
"""
from __future__ import annotations

import importlib
import math
import warnings

import numpy
import pytest
import torch
from .lp_accuracy import check_accuracy, interval_outputs, lp_outputs
from .oracles import box_argmax_oracle

from linf_plugin.ops import linf_box_argmax, lp_dist, lp_dist_interval, use_backend
from linf_plugin.ops.cupy_backend import CupyBackend, CupyLauncher
from linf_plugin.ops.reference import ReferenceBackend

INF = math.inf
REF = ReferenceBackend()


def test_the_stand_in_refuses_tensors_that_require_grad_as_cupy_does(harness, emulator_lib):
    emu = harness.EmulatedCupy(emulator_lib)
    with pytest.raises(BufferError):
        emu.from_dlpack(torch.randn(3, requires_grad=True))
    assert emu.from_dlpack(torch.randn(3)).shape == (3,)


@pytest.mark.parametrize("p", (INF, 8.0, 8.5))
def test_lp_dist_under_autograd_through_the_launcher(cupy_on_cpu, p):
    """The failure every GPU run hit (BufferError from cp.from_dlpack on a parameter)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 9, generator=g, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(7, 9, generator=g))
    y = lp_dist(x, w, p)
    y.square().sum().backward()
    calls = cupy_on_cpu.launcher.calls
    assert calls and all(name.startswith(("linf_", "lp_")) for name, _ in calls), calls
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    lp_dist(x2, w2, p, backend="reference").square().sum().backward()
    for a, b in ((y, lp_dist(x2, w2, p, backend="reference")), (x.grad, x2.grad), (w.grad, w2.grad)):
        torch.testing.assert_close(a, b, rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("p", (1.0, 8.0, 8.5, 300.0, INF))
def test_the_backward_launches_the_kernels_of_its_plan(cupy_on_cpu, p, dtype):
    """Autograd through lp_dist launches exactly ``kernel_plan``'s backward for the gradients it needs: at finite
    p ONE fused kernel for both (training), the single-gradient kernel for one (x or w alone); the
    gradients match the float64 oracle either way (ragged 70 x 45 x 67: several batch blocks)."""
    from .oracles import lp_grad_oracle

    from linf_plugin.ops.kernel_specs import module_spec

    ctype = "float" if dtype == torch.float32 else "double"
    plan = CupyBackend.kernel_plan(p, ctype)
    g = torch.Generator().manual_seed(2)
    x0, w0 = torch.randn(70, 67, generator=g, dtype=dtype), torch.randn(45, 67, generator=g, dtype=dtype)
    gy = torch.randn(70, 45, generator=g, dtype=dtype)
    launcher = cupy_on_cpu.launcher
    for key, need_x, need_w in (("bwd", True, True), ("bwd_x", True, False), ("bwd_w", False, True)):
        x, w = x0.clone().requires_grad_(need_x), w0.clone().requires_grad_(need_w)
        y = lp_dist(x, w, p)
        start = len(launcher.calls)
        y.backward(gy)
        want = [module_spec(f, ctype, pv).kernels[role].name for f, pv, role in plan[key]]
        assert [name for name, _ in launcher.calls[start:]] == want, key
        if not math.isinf(p):
            ox, ow = lp_grad_oracle(gy, x0, w0, p)
            tol = 10 * torch.finfo(dtype).eps * (p + 70)
            assert (x.grad is not None) == need_x and (w.grad is not None) == need_w
            for got, ref in ((x.grad, ox), (w.grad, ow)):
                if got is not None:
                    assert ((got.double() - ref).norm() / ref.norm()).item() <= tol, key
    if not math.isinf(p):
        precise = ctype == "float" and p > 128
        assert [role for _, _, role in plan["bwd"]] == ["backward_fused" + ("_precise" if precise else "")]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_deterministic_algorithms_use_the_fixed_order_sums_at_p_inf(cupy_on_cpu, dtype):
    """p = inf under torch.use_deterministic_algorithms(True): lp_dist's and lp_dist_interval's gradients come
    from lp_scatter_rows (no atomics), as kernel_plan says, and match the reference."""
    from linf_plugin.ops.kernel_specs import module_spec

    g = torch.Generator().manual_seed(9)
    x0, w0 = torch.randn(37, 45, generator=g, dtype=dtype), torch.randn(50, 45, generator=g, dtype=dtype)
    gy = torch.randn(37, 50, generator=g, dtype=dtype)
    ctype = "float" if dtype == torch.float32 else "double"
    plan = CupyBackend.kernel_plan(INF, ctype, deterministic=True)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = lp_dist(x, w)
        start = len(cupy_on_cpu.launcher.calls)
        y.backward(gy)
        assert [n for n, _ in cupy_on_cpu.launcher.calls[start:]] == \
            [module_spec(f, ctype, pv).kernels[role].name for f, pv, role in plan["bwd"]]
        lower, upper = (x0 - 0.2).requires_grad_(), (x0 + 0.2).requires_grad_()
        w2 = w0.clone().requires_grad_()
        lo, hi = lp_dist_interval(lower, upper, w2)
        start = len(cupy_on_cpu.launcher.calls)
        (lo * gy + 2 * hi * gy).sum().backward()
        assert {n.split("<")[0] for n, _ in cupy_on_cpu.launcher.calls[start:]} == {"lp_scatter_rows"}
    finally:
        torch.use_deterministic_algorithms(before)
    x2, w3 = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    lp_dist(x2, w3, backend="reference").backward(gy)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w3.grad)
    l2, u2, w4 = (x0 - 0.2).requires_grad_(), (x0 + 0.2).requires_grad_(), w0.clone().requires_grad_()
    lo2, hi2 = lp_dist_interval(l2, u2, w4, backend="reference")
    (lo2 * gy + 2 * hi2 * gy).sum().backward()
    for a, b in ((lower.grad, l2.grad), (upper.grad, u2.grad), (w2.grad, w4.grad)):
        torch.testing.assert_close(a, b)


def test_deterministic_algorithms_keep_the_single_gradient_kernels(cupy_on_cpu):
    """Under torch.use_deterministic_algorithms(True) both gradients come from the two atomic-free kernels,
    and twice the same call gives bit-identical gradients."""
    g = torch.Generator().manual_seed(6)
    x0, w0 = torch.randn(70, 67, generator=g), torch.randn(1100, 67, generator=g)   # N = 1100: n split in two
    gy = torch.randn(70, 1100, generator=g)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            start = len(cupy_on_cpu.launcher.calls)
            lp_dist(x, w, 8.0).backward(gy)
            assert [n.split("<")[0] for n, _ in cupy_on_cpu.launcher.calls[start:]] == \
                ["lp_forward_raw", "lp_forward", "lp_backward", "lp_backward"]   # raw sum + its fixup
            grads.append((x.grad, w.grad))
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("p", (INF, 2.0))
def test_interval_under_autograd_through_the_launcher(cupy_on_cpu, p):
    g = torch.Generator().manual_seed(1)
    c, r = torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g)
    lower, upper = (c - r).requires_grad_(), (c + r).requires_grad_()
    w = torch.nn.Parameter(torch.randn(5, 6, generator=g))
    lo, hi = lp_dist_interval(lower, upper, w, p)
    (lo + 2 * hi).sum().backward()
    assert any(name.startswith("interval_") for name, _ in cupy_on_cpu.launcher.calls)
    assert lower.grad is not None and upper.grad is not None and w.grad is not None


def test_every_launch_runs_on_the_current_stream_and_device(emu_backend):
    launcher = emu_backend.launcher
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    launcher.device.stream_handle = 0xAB
    emu_backend.forward(x, w, INF)
    launcher.device.stream_handle = 0xCD
    emu_backend.forward(x, w, 8.0)
    streams = [c.stream for c in launcher.device.calls]
    assert streams[:2] == [0xAB, 0xAB] and set(streams[2:]) == {0xCD}
    assert {c.device for c in launcher.device.calls} == {None}       # CPU tensors: device index None


def test_dtype_dispatch_and_module_cache(emu_backend):
    launcher = emu_backend.launcher
    for dtype in (torch.float32, torch.float64, torch.float32):
        y, _ = emu_backend.forward(torch.randn(3, 4, dtype=dtype), torch.randn(5, 4, dtype=dtype), 8.5)
        assert y.dtype == dtype
    names = [c.name for c in launcher.device.calls]
    assert any("<float," in n for n in names) and any("<double," in n for n in names)
    compiled = launcher.device.compiled
    assert len(compiled) == len(set(compiled)) == 2     # the one-pass lp(pv 0) module per dtype, each compiled once


def test_the_launcher_rejects_bad_calls(emu_backend):
    from linf_plugin.ops.kernel_specs import module_spec

    spec = module_spec("linf", "float")
    kernel = spec.kernels["forward"]
    x, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.empty(3, 5)
    with pytest.raises(TypeError, match="arguments"):
        emu_backend.launcher(spec, kernel, (1, 1, 1), (x, w, y))
    with pytest.raises(TypeError, match="float32"):    # a float64 tensor for a float kernel
        emu_backend.launcher(spec, kernel, (1, 1, 1), (x.double(), w, y, None, 3, 5, 4))
    with pytest.raises(ValueError, match="one device"):
        emu_backend.launcher(spec, kernel, (1, 1, 1), (x, w.to("meta"), y, None, 3, 5, 4))


def test_the_launcher_needs_a_device(harness, emulator_lib):
    emu = harness.EmulatedCupy(emulator_lib)
    emu.cuda.runtime.getDeviceCount = lambda: 0
    with pytest.raises(RuntimeError, match="no CUDA device"):
        CupyLauncher(device=emu)


# -- accuracy against float64, on the CPU (the GPU runs the same checks in test_gpu.py) ----------
@pytest.mark.parametrize("shape", [(17, 23, 1), (37, 70, 41), (9, 33, 300)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", (1.0, 2.0, 8.0, 8.5, 100.0, 1000.0, INF))
def test_cupy_path_is_as_accurate_as_the_torch_path(cupy_on_cpu, shape, p):
    g = torch.Generator().manual_seed(sum(shape))
    B, N, D = shape
    x, w, gy = torch.randn(B, D, generator=g), torch.randn(N, D, generator=g), torch.randn(B, N, generator=g)
    check_accuracy(lp_outputs, (x, w, gy), p, max(shape), candidate="cupy")
    if not math.isinf(p):   # both gradients in float32: the fused kernel, one launch
        assert [n for n, _ in cupy_on_cpu.launcher.calls if n.startswith("lp_backward")] == \
            [n for n, _ in cupy_on_cpu.launcher.calls if n.startswith("lp_backward_fused<float,")] != []


@pytest.mark.parametrize("need", [("x",), ("w",)], ids=lambda n: "grad_" + n[0])
@pytest.mark.parametrize("p", (2.0, 8.0, 8.5, 1000.0))
def test_cupy_single_gradient_is_as_accurate_as_the_torch_path(cupy_on_cpu, p, need):
    """One gradient wanted: the single-gradient kernels (both: the fused kernel, in the test above)."""
    g = torch.Generator().manual_seed(4)
    x, w, gy = torch.randn(70, 67, generator=g), torch.randn(45, 67, generator=g), torch.randn(70, 45, generator=g)
    errors = check_accuracy(lambda *a: lp_outputs(*a, need=need), (x, w, gy), p, 70, candidate="cupy")
    assert set(errors) == {"y", "grad_" + need[0]}
    assert not any(n.startswith("lp_backward_fused") for n, _ in cupy_on_cpu.launcher.calls)


@pytest.mark.parametrize("p", (1.0, 8.0, 1000.0, INF))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_cupy_interval_is_as_accurate_as_the_torch_path(cupy_on_cpu, p, dtype):
    g = torch.Generator().manual_seed(3)
    c, r, w = (torch.randn(30, 41, generator=g, dtype=dtype), torch.rand(30, 41, generator=g, dtype=dtype),
               torch.randn(43, 41, generator=g, dtype=dtype))
    check_accuracy(interval_outputs, (c - r, c + r, w), p, 43, candidate="cupy")


_SCALES = (1e-30, 3e-6, 1.0, 1e6, 1e30)
_REDONE = {2.0: (1e-30, 1e30), 8.0: (1e-30, 3e-6, 1e6, 1e30)}   # float32 (x - w)^p under- or overflows


@pytest.mark.parametrize("scale", _SCALES + ("mixed",))
@pytest.mark.parametrize("p", (2.0, 8.0))
def test_cupy_path_is_accurate_at_any_scale(cupy_on_cpu, p, scale):
    """p = 2 and 8 run the raw sum of (x - w)^p and redo the blocks where it under- or overflows (tiny,
    subnormal-term and huge data; "mixed": the first 64 rows of x and columns of w at scales 1e-30 to
    1e30, the rest ordinary, so three of the 2 x 2 blocks are redone and one is not): every value within
    1e-6 of float64, gradients as accurate as the torch path."""
    g = torch.Generator().manual_seed(8)
    B, N, D = 70, 75, 41
    if scale == "mixed":
        sx, sw = torch.ones(B, dtype=torch.float64), torch.ones(N, dtype=torch.float64)
        sx[:64] = torch.tensor(_SCALES, dtype=torch.float64).repeat(13)[torch.randperm(64, generator=g)]
        sw[:64] = torch.tensor(_SCALES, dtype=torch.float64).repeat(13)[torch.randperm(64, generator=g)]
        redone = [[1, 1], [1, 0]]
    else:
        sx, sw = torch.full((B,), scale, dtype=torch.float64), torch.full((N,), scale, dtype=torch.float64)
        redone = [[int(scale in _REDONE[p])] * 2] * 2
    x = (torch.randn(B, D, generator=g, dtype=torch.float64) * sx[:, None]).float()
    w = (torch.randn(N, D, generator=g, dtype=torch.float64) * sw[:, None]).float()
    gy = torch.randn(B, N, generator=g)
    check_accuracy(lp_outputs, (x, w, gy), p, max(B, N, D), candidate="cupy")
    y, y_ref = lp_dist(x, w, p), lp_dist(x.double(), w.double(), p, backend="torch")
    assert torch.isfinite(y).all() and (y > 0).all()
    assert ((y.double() - y_ref).abs() / y_ref).max().item() <= 1e-6
    assert [n.split("<")[0] for n, _ in cupy_on_cpu.launcher.calls[-2:]] == ["lp_forward_raw", "lp_forward"]
    raw = cupy_on_cpu.launcher.last_launch("lp_forward_raw")
    assert raw.args[3].reshape(raw.grid[1], raw.grid[0]).tolist() == redone


# -- linf_box_argmax: the CuPy kernel against the oracle and the torch path ----------------------
def _box(B, N, D, dtype, seed, ties):
    g = torch.Generator().manual_seed(seed)
    if ties:   # small integers: many exact ties in near and far, boxes of width 0 included
        lower = torch.randint(-2, 3, (B, D), generator=g).to(dtype)
        upper = lower + torch.randint(0, 3, (B, D), generator=g).to(dtype)
        w = torch.randint(-2, 3, (N, D), generator=g).to(dtype)
    else:
        c, r = torch.randn(B, D, generator=g, dtype=dtype), torch.rand(B, D, generator=g, dtype=dtype)
        lower, upper, w = c - r, c + r, torch.randn(N, D, generator=g, dtype=dtype)
    return lower, upper, w


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("ties", (False, True))
@pytest.mark.parametrize("shape", [(5, 7, 9), (3, 4, 1), (1, 1, 2), (70, 37, 40), (6, 3, 17)],
                         ids=lambda s: "x".join(map(str, s)))
def test_box_argmax_kernel_matches_the_oracle_and_the_torch_path(emu_backend, dtype, ties, shape):
    from linf_plugin.ops import get_backend

    lower, upper, w = _box(*shape, dtype, seed=sum(shape), ties=ties)
    got = emu_backend.linf_box_argmax(lower, upper, w)
    torch_path = get_backend("torch").linf_box_argmax(lower, upper, w)
    for k, want, t in zip(got, box_argmax_oracle(lower, upper, w), torch_path):
        assert k.dtype == torch.int64 and k.shape == shape[:2]
        assert torch.equal(k, want) and torch.equal(k, t)


def test_box_argmax_treats_signed_zeros_as_equal(emu_backend):
    # w on a box face: near = max(-0.0, negative, 0) ties +0.0 elsewhere -> the lowest index
    lower = torch.tensor([[1.0, 0.0, 0.0, -1.0]])
    upper = torch.tensor([[2.0, 1.0, 0.0, 1.0]])
    w = torch.tensor([[1.0, 0.5, 0.0, 0.0], [-0.0, 0.5, -0.0, 0.0]])
    for k, want in zip(emu_backend.linf_box_argmax(lower, upper, w), box_argmax_oracle(lower, upper, w)):
        assert torch.equal(k, want)


def test_public_linf_box_argmax_dispatches_to_the_cupy_kernel(cupy_on_cpu):
    lower, upper, w = _box(4, 6, 5, torch.float32, seed=2, ties=True)
    got = linf_box_argmax(lower, upper, w.requires_grad_())
    assert [n for n, _ in cupy_on_cpu.launcher.calls] == ["linf_box_argmax<float, 4, 4>"]
    for k, want in zip(got, box_argmax_oracle(lower, upper, w.detach())):
        assert torch.equal(k, want)
    before = len(cupy_on_cpu.launcher.calls)
    linf_box_argmax(lower, upper, w, backend="torch")                 # an explicit name is obeyed
    assert len(cupy_on_cpu.launcher.calls) == before


def test_use_backend_restores_the_dispatch():
    backend = CupyBackend(launcher=lambda *a: pytest.fail("launched outside the block"))
    with use_backend(backend, "cpu"):
        pass
    x = torch.randn(2, 3)
    torch.testing.assert_close(lp_dist(x, x), REF.forward(x, x, INF)[0])
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        lp_dist(x, x, backend="cupy")
    with pytest.raises(ValueError, match="use_backend needs"):
        with use_backend(object()):
            pass


# -- backend="auto" on the GPU a user has: compute capability and NVRTC -----------------------------------
@pytest.fixture
def stand_in_gpu(harness, emulator_lib, monkeypatch):
    """``make(capability, nvrtc_error=None)``: the process's CuPy backend replaced by one over the emulated device
    layer reporting ``capability`` (as ``cupy.cuda.Device(i).compute_capability`` does: "75", "61") and, with
    ``nvrtc_error``, an NVRTC that does not load; returns a stand-in CUDA tensor (a FakeTensor: no GPU needed,
    ``is_cuda`` true).  The once-per-reason memory of the dispatch starts empty."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dispatch = importlib.import_module("linf_plugin.ops.lp_dist")   # the module (the package exports the function)

    def make(capability, nvrtc_error=None):
        launcher = harness.EmulatedLauncher(emulator_lib, compute_capability=capability, nvrtc_error=nvrtc_error)
        monkeypatch.setitem(dispatch._instances, "cupy", CupyBackend(launcher=launcher))
        monkeypatch.setattr(dispatch, "_announced", set())
        with FakeTensorMode():
            return torch.empty(4, 3, device="cuda")

    return make


def test_auto_runs_the_kernels_on_a_t4(stand_in_gpu):
    """Compute capability 7.5 (T4, RTX 20xx) is supported: auto takes the CUDA kernels, silently."""
    from linf_plugin.ops import resolve_backend

    for capability in ("75", "80", "90", "120"):
        x = stand_in_gpu(capability)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert resolve_backend(None, x) == "cupy" and resolve_backend("cupy", x) == "cupy"


def test_auto_falls_back_below_sm75_and_says_why_once(stand_in_gpu):
    """A Pascal GPU (6.1): auto uses the PyTorch path with ONE warning naming the capability and the minimum;
    an explicit backend='cupy' raises with the same reason."""
    from linf_plugin.ops import resolve_backend

    x = stand_in_gpu("61")
    with pytest.warns(UserWarning, match=r"PyTorch path for cuda:0 .*compute capability 6\.1; .*7\.5 or higher"):
        assert resolve_backend(None, x) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # said once
        assert resolve_backend("auto", x) == "torch"
    with pytest.raises(RuntimeError, match=r"backend='cupy' cannot run on cuda:0: .*compute capability 6\.1"):
        resolve_backend("cupy", x)


def test_auto_falls_back_when_cupy_cannot_compile(stand_in_gpu, monkeypatch):
    """NVRTC missing (CuPy installed without the CUDA runtime wheels), or CuPy itself missing: the PyTorch path,
    with the reason in the warning."""
    from linf_plugin.ops import resolve_backend

    dispatch = importlib.import_module("linf_plugin.ops.lp_dist")
    x = stand_in_gpu("90", nvrtc_error="libnvrtc.so.13: cannot open shared object file")
    with pytest.warns(UserWarning, match="cannot load NVRTC.*libnvrtc.so.13"):
        assert resolve_backend(None, x) == "torch"
    monkeypatch.delitem(dispatch._instances, "cupy")
    monkeypatch.setitem(dispatch._unavailable, "cupy", "the CuPy backend is not available: ImportError: no cupy")
    with pytest.warns(UserWarning, match="ImportError: no cupy"):
        assert resolve_backend(None, x) == "torch"


def test_numpy_is_what_the_stand_in_hands_to_the_kernels(harness, emulator_lib):
    # the marshalled arguments are arrays (from DLPack), not tensors: what CuPy receives
    emu = harness.EmulatedCupy(emulator_lib)
    assert isinstance(emu.from_dlpack(torch.zeros(2, dtype=torch.int32)), numpy.ndarray)
