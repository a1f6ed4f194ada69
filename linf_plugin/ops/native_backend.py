"""The native CPU path of the l_p-distance op: hand-vectorised C++ kernels called through ctypes.

The kernels (``cpu_kernels/*.cpp``, built at first use by
:mod:`.native_build`) cover the distance's forward and both gradients for
every p, float32 and float64:

* p = inf: forward ``max_i |x - w|`` (and the lowest argmax when a backward
  follows) with the same IEEE operations as the torch backend, so the values
  are bit for bit the same; the backward sends ``g * sign(d)`` to each
  output's argmax coordinate;
* p = 1, 2, 8: exact multiplication chains; p = 2 and 8 sum the raw powers
  in one pass and recompute max-normalised where the sum left its safe range
  (the derivation is in ``lp_power.cpp``);
* any other p: max-normalised, ``(|d| / m)^p`` as ``2^(p log2 t)`` with
  vectorised log2 and exp2;
* the finite-p backward computes each triple's factor
  ``g sign(t) |t|^(p-1)``, ``t = d / y``, once for both gradients.

Every output is a fixed-order reduction (over ``D`` forward; over the batch
for ``grad_w`` and the neurons for ``grad_x`` backward), whatever the thread
count: results are bit-identical with 1 or 2 threads and between runs.
Threads: ``torch.get_num_threads()``, through torch's own OpenMP runtime.

The interval op (:func:`~.lp_dist.lp_dist_interval`) has kernels of the
same kinds (p = inf: the torch backend's values bit for bit; finite p:
raw or max-normalised sums; a fused backward routing both ends' factors);
boxes or weights holding inf go to the torch backend.
:func:`linf_box_argmax` and the margin certificate's fused p = inf stack
(``linf_stack_fixed``) are served by the torch backend (the p = inf values
agree bit for bit, so mixing the two is invisible).
"""
from __future__ import annotations

import ctypes
import math

import torch

from .native_build import load_library

__all__ = ["NativeBackend", "p_variant"]

_P = ctypes.c_void_p
_L = ctypes.c_int64
_SIGNATURES = {
    "lp_linf_forward": [_P, _P, _L, _L, _L, _L, _P, _P, ctypes.c_int],
    "lp_linf_backward": [_P, _P, _P, _P, _L, _L, _L, _P, _P, ctypes.c_int],
    "lp_forward": [_P, _P, _L, _L, _L, _L, ctypes.c_double, ctypes.c_int, _P, ctypes.c_int],
    "lp_backward": [_P, _P, _P, _P, _L, _L, _L, ctypes.c_double, ctypes.c_int, _P, _P, ctypes.c_int],
    "lp_ival_inf_forward": [_P, _P, _P, _L, _L, _L, _L, _P, _P, _P, ctypes.c_int],
    "lp_ival_inf_backward": [_P, _P, _P, _P, _P, _P, _P, _P, _L, _L, _L, _P, _P, _P, ctypes.c_int],
    "lp_ival_forward": [_P, _P, _P, _L, _L, _L, _L, ctypes.c_double, ctypes.c_int, _P, _P, ctypes.c_int],
    "lp_ival_backward": [_P, _P, _P, _P, _P, _P, _P, _L, _L, _L, ctypes.c_double, ctypes.c_int, _P, _P, _P,
                         ctypes.c_int],
}
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
# Below this many triples one thread is faster than waking the others (results are the same either way).
_SERIAL_WORK = 1 << 15


def p_variant(p: float) -> int:
    """1, 2 or 8 for those exact p (multiplication chains), else 0 (general p)."""
    return int(p) if p in (1.0, 2.0, 8.0) else 0


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


