"""The CuPy backend: the CUDA kernels of ``kernels/*.cu`` behind the backend protocol.

CuPy is imported lazily (it is optional; ``import linf_plugin`` never
imports it).  Kernels are compiled with NVRTC through
``cupy.RawModule(code=..., options=..., name_expressions=...)`` once per
(device, family, dtype, p-variant) and kept in a dict (CuPy also caches the
binaries on disk).  Tensors reach the kernels through DLPack
(``cupy.from_dlpack(t.detach())``: no copies, whatever the requires-grad
state), and every kernel is launched on torch's current stream (CuPy's
``Stream.from_external``), so nothing here synchronises with the host.

The orchestration (which kernels, in which order, on which buffers) is
plain torch code around a *launcher*; :class:`CupyLauncher` marshals the
arguments and launches through a *device layer*, the real CuPy by default.
The test suite runs the same :class:`CupyLauncher` over a CPU stand-in for
CuPy whose kernels are the same ``.cu`` sources compiled by g++
(tests/ops/emulation), so everything in this file is tested without a GPU.

p = inf: the forward saves the int32 argmax (ties: lowest index) only when a
backward will follow; the backward is a sparse atomicAdd scatter, or, under
``torch.use_deterministic_algorithms(True)``, sums in a fixed order
(``lp_scatter_rows``: bit-identical from run to run).  Finite
p: one kernel, one pass over x and w, normalised by the running maximum
(exact chains for p = 1, 2, 8; hardware log2 and a split hardware /
polynomial exp2 for other p in float32).  The kernels' maxima keep NaN, so
a NaN in x or w gives NaN outputs with no extra pass.  p = 2 and 8 first
run the raw sum of (x - w)^p (no maximum, no scaling; lp_forward.cu derives
its safe range) and then the normalising kernel as a fixup over the same
grid, which returns at once in the blocks whose outputs were all safe: an
int32 flag per block, from torch's caching allocator, carries that between
the two launches on the stream, so nothing waits for the host.

Finite-p backward: when both gradients are wanted (training), one fused
kernel raises each (b, n, i) term to its power once and adds it to both
sums (grad_w through a shared-memory reduction and atomics); one gradient
alone, or both under deterministic algorithms, uses the single-gradient
kernels (no atomics).  So every backward is deterministic in that mode.
"""
from __future__ import annotations

import math

import torch

from .kernel_specs import FAST_GRAD_MAX_P, RAW_P_VARIANTS, fused_n_splits, grid_for, module_spec
from .torch_kernels import p_variant

__all__ = ["CupyBackend", "CupyLauncher", "MIN_COMPUTE_CAPABILITY"]

_CTYPES = {torch.float32: "float", torch.float64: "double"}
_INT_MAX = 2 ** 31 - 1
# The oldest GPUs the kernels support (sm_75: T4, RTX 20xx), the oldest CUDA 13 and CuPy 14 build for;
# tests/ops/test_nvrtc.py compiles every kernel for sm_75 and each later generation.
MIN_COMPUTE_CAPABILITY = (7, 5)


def _torch_current_stream(device: torch.device) -> int:
    """The raw ``cudaStream_t`` of torch's current stream on ``device``."""
    return torch.cuda.current_stream(device).cuda_stream


class _StreamHandle:
    """A raw stream handle behind the CUDA stream protocol (``__cuda_stream__``)."""

    __slots__ = ("handle",)

    def __init__(self, handle: int):
        self.handle = int(handle)

    def __cuda_stream__(self):
        return (0, self.handle)


class CupyLauncher:
    """Launch catalogue kernels with CuPy on torch's current stream.

    ``launcher(module_spec, kernel_spec, grid, args)``: ``args`` follow
    ``kernel_spec.params`` (tensors for ``T*``/``int*``, ``None`` for a null
    pointer, Python numbers for ``int``/``T``); every tensor must live on the
    same device.  Tensors are handed over as ``device.from_dlpack(t.detach())``:
    DLPack refuses tensors that require grad, and the kernels only read and
    write storage, so what autograd records is irrelevant here (the
    ``torch.autograd.Function`` around the backend owns the graph).

    Args:
        device: the device layer, a module-like object with CuPy's interface
            (``cuda.runtime.getDeviceCount``, ``cuda.Device``,
            ``cuda.Stream.from_external`` or ``cuda.ExternalStream``,
            ``from_dlpack``, ``RawModule``); default the real ``cupy``.  The
            test suite passes a CPU stand-in that runs the kernels compiled
            by g++ (tests/ops/emulation/device.py), so this class's own code
            runs in the CPU suite.
        current_stream: ``torch.device -> int``, the raw stream handle to
            launch on; default torch's current CUDA stream.

    Raises:
        ImportError: CuPy is not installed (default device layer).
        RuntimeError: the device layer sees no device.
    """

    def __init__(self, device=None, current_stream=None):
        import numpy

        if device is None:
            import cupy as device  # noqa: PLC0415  (optional dependency, imported on first use)
        try:
            count = device.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001  (CUDA driver missing or broken)
            raise RuntimeError(f"CuPy cannot reach a CUDA device: {exc}") from exc
        if count < 1:
            raise RuntimeError("CuPy sees no CUDA device")
        self._cp, self._np = device, numpy
        self._current_stream = current_stream if current_stream is not None else _torch_current_stream
        self._modules: dict = {}

    def unsupported(self, device_index: int) -> str | None:
        """Why the kernels cannot run on CUDA device ``device_index``, or ``None`` when they can.

        Checks the device's compute capability (at least :data:`MIN_COMPUTE_CAPABILITY`) and that
        CuPy can load NVRTC, which compiles the kernels on first use.  Remembered per device.
        """
        cache = self.__dict__.setdefault("_unsupported", {})
        if device_index not in cache:
            cache[device_index] = self._check_device(device_index)
        return cache[device_index]

    def _check_device(self, device_index: int) -> str | None:
        cuda = self._cp.cuda
        try:
            cc = str(cuda.Device(device_index).compute_capability)     # "75", "90", "100"
            capability = (int(cc[:-1]), int(cc[-1]))
        except Exception as exc:  # noqa: BLE001  (driver errors of any kind)
            return f"CuPy cannot read the compute capability of CUDA device {device_index} ({type(exc).__name__}: {exc})"
        if capability < MIN_COMPUTE_CAPABILITY:
            return (f"CUDA device {device_index} has compute capability {capability[0]}.{capability[1]}; the CUDA "
                    f"kernels need {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or higher")
        try:
            cuda.nvrtc.getVersion()
        except Exception as exc:  # noqa: BLE001  (library missing or broken)
            return (f"CuPy cannot load NVRTC, which compiles the CUDA kernels ({type(exc).__name__}: {exc}); "
                    "install the CUDA runtime wheels CuPy names, e.g. nvidia-cuda-nvrtc")
        return None

    def function(self, spec, kernel, device_index):
        """The compiled kernel (compiles the module on first use for this device)."""
        key = (device_index, spec.key)
        module = self._modules.get(key)
        if module is None:
            with self._cp.cuda.Device(device_index):
                module = self._cp.RawModule(code=spec.source, options=spec.options,
                                            name_expressions=spec.name_expressions)
                module.compile()
            self._modules[key] = module
        return module.get_function(kernel.name)

    def _stream(self, handle: int, device_index):
        cuda = self._cp.cuda
        from_external = getattr(getattr(cuda, "Stream", None), "from_external", None)
        if from_external is not None:       # CuPy >= 14 (ExternalStream is deprecated there)
            return from_external(_StreamHandle(handle))
        return cuda.ExternalStream(handle, device_index)

    def __call__(self, spec, kernel, grid, args):
        cp, np = self._cp, self._np
        if len(args) != len(kernel.params):
            raise TypeError(f"{kernel.name}: {len(args)} arguments for {len(kernel.params)} parameters")
        devices = {a.device for a in args if isinstance(a, torch.Tensor)}
        if len(devices) != 1:
            raise ValueError(f"{kernel.name}: the tensor arguments must share one device, got {sorted(map(str, devices))}")
        device = devices.pop()
        scalar = np.float32 if spec.ctype == "float" else np.float64
        cargs = []
        for kind, arg in zip(kernel.params, args):
            if arg is None:
                cargs.append(np.uint64(0))           # null pointer
            elif kind in ("T*", "int*"):
                cargs.append(arg.detach())
            elif kind == "int":
                cargs.append(np.int32(arg))
            else:
                cargs.append(scalar(arg))
        with cp.cuda.Device(device.index):
            with self._stream(self._current_stream(device), device.index):
                fn = self.function(spec, kernel, device.index)
                # from_dlpack inside the stream: the exporter orders its pending work before it
                cargs = [cp.from_dlpack(a) if isinstance(a, torch.Tensor) else a for a in cargs]
                fn(tuple(int(g) for g in grid), kernel.block, tuple(cargs))