class NativeBackend:
    """The CPU kernel library behind the backend protocol of
    :class:`linf_plugin.ops.reference.ReferenceBackend`.

    Args:
        library: a loaded kernel library (default: build or load the cached one).
        fallback: the backend serving ``linf_box_argmax``, ``linf_stack_fixed`` and
            intervals with inf in the box or the weights (default: a new
            :class:`~.torch_backend.TorchBackend`; ``get_backend`` passes the shared one).

    Raises:
        linf_plugin.ops.native_build.NativeBuildError: no C++ compiler, or the
            library does not build or load.
    """

    name = "native"

    def __init__(self, library=None, fallback=None):
        self.lib = library if library is not None else load_library()
        self.vector_bytes = int(self.lib.lp_vector_bytes())
        self._fns = {}
        for base, argtypes in _SIGNATURES.items():
            for suffix in _SUFFIX.values():
                fn = getattr(self.lib, f"{base}_{suffix}")
                fn.argtypes, fn.restype = argtypes, None
                self._fns[base, suffix] = fn
        if fallback is None:
            from .torch_backend import TorchBackend
            fallback = TorchBackend()
        self.fallback = fallback

    # -- plumbing ----------------------------------------------------------
    def _fn(self, base: str, t: torch.Tensor):
        return self._fns[base, _SUFFIX[t.dtype]]

    def _lanes(self, t: torch.Tensor) -> int:
        return self.vector_bytes // t.element_size()

    @staticmethod
    def _check(rows, w, **others) -> None:
        """The kernels read raw pointers: a tensor of another device, dtype or shape is refused here, not read.

        ``rows`` ``(B, D)`` and ``w`` ``(N, D)``; ``others`` maps names to ``(tensor or None, shape, dtype or None)``
        (None: the dtype of ``w``).
        """
        if w.dtype not in _SUFFIX:
            raise TypeError(f"the native backend needs float32 or float64 tensors, got {w.dtype}")
        want = {"rows": (rows, (rows.shape[0], w.shape[1]) if rows.dim() == 2 else None, None),
                "w": (w, tuple(w.shape) if w.dim() == 2 else None, None), **others}
        for name, (t, shape, dtype) in want.items():
            if t is None:
                continue
            if t.device.type != "cpu":
                raise ValueError(f"the native backend runs on CPU tensors, got {name} on {t.device.type}; "
                                 "use backend='cupy' or 'torch' for other devices")
            if t.dtype != (dtype or w.dtype):
                raise TypeError(f"the native backend needs {name} as {dtype or w.dtype}, got {t.dtype}")
            if shape is None or tuple(t.shape) != tuple(shape):
                raise ValueError(f"the native backend got {name} of shape {tuple(t.shape)}, expected "
                                 f"{'a 2-D tensor' if shape is None else tuple(shape)}")

    @staticmethod
    def _threads(work: int) -> int:
        return 1 if work < _SERIAL_WORK else max(1, torch.get_num_threads())

    def _transposed(self, w: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(wt (D, Np), Np)``: w transposed, columns padded with zeros to a whole vector."""
        N, D = w.shape
        lanes = self._lanes(w)
        Np = -(-N // lanes) * lanes
        wt = w.new_zeros(D, Np)
        wt[:, :N] = w.t()
        return wt, Np

    def _padded(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` with its columns padded with zeros to a whole vector (``t`` itself when they are)."""
        rows, D = t.shape
        lanes = self._lanes(t)
        Dp = -(-D // lanes) * lanes
        if Dp == D:
            return t
        out = t.new_zeros(rows, Dp)
        out[:, :D] = t
        return out

    # -- distances ---------------------------------------------------------
    def forward(self, x, w, p, need_aux=True):
        self._check(x, w)
        x, w = x.contiguous(), w.contiguous()
        B, D, N = x.shape[0], x.shape[1], w.shape[0]
        y = x.new_empty(B, N)
        if B == 0 or N == 0:
            return y, (torch.empty(B, N, dtype=torch.int32) if math.isinf(p) and need_aux else None)
        wt, Np = self._transposed(w)
        nt = self._threads(B * N * D)
        if math.isinf(p):
            aux = torch.empty(B, N, dtype=torch.int32) if need_aux else None
            self._fn("lp_linf_forward", x)(x.data_ptr(), wt.data_ptr(), B, N, Np, D, y.data_ptr(), _ptr(aux), nt)
            return y, aux
        self._fn("lp_forward", x)(x.data_ptr(), wt.data_ptr(), B, N, Np, D, float(p), p_variant(p), y.data_ptr(), nt)
        return y, None

    def backward(self, grad_y, x, w, y, aux, p, need_x=True, need_w=True):
        B, N = x.shape[0], w.shape[0]
        self._check(x, w, grad_y=(grad_y, (B, N), None), y=(y, (B, N), None),
                    aux=(aux if math.isinf(p) else None, (B, N), torch.int32))
        grad_y, x, w = grad_y.contiguous(), x.contiguous(), w.contiguous()
        D = x.shape[1]
        nt = self._threads(B * N * D)
        if math.isinf(p):
            if aux is None and B and N and (need_x or need_w):
                raise ValueError("the p = inf backward needs the argmax its forward made (need_aux=True)")
            gx = torch.zeros_like(x) if need_x else None
            gw = torch.zeros_like(w) if need_w else None
            if B and N and (need_x or need_w):
                self._fn("lp_linf_backward", x)(x.data_ptr(), w.data_ptr(), grad_y.data_ptr(),
                                                aux.contiguous().data_ptr(), B, N, D, _ptr(gx), _ptr(gw), nt)
            return gx, gw
        xp, wp = self._padded(x), self._padded(w)
        Dp = xp.shape[1]
        gx = x.new_empty(B, Dp) if need_x else None
        gw = w.new_zeros(N, Dp) if need_w else None
        if B and N and (need_x or need_w):
            r = torch.where(y > 0, 1.0 / y, torch.zeros_like(y)).contiguous()
            self._fn("lp_backward", x)(xp.data_ptr(), wp.data_ptr(), grad_y.data_ptr(), r.data_ptr(), B, N, Dp,
                                       float(p), p_variant(p), _ptr(gx), _ptr(gw), nt)
        elif gx is not None:
            gx.zero_()
        if Dp != D:
            gx = gx[:, :D].contiguous() if gx is not None else None
            gw = gw[:, :D].contiguous() if gw is not None else None
        return gx, gw

    # -- interval ----------------------------------------------------------
    # The kernels take finite boxes and weights (no NaN can then arise in w - lower or upper - w); anything
    # else goes to the torch backend, forward and backward alike (its aux is an int64 tensor).
    @staticmethod
    def _finite(*tensors) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def interval(self, lower, upper, w, p):
        lo, hi, _ = self.interval_forward(lower, upper, w, p, need_aux=False)
        return lo, hi

    def interval_forward(self, lower, upper, w, p, need_aux=True):
        self._check(lower, w, upper=(upper, tuple(lower.shape), None))
        lower, upper, w = lower.contiguous(), upper.contiguous(), w.contiguous()
        B, D, N = lower.shape[0], lower.shape[1], w.shape[0]
        if B == 0 or N == 0 or not self._finite(lower, upper, w):
            return self.fallback.interval_forward(lower, upper, w, p, need_aux=need_aux)
        lo, hi = lower.new_empty(B, N), lower.new_empty(B, N)
        wt, Np = self._transposed(w)
        nt = self._threads(B * N * D)
        ptrs = (lower.data_ptr(), upper.data_ptr(), wt.data_ptr(), B, N, Np, D)
        if math.isinf(p):
            aux = torch.empty(2, B, N, dtype=torch.int32) if need_aux else None
            self._fn("lp_ival_inf_forward", w)(*ptrs, lo.data_ptr(), hi.data_ptr(), _ptr(aux), nt)
            return lo, hi, aux
        self._fn("lp_ival_forward", w)(*ptrs, float(p), p_variant(p), lo.data_ptr(), hi.data_ptr(), nt)
        return lo, hi, None

    def interval_backward(self, grad_lo, grad_hi, lower, upper, w, lo, hi, aux, p, need_lower=True, need_upper=True,
                          need_w=True):
        B, D, N = lower.shape[0], lower.shape[1], w.shape[0]
        native_aux = aux is None or aux.dtype == torch.int32
        self._check(lower, w, upper=(upper, tuple(lower.shape), None), grad_lo=(grad_lo, (B, N), None),
                    grad_hi=(grad_hi, (B, N), None), lo=(lo, (B, N), None), hi=(hi, (B, N), None),
                    aux=(aux if math.isinf(p) and native_aux else None, (2, B, N), torch.int32))
        if B == 0 or N == 0 or not native_aux or not self._finite(lower, upper, w):
            return self.fallback.interval_backward(grad_lo, grad_hi, lower, upper, w, lo, hi, aux, p, need_lower,
                                                   need_upper, need_w)
        lower, upper, w = lower.contiguous(), upper.contiguous(), w.contiguous()
        zeros = lo.new_zeros(B, N)
        grad_lo = zeros if grad_lo is None else grad_lo.contiguous()
        grad_hi = zeros if grad_hi is None else grad_hi.contiguous()
        nt = self._threads(B * N * D)
        if math.isinf(p):
            outs = [torch.zeros_like(t) if need else None for t, need in ((lower, need_lower), (upper, need_upper),
                                                                           (w, need_w))]
            self._fn("lp_ival_inf_backward", w)(grad_lo.data_ptr(), grad_hi.data_ptr(), lower.data_ptr(),
                                                upper.data_ptr(), w.data_ptr(), lo.contiguous().data_ptr(),
                                                hi.contiguous().data_ptr(), aux.contiguous().data_ptr(), B, N, D,
                                                *(_ptr(t) for t in outs), nt)
            return tuple(outs)
        lp, up, wp = self._padded(lower), self._padded(upper), self._padded(w)
        Dp = lp.shape[1]
        r_lo = torch.where(lo > 0, 1.0 / lo, torch.zeros_like(lo)).contiguous()
        r_hi = torch.where(hi > 0, 1.0 / hi, torch.zeros_like(hi)).contiguous()
        g_l = lower.new_empty(B, Dp) if need_lower else None
        g_u = upper.new_empty(B, Dp) if need_upper else None
        g_w = w.new_zeros(N, Dp) if need_w else None
        self._fn("lp_ival_backward", w)(lp.data_ptr(), up.data_ptr(), wp.data_ptr(), grad_lo.data_ptr(),
                                        grad_hi.data_ptr(), r_lo.data_ptr(), r_hi.data_ptr(), B, N, Dp, float(p),
                                        p_variant(p), _ptr(g_l), _ptr(g_u), _ptr(g_w), nt)
        return tuple(t[:, :D].contiguous() if t is not None and Dp != D else t for t in (g_l, g_u, g_w))

    # -- served by the torch backend ----------------------------------------
    def linf_box_argmax(self, lower, upper, w):
        return self.fallback.linf_box_argmax(lower, upper, w)

    def linf_stack_fixed(self, x, layers, extra=()):
        """The torch backend's fused p = inf stack (see ``TorchBackend.linf_stack_fixed``): its values equal
        this backend's layer by layer bit for bit (the same IEEE subtraction, absolute value and max)."""
        return self.fallback.linf_stack_fixed(x, layers, extra)