class CupyBackend:
    """Backend protocol of :class:`linf_plugin.ops.reference.ReferenceBackend` on CUDA kernels.

    Args:
        launcher: callable ``(module_spec, kernel_spec, grid, args)``;
            default :class:`CupyLauncher` (needs CuPy and a GPU).
    """

    name = "cupy"

    def __init__(self, launcher=None):
        self.launcher = launcher if launcher is not None else CupyLauncher()

    def unsupported(self, device: torch.device) -> str | None:
        """Why this backend cannot serve tensors on ``device`` (a CUDA device), or ``None``.

        Asks the launcher (:meth:`CupyLauncher.unsupported`: compute capability, NVRTC); a launcher
        without that check is taken to serve every device.
        """
        check = getattr(self.launcher, "unsupported", None)
        if check is None:
            return None
        return check(device.index if device.index is not None else torch.cuda.current_device())

    def _launch(self, family, dtype, pv, role, rows, cols, *args):
        spec = module_spec(family, _CTYPES[dtype], pv)
        kernel = spec.kernels[role]
        self.launcher(spec, kernel, grid_for(kernel, rows, cols), args)

    @staticmethod
    def _check_sizes(*sizes):
        for s in sizes:
            if s > _INT_MAX:
                raise ValueError(f"dimension {s} exceeds the kernels' int32 limit")

    # -- distances ---------------------------------------------------------
    def forward(self, x, w, p, need_aux=True):
        B, N, D = x.shape[0], w.shape[0], x.shape[1]
        self._check_sizes(B, N, D)
        y = x.new_empty(B, N)
        if math.isinf(p):
            aux = torch.empty(B, N, dtype=torch.int32, device=x.device) if need_aux else None
            role = "forward_save" if need_aux else "forward"
            self._launch("linf", x.dtype, None, role, B, N, x, w, y, aux, B, N, D)
            if need_aux:
                self._launch("linf", x.dtype, None, "resolve", B * N, 0, x, w, y, aux, B, N, D)
        else:
            aux = None
            pv = p_variant(p)
            role = "forward" + (self._backward_suffix(p, _CTYPES[x.dtype]) if need_aux else "")
            redo = None
            if pv in RAW_P_VARIANTS:
                # the raw sum, then lp_forward on the blocks it marked (same grid; no host sync)
                spec = module_spec("lp", _CTYPES[x.dtype], pv)
                grid = grid_for(spec.kernels["forward_raw"], B, N)
                redo = torch.empty(grid[0] * grid[1], dtype=torch.int32, device=x.device)
                self.launcher(spec, spec.kernels["forward_raw"], grid, (x, w, y, redo, B, N, D))
            self._launch("lp", x.dtype, pv, role, B, N, x, w, y, redo, B, N, D, p)
        return y, aux

    def _scatter_rows(self, dtype, family, out, sources):
        """``out[r, k] = sum over the (idx, values) sources of values[r, c] where idx[r, c] == k`` in a fixed order
        (``lp_scatter_rows``); ``sources``: one or two pairs of ``(R, C)`` int32 and ``dtype`` tensors."""
        (i0, v0), (i1, v1) = sources[0], (sources[1] if len(sources) > 1 else (None, None))
        R, D = out.shape
        self._launch(family, dtype, None, "backward_det", R, D, i0.contiguous(), v0.contiguous(),
                     None if i1 is None else i1.contiguous(), None if v1 is None else v1.contiguous(),
                     out, R, i0.shape[1], D)
        return out

    def _linf_backward_deterministic(self, grad_y, x, w, aux, need_x, need_w):
        idx = aux.long()
        d = x.gather(1, idx) - w.t().gather(0, idx)          # x[b, k] - w[n, k] at k = idx[b, n], as the kernel
        zero = torch.zeros_like(grad_y)
        v = torch.where(d > 0, grad_y, torch.where(d < 0, -grad_y, zero))
        gx = self._scatter_rows(x.dtype, "linf", torch.empty_like(x), [(aux, v)]) if need_x else None
        gw = self._scatter_rows(x.dtype, "linf", torch.empty_like(w), [(aux.t(), -v.t())]) if need_w else None
        return gx, gw

    def backward(self, grad_y, x, w, y, aux, p, need_x=True, need_w=True):
        B, N, D = x.shape[0], w.shape[0], x.shape[1]
        if math.isinf(p):
            if torch.are_deterministic_algorithms_enabled():
                return self._linf_backward_deterministic(grad_y, x, w, aux, need_x, need_w)
            gx = torch.zeros_like(x) if need_x else None
            gw = torch.zeros_like(w) if need_w else None
            self._launch("linf", x.dtype, None, "backward", B * N, 0, x, w, grad_y, aux, gx, gw, B, N, D)
            return gx, gw
        pv = p_variant(p)
        r = torch.where(y > 0, 1.0 / y, torch.zeros_like(y))
        suffix = self._backward_suffix(p, _CTYPES[x.dtype])
        if self._fused(need_x, need_w):
            # one power per triple for both gradients; gw is summed by atomics (over batch blocks)
            # into zeros, and so is gx when n is split over several blocks (small B D): their last
            # bits may then change from run to run (see lp_backward.cu)
            spec = module_spec("lp", _CTYPES[x.dtype], pv)
            kernel = spec.kernels["backward_fused" + suffix]
            splits = fused_n_splits(kernel, B, N, D)
            gx = torch.zeros_like(x) if splits > 1 else torch.empty_like(x)
            gw = torch.zeros_like(w)
            gx_, gy_, _ = grid_for(kernel, B, D)
            self.launcher(spec, kernel, (gx_, gy_, splits), (x, w, grad_y, r, gx, gw, B, N, D, p - 1.0))
            return gx, gw
        gx = gw = None
        if need_x:
            gx = torch.empty_like(x)
            self._launch("lp", x.dtype, pv, "backward_x" + suffix, B, D, x, w, grad_y, r, gx, B, N, D, p - 1.0)
        if need_w:
            gw = torch.empty_like(w)
            self._launch("lp", x.dtype, pv, "backward_w" + suffix, N, D, w, x, grad_y, r, gw, N, B, D, p - 1.0)
        return gx, gw

    @staticmethod
    def _fused(need_x: bool, need_w: bool) -> bool:
        """Whether the finite-p backward runs lp_backward_fused (both gradients) or the single-gradient kernels.

        When both are wanted (training) the fused kernel computes each power once for both sums
        and costs about one single-gradient kernel per triple (sm_90 cost model,
        benchmarks/results/kernel_cost.json: p = 8 9.6 instructions against 9.4 + 9.6 for the two
        single-gradient kernels, general p 14.1 against 13.9 + 14.0).  For ONE gradient the
        single-gradient kernels stay: per triple they cost no more than the fused kernel (9.4 / 13.9),
        need no zeroed buffer and no atomics, and their results are deterministic.  So do both
        gradients under ``torch.use_deterministic_algorithms(True)`` (the fused kernel's atomics
        make its sums' last bits vary from run to run; :meth:`kernel_plan` shows the default).
        """
        return need_x and need_w and not torch.are_deterministic_algorithms_enabled()

    @staticmethod
    def _backward_suffix(p: float, ctype: str) -> str:
        """float32 general p above FAST_GRAD_MAX_P takes the accurate-power kernels for gradients (and for
        the forward before them: the gradient multiplies the output's relative error by p - 1)."""
        return "_precise" if ctype == "float" and p_variant(p) == 0 and p > FAST_GRAD_MAX_P else ""

    @classmethod
    def kernel_plan(cls, p: float, ctype: str = "float", deterministic: bool = False) -> dict:
        """The kernels ``lp_dist`` launches at ``p``, as ``(family, pv, role)`` lists.

        Keys: ``"fwd"`` (no gradient wanted), ``"fwd_grad"`` (the forward
        before a backward), ``"bwd"`` (both gradients), ``"bwd_x"`` and
        ``"bwd_w"`` (one of them), and ``"fixup"``: the steps of those lists that
        run as the fixup of ``forward_raw`` (p = 2, 8), whose blocks return at
        once unless the raw sum marked them (outputs outside its safe range:
        extreme scales, inf, zero rows), so their hot loop does not run on
        ordinary data.  ``deterministic``: the plan under
        ``torch.use_deterministic_algorithms(True)`` (no atomics).  For the
        cost model (benchmarks/kernel_cost.py); the methods above launch
        exactly these.
        """
        if math.isinf(p):
            one = [("linf", None, "backward_det" if deterministic else "backward")]
            return {"fwd": [("linf", None, "forward")],
                    "fwd_grad": [("linf", None, "forward_save"), ("linf", None, "resolve")],
                    "bwd": one * (2 if deterministic else 1), "bwd_x": one, "bwd_w": one}
        pv = p_variant(p)
        suffix = cls._backward_suffix(p, ctype)
        raw = [("lp", pv, "forward_raw")] if pv in RAW_P_VARIANTS else []
        bwd_x, bwd_w = [("lp", pv, "backward_x" + suffix)], [("lp", pv, "backward_w" + suffix)]
        bwd = bwd_x + bwd_w if deterministic else [("lp", pv, "backward_fused" + suffix)]
        return {"fwd": raw + [("lp", pv, "forward")], "fwd_grad": raw + [("lp", pv, "forward" + suffix)],
                "bwd": bwd, "bwd_x": bwd_x, "bwd_w": bwd_w,
                "fixup": [("lp", pv, "forward")] if raw else []}

    # -- interval ----------------------------------------------------------
    def interval(self, lower, upper, w, p):
        lo, hi, _ = self.interval_forward(lower, upper, w, p, need_aux=False)
        return lo, hi

    def interval_forward(self, lower, upper, w, p, need_aux=True):
        B, N, D = lower.shape[0], w.shape[0], w.shape[1]
        self._check_sizes(B, N, D)
        lo, hi = lower.new_empty(B, N), lower.new_empty(B, N)
        dt = w.dtype
        if math.isinf(p):
            aux = torch.empty(2, B, N, dtype=torch.int32, device=w.device) if need_aux else None
            role = "forward_save" if need_aux else "forward"
            self._launch("interval_inf", dt, None, role, B, N, lower, upper, w, lo, hi, aux, B, N, D)
            if need_aux:
                self._launch("interval_inf", dt, None, "resolve", B * N, 0, lower, upper, w, lo, hi, aux, B, N, D)
            return lo, hi, aux
        pv = p_variant(p)
        if pv != 1:
            self._launch("interval_inf", dt, None, "forward", B, N, lower, upper, w, lo, hi, None, B, N, D)
        self._launch("interval_lp", dt, pv, "forward", B, N, lower, upper, w, lo, hi, B, N, D, p)
        return lo, hi, None

    def interval_backward(self, grad_lo, grad_hi, lower, upper, w, lo, hi, aux, p,
                          need_lower=True, need_upper=True, need_w=True):
        B, N, D = lower.shape[0], w.shape[0], w.shape[1]
        dt = w.dtype
        grad_lo = torch.zeros_like(lo) if grad_lo is None else grad_lo
        grad_hi = torch.zeros_like(hi) if grad_hi is None else grad_hi
        if math.isinf(p) and torch.are_deterministic_algorithms_enabled():
            return self._interval_backward_deterministic(grad_lo, grad_hi, lower, upper, w, lo, hi, aux,
                                                         need_lower, need_upper, need_w)
        if math.isinf(p):
            g_l = torch.zeros_like(lower) if need_lower else None
            g_u = torch.zeros_like(upper) if need_upper else None
            g_w = torch.zeros_like(w) if need_w else None
            self._launch("interval_inf", dt, None, "backward", B * N, 0, lower, upper, w, lo, hi, grad_lo, grad_hi,
                         aux, g_l, g_u, g_w, B, N, D)
            return g_l, g_u, g_w
        pv = p_variant(p)
        r_lo = torch.where(lo > 0, 1.0 / lo, torch.zeros_like(lo))
        r_hi = torch.where(hi > 0, 1.0 / hi, torch.zeros_like(hi))
        g_l = g_u = g_w = None
        if need_lower or need_upper:
            g_l, g_u = torch.empty_like(lower), torch.empty_like(upper)
            self._launch("interval_lp", dt, pv, "backward_box", B, D, lower, upper, w, grad_lo, r_lo, grad_hi, r_hi,
                         g_l, g_u, B, N, D, p - 1.0)
        if need_w:
            g_w = torch.empty_like(w)
            self._launch("interval_lp", dt, pv, "backward_w", N, D, lower, upper, w, grad_lo, r_lo, grad_hi, r_hi,
                         g_w, B, N, D, p - 1.0)
        return (g_l if need_lower else None, g_u if need_upper else None, g_w)

    def _interval_backward_deterministic(self, grad_lo, grad_hi, lower, upper, w, lo, hi, aux, need_lower,
                                         need_upper, need_w):
        """interval_inf_backward's sums in a fixed order: per argmax map (aux[0] near, aux[1] far) the values it
        sends to the lower end, the upper end and w, with the kernel's conventions (ties of the far end go up)."""
        wt = w.t()
        zero = torch.zeros_like(grad_hi)
        maps = []
        for k, g, out in ((aux[1], grad_hi, hi), (aux[0], grad_lo, lo)):
            kl = k.long()
            l_k, u_k, w_k = lower.gather(1, kl), upper.gather(1, kl), wt.gather(0, kl)
            a, c = w_k - l_k, u_k - w_k                        # lp_interval_terms' a and c
            v = torch.where(out > 0, g, zero)
            maps.append((k, a, c, v))
        (kh, ah, ch, vh), (kl, al, cl, vl) = maps
        up, below = ch >= ah, -al > 0
        dt = w.dtype
        g_l = self._scatter_rows(dt, "interval_inf", torch.empty_like(lower), [
            (kh, torch.where(up, zero, -vh)), (kl, torch.where(below, vl, zero))]) if need_lower else None
        g_u = self._scatter_rows(dt, "interval_inf", torch.empty_like(upper), [
            (kh, torch.where(up, vh, zero)), (kl, torch.where(below, zero, -vl))]) if need_upper else None
        g_w = self._scatter_rows(dt, "interval_inf", torch.empty_like(w), [
            (kh.t(), torch.where(up, -vh, vh).t()), (kl.t(), torch.where(below, -vl, vl).t())]) if need_w else None
        return g_l, g_u, g_w

    # -- the p = inf relaxation's coordinates ---------------------------------
    def linf_box_argmax(self, lower, upper, w):
        """``(k_near, k_far, k_far2)``, each ``(B, N)`` int64 (see :func:`linf_plugin.ops.linf_box_argmax`)."""
        B, N, D = lower.shape[0], w.shape[0], w.shape[1]
        self._check_sizes(B, N, D)
        out = torch.empty(3, B, N, dtype=torch.int32, device=w.device)
        self._launch("box_argmax", w.dtype, None, "argmax", B, N, lower, upper, w, out, B, N, D)
        k = out.to(torch.int64)
        return k[0], k[1], k[2]
