"""The fast PyTorch path of the l_p-distance op (any device).

Each pass is one broadcast reduction from :mod:`linf_plugin.ops.torch_kernels`
run over chunks of rows, so no ``(B, N, D)`` tensor ever exists:

* **compiled** (default on CPU): ``torch.compile`` (inductor) turns each
  reduction into a vectorised, OpenMP-parallel loop nest without the
  ``(b, n, D)`` temporary.  Graphs are compiled with dynamic shapes, so a new
  B, N or D does not recompile (sizes 0 and 1 would, so chunks with one row
  and operands with N or D of 1 run eagerly instead), and one graph per
  p-variant serves every p.  Problems below ``min_compiled_work`` triples run
  eagerly: compiling costs about a second per graph (much more for the very
  first graph of a process with a cold inductor cache).  Once the p = inf
  forward's graph exists, problems down to ``min_warm_work`` triples use it
  too (an l_inf-dist net's narrow output layer, 360 x 10 x 128 in the digits
  margin pass, runs 2-3x faster compiled than eagerly).
* **eager**: the same expressions on chunks sized so each temporary stays
  under ``eager_budget`` elements.  Used when compilation is off
  (``LINF_LP_DIST_COMPILE=0``), unavailable, or fails: the first failure is
  logged as a warning and the backend stays eager from then on.

On CUDA the compiled path needs Triton; without it the backend is eager
(the CuPy backend is the fast path there).

p = inf: the forward computes the argmax only when a backward will follow
(``need_aux``); in float32 the max and the lowest argmax come from one packed
int64 max-reduction (see :func:`torch_kernels.linf_key`).  The backward is
sparse: one gather and two ``scatter_add_`` of ``(B, N)`` values.
"""
from __future__ import annotations

import logging
import math
import os

import torch

from . import torch_kernels as K

__all__ = ["TorchBackend", "COMPILE_ENV"]

log = logging.getLogger(__name__)
COMPILE_ENV = "LINF_LP_DIST_COMPILE"
# With dynamic shapes inductor decides how many loops to parallelise from the
# size hints of the FIRST call: a small first call would leave the graph
# single-threaded for good.  dynamic_threads always opens a parallel region
# (and does not specialise on the thread count); a chunk size of 1 lets it
# collapse the row and neuron loops when a chunk has few rows.
_INDUCTOR_OPTIONS = {"cpp.dynamic_threads": True, "cpp.min_chunk_size": 1}


def _env_compile() -> bool | None:
    value = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{COMPILE_ENV} must be auto, 0 or 1, got {value!r}")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _pv_fn(fn, pv):
    """``fn`` with ``pv`` bound, under a code object of its own.

    Dynamo keys its cache (and its recompile limit) by code object, so the
    p-variants of one kernel must not share one, or the fifth variant would
    silently run uncompiled.
    """
    def bound(*args):
        return fn(*args, pv=pv)
    return _renamed(bound, f"{fn.__name__}_pv{pv}")


def _renamed(fn, name: str):
    """``fn`` under a code object of its own called ``name`` (see :func:`_pv_fn`)."""
    fn.__code__ = fn.__code__.replace(co_name=name, co_qualname=name)
    fn.__name__ = fn.__qualname__ = name
    return fn


def _epilogue(y, extra, has_sub: bool, has_add: bool, max_abs: bool):
    """``y (- sub) (+ add)`` and, with ``max_abs``, the per-row ``max |.|`` (see ``linf_max_fixed``)."""
    if has_sub:
        y = y - extra[0]
    if has_add:
        y = y + extra[-1]
    return (y, y.abs().amax(1)) if max_abs else y


def _fixed_fn(spec):
    """``linf_max`` and its epilogue for one ``(N, D, has_sub, has_add, max_abs)``, under its own code object."""
    n, d, has_sub, has_add, max_abs = spec

    def fixed(x, w, *extra):
        return _epilogue(K.linf_max(x, w), extra, has_sub, has_add, max_abs)
    tags = "".join(t for t, on in (("_sub", has_sub), ("_add", has_add), ("_maxabs", max_abs)) if on)
    return _renamed(fixed, f"linf_max_{n}x{d}{tags}")


class TorchBackend:
    """Chunked broadcast reductions, compiled with inductor where possible.

    Args:
        compile: ``True``/``False`` forces the compiled/eager path; ``None``
            (default) reads ``LINF_LP_DIST_COMPILE`` (``auto``: compile on
            CPU, and on CUDA when Triton imports).
        eager_budget: elements per ``(chunk, N, D)`` temporary on the eager path.
        compiled_budget: triples per compiled call (bounds memory even if a
            graph were not fused).
        min_compiled_work: ``B * N * D`` below which the eager path is used.
        min_warm_work: the same threshold for a kernel whose graph is already
            compiled (the p = inf forward only).
        max_fixed_shapes: how many weight shapes :meth:`linf_max_fixed`
            compiles a graph for.
        compile_backend: the ``torch.compile`` backend (tests pass a failing
            one to exercise the fallback).

    Implements the backend protocol of :class:`linf_plugin.ops.reference.ReferenceBackend`.
    """

    name = "torch"

    def __init__(self, compile: bool | None = None, eager_budget: int = 1 << 22, compiled_budget: int = 1 << 28,
                 min_compiled_work: int = 1 << 20, compile_backend="inductor", min_warm_work: int = 1 << 16,
                 max_fixed_shapes: int = 16):
        self.compile = _env_compile() if compile is None else bool(compile)
        self.eager_budget = int(eager_budget)
        self.compiled_budget = int(compiled_budget)
        self.min_compiled_work = int(min_compiled_work)
        self.min_warm_work = int(min_warm_work)
        self.max_fixed_shapes = int(max_fixed_shapes)
        self.compile_backend = compile_backend
        self.compile_failed: str | None = None
        self.compiled_calls = 0          # how many chunk-calls ran compiled code (for tests and benchmarks)
        self._compiled: dict = {}

    # -- plumbing ----------------------------------------------------------
    def uses_compiled(self, ref: torch.Tensor, n: int, d: int, kernel: str | None = None) -> bool:
        """Whether a problem with rows like ``ref`` against ``(n, d)`` runs compiled.

        ``kernel`` names the (p-variant-free) kernel the problem runs; when its
        graph is compiled already, ``min_warm_work`` replaces ``min_compiled_work``.
        """
        if self.compile is False or self.compile_failed is not None:
            return False
        if ref.device.type == "cuda":
            if self.compile is None and not _triton_available():
                return False
        elif ref.device.type != "cpu":
            return False
        warm = kernel is not None and any(key[0] == kernel for key in self._compiled)
        least = min(self.min_warm_work, self.min_compiled_work) if warm else self.min_compiled_work
        return n >= 2 and d >= 2 and ref.shape[0] * n * d >= least

    def _fn(self, name: str, pv: int | None, compiled: bool):
        fn = K.KERNELS[name] if pv is None else _pv_fn(K.KERNELS[name], pv)
        if not compiled:
            return fn
        key = (name, pv)
        if key not in self._compiled:
            options = _INDUCTOR_OPTIONS if self.compile_backend == "inductor" else None
            self._compiled[key] = torch.compile(fn, dynamic=True, backend=self.compile_backend, options=options)
        return self._compiled[key]

    def _run(self, name: str, pv: int | None, compiled: bool, *args):
        if compiled and args[0].shape[0] >= 2 and self.compile_failed is None:
            try:
                out = self._fn(name, pv, True)(*args)
                self.compiled_calls += 1
                return out
            except Exception as exc:  # noqa: BLE001  (any compile failure -> eager, once)
                self.compile_failed = _describe(exc)
                log.warning("lp_dist: torch.compile failed (%s); the torch backend runs eagerly from now on",
                            self.compile_failed)
        return self._fn(name, pv, False)(*args)

    def _rows_per_chunk(self, n: int, d: int, compiled: bool) -> int:
        budget = self.compiled_budget if compiled else self.eager_budget
        return max(1, budget // max(1, n * d))

    def _chunks(self, rows: int, n: int, d: int, compiled: bool):
        cap = self._rows_per_chunk(n, d, compiled)
        count = -(-rows // cap)
        step = -(-rows // count) if count else 1
        for start in range(0, rows, step):
            yield slice(start, min(rows, start + step))

    def linf_max_fixed(self, x: torch.Tensor, w: torch.Tensor, sub: torch.Tensor | None = None,
                       add: torch.Tensor | None = None, max_abs: bool = False):
        """p = inf distances, no argmax, from a graph compiled for ``w``'s shape with the batch dynamic.

        ``y = lp_dist(x, w, inf)``, then ``y - sub`` and ``y + add`` where
        given, in that order (an ℓ∞-dist layer's mean shift and bias), each
        rounded once as the eager ops round them (inductor compiles without
        fast-math, so there is nothing to contract or reassociate).  With
        ``max_abs`` also ``max_n |y[b, n]|``, fused into the same graph.

        With ``N`` and ``D`` constants inductor's loops have fixed trip counts
        and the reduction over ``D`` unrolls: 30-45% faster than the
        dynamic-shape graph of :meth:`forward` at the digits margin pass's
        sizes (360 x 128 x 128 on 2 cores), and the epilogue costs no extra
        pass.  Meant for passes that run the same layers again and again (the
        margin certificate).  Each new ``(N, D)`` and epilogue compiles a
        graph (seconds, once per process with a warm inductor cache), at most
        ``max_fixed_shapes`` of them; beyond that, and wherever
        :meth:`forward` would not run compiled code, the same ops run
        through :meth:`forward` and eager torch (the same values bit for bit).

        Args:
            x: ``(B, D)``; w: ``(N, D)``, contiguous, same dtype and device.
            sub, add: ``(N,)`` or None.
            max_abs: also return the per-row maximum of ``|y|``.

        Returns:
            ``y`` ``(B, N)``, or ``(y, (B,))`` with ``max_abs``.
        """
        B, N, D = x.shape[0], w.shape[0], w.shape[1]
        extra = [t for t in (sub, add) if t is not None]
        key = ("linf_max", "fixed", N, D, sub is not None, add is not None, bool(max_abs))
        fn = self._compiled.get(key)
        full = fn is None and sum(k[1] == "fixed" for k in self._compiled) >= self.max_fixed_shapes
        def uncompiled():   # the same ops through forward() and eager torch: the same values
            return _epilogue(self.forward(x, w, math.inf, need_aux=False)[0], extra, sub is not None,
                             add is not None, max_abs)

        if full or B < 2 or not self.uses_compiled(x, N, D, "linf_max") or not self._one_chunk(B, N, D, True):
            return uncompiled()
        if fn is None:
            options = _INDUCTOR_OPTIONS if self.compile_backend == "inductor" else None
            fn = self._compiled[key] = torch.compile(_fixed_fn(key[2:]), dynamic=False,
                                                     backend=self.compile_backend, options=options)
        xv = x.view(x.shape)  # mark the batch dynamic on a view: the caller's tensor is left alone
        torch._dynamo.mark_dynamic(xv, 0)
        try:
            out = fn(xv, w, *extra)
        except Exception as exc:  # noqa: BLE001  (as in _run: any compile failure -> eager, once)
            self.compile_failed = _describe(exc)
            log.warning("lp_dist: torch.compile failed (%s); the torch backend runs eagerly from now on",
                        self.compile_failed)
            return uncompiled()
        self.compiled_calls += 1
        return out

    def _one_chunk(self, rows: int, n: int, d: int, compiled: bool) -> bool:
        return rows <= self._rows_per_chunk(n, d, compiled)

    @staticmethod
    def _scalar(value: float, ref: torch.Tensor) -> torch.Tensor:
        return torch.full((), value, dtype=ref.dtype, device=ref.device)

    # -- distances ---------------------------------------------------------
    def forward(self, x, w, p, need_aux=True):
        B, N, D = x.shape[0], w.shape[0], x.shape[1]
        comp = self.uses_compiled(x, N, D, "linf_max" if math.isinf(p) and not need_aux else None)
        if math.isinf(p) and not need_aux and self._one_chunk(B, N, D, comp):
            # no (B, N) buffer to copy into; x[0:B] is a view like every chunk (a base tensor would recompile)
            return self._run("linf_max", None, comp, x[0:B], w), None
        y = x.new_empty(B, N)
        if math.isinf(p):
            aux = torch.empty(B, N, dtype=torch.int64, device=x.device) if need_aux else None
            for sl in self._chunks(B, N, D, comp):
                if not need_aux:
                    y[sl] = self._run("linf_max", None, comp, x[sl], w)
                elif x.dtype == torch.float32:
                    y[sl], aux[sl] = K.decode_key(self._run("linf_key", None, comp, x[sl], w))
                else:
                    y[sl] = self._run("linf_max", None, comp, x[sl], w)
                    aux[sl] = self._run("linf_argmax", None, comp, x[sl], w, y[sl]).to(torch.int64)
            return y, aux
        pv = K.p_variant(p)
        pt = self._scalar(p, x)
        for sl in self._chunks(B, N, D, comp):
            if pv == 1:
                y[sl] = self._run("l1_sum", None, comp, x[sl], w)
                continue
            m = self._run("linf_max", None, comp, x[sl], w)
            inv = torch.where(m > 0, 1.0 / m, torch.zeros_like(m))
            s = self._run("lp_sum", pv, comp, x[sl], w, inv, pt)
            y[sl] = m * (s.sqrt() if pv == 2 else s.sqrt().sqrt().sqrt() if pv == 8 else s ** (1.0 / p))
        return y, None

    def backward(self, grad_y, x, w, y, aux, p, need_x=True, need_w=True):
        if math.isinf(p):
            return _linf_scatter(grad_y, x, w, aux, need_x, need_w)
        B, N, D = x.shape[0], w.shape[0], x.shape[1]
        comp = self.uses_compiled(x, N, D)
        pv = K.p_variant(p)
        pm1 = self._scalar(p - 1.0, x)
        r = torch.where(y > 0, 1.0 / y, torch.zeros_like(y))
        gx = torch.empty_like(x) if need_x else None
        gw = torch.zeros_like(w) if need_w else None
        for sl in self._chunks(B, N, D, comp):
            if need_x:
                gx[sl] = self._run("lp_grad_x", pv, comp, x[sl], w, grad_y[sl], r[sl], pm1)
            if need_w:
                gw += self._run("lp_grad_w", pv, comp, x[sl], w, grad_y[sl], r[sl], pm1)
        return gx, gw

    # -- interval ----------------------------------------------------------
    def interval(self, lower, upper, w, p):
        lo, hi, _ = self.interval_forward(lower, upper, w, p, need_aux=False)
        return lo, hi

    def interval_forward(self, lower, upper, w, p, need_aux=True):
        B, N, D = lower.shape[0], w.shape[0], w.shape[1]
        comp = self.uses_compiled(lower, N, D)
        lo, hi = lower.new_empty(B, N), lower.new_empty(B, N)
        if math.isinf(p):
            aux = torch.empty(2, B, N, dtype=torch.int64, device=w.device) if need_aux else None
            for sl in self._chunks(B, N, D, comp):
                l_, u_ = lower[sl], upper[sl]
                if need_aux and w.dtype == torch.float32:
                    k_lo, k_hi = self._run("ival_key", None, comp, l_, u_, w)
                    (lo[sl], aux[0, sl]), (hi[sl], aux[1, sl]) = K.decode_key(k_lo), K.decode_key(k_hi)
                    continue
                lo[sl], hi[sl] = self._run("ival_max", None, comp, l_, u_, w)
                if need_aux:
                    i_lo, i_hi = self._run("ival_argmax", None, comp, l_, u_, w, lo[sl], hi[sl])
                    aux[0, sl], aux[1, sl] = i_lo.to(torch.int64), i_hi.to(torch.int64)
            return lo, hi, aux
        pv = K.p_variant(p)
        pt = self._scalar(p, w)
        for sl in self._chunks(B, N, D, comp):
            l_, u_ = lower[sl], upper[sl]
            if pv == 1:
                lo[sl], hi[sl] = self._run("ival_l1", None, comp, l_, u_, w)
                continue
            m_lo, m_hi = self._run("ival_max", None, comp, l_, u_, w)
            inv_lo = torch.where(m_lo > 0, 1.0 / m_lo, torch.zeros_like(m_lo))
            inv_hi = torch.where(m_hi > 0, 1.0 / m_hi, torch.zeros_like(m_hi))
            s_lo, s_hi = self._run("ival_sum", pv, comp, l_, u_, w, inv_lo, inv_hi, pt)
            root = (lambda s: s.sqrt()) if pv == 2 else (lambda s: s.sqrt().sqrt().sqrt()) if pv == 8 else \
                (lambda s: s ** (1.0 / p))
            lo[sl], hi[sl] = m_lo * root(s_lo), m_hi * root(s_hi)
        return lo, hi, None

    def linf_box_argmax(self, lower, upper, w):
        """``(k_near, k_far, k_far2)``, each ``(B, N)`` int64: the lowest argmax of ``near``, of
        ``far``, and of ``far`` without coordinate ``k_far`` (0 when ``D = 1``)."""
        B, N, D = lower.shape[0], w.shape[0], w.shape[1]
        comp = self.uses_compiled(lower, N, D)
        out = [torch.zeros(B, N, dtype=torch.int64, device=w.device) for _ in range(3)]
        for sl in self._chunks(B, N, D, comp):
            l_, u_ = lower[sl], upper[sl]
            if w.dtype == torch.float32:
                k_lo, k_hi = self._run("ival_key", None, comp, l_, u_, w)
                out[0][sl], out[1][sl] = K.decode_key(k_lo)[1], K.decode_key(k_hi)[1]
                if D > 1:
                    out[2][sl] = K.decode_key(self._run("ival_key_excl", None, comp, l_, u_, w, out[1][sl]))[1]
                continue
            lo, hi = self._run("ival_max", None, comp, l_, u_, w)
            i_lo, i_hi = self._run("ival_argmax", None, comp, l_, u_, w, lo, hi)
            out[0][sl], out[1][sl] = i_lo.to(torch.int64), i_hi.to(torch.int64)
            if D > 1:
                m2 = self._run("ival_max_excl", None, comp, l_, u_, w, out[1][sl])
                out[2][sl] = self._run("ival_argmax_excl", None, comp, l_, u_, w, out[1][sl], m2).to(torch.int64)
        return tuple(out)

    def interval_backward(self, grad_lo, grad_hi, lower, upper, w, lo, hi, aux, p,
                          need_lower=True, need_upper=True, need_w=True):
        grad_lo = torch.zeros_like(lo) if grad_lo is None else grad_lo
        grad_hi = torch.zeros_like(hi) if grad_hi is None else grad_hi
        if math.isinf(p):
            return _interval_scatter(grad_lo, grad_hi, lower, upper, w, lo, hi, aux)
        B, N, D = lower.shape[0], w.shape[0], w.shape[1]
        comp = self.uses_compiled(lower, N, D)
        pv = K.p_variant(p)
        pm1 = self._scalar(p - 1.0, w)
        r_lo = torch.where(lo > 0, 1.0 / lo, torch.zeros_like(lo))
        r_hi = torch.where(hi > 0, 1.0 / hi, torch.zeros_like(hi))
        g_l = torch.empty_like(lower) if need_lower else None
        g_u = torch.empty_like(upper) if need_upper else None
        g_w = torch.zeros_like(w) if need_w else None
        for sl in self._chunks(B, N, D, comp):
            args = (lower[sl], upper[sl], w, grad_lo[sl], r_lo[sl], grad_hi[sl], r_hi[sl], pm1)
            if need_lower:
                g_l[sl] = self._run("ival_grad_lower", pv, comp, *args)
            if need_upper:
                g_u[sl] = self._run("ival_grad_upper", pv, comp, *args)
            if need_w:
                g_w += self._run("ival_grad_w", pv, comp, *args)
        return g_l, g_u, g_w


def _describe(exc: BaseException) -> str:
    """One line: the exception and its root cause (dynamo wraps compiler errors)."""
    root = exc
    for _ in range(10):
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if inner is None or inner is root:
            break
        root = inner
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if root is not exc:
        text = f"{type(root).__name__}: {' '.join(str(root).split())} (via {type(exc).__name__})"
    return text[:400]


def _linf_scatter(grad_y, x, w, idx, need_x, need_w):
    """Sparse p = inf backward: each output sends ``g * sign(d)`` to its argmax coordinate."""
    x_at = x.gather(1, idx)
    w_at = w.t().gather(0, idx)                      # w[n, idx[b, n]]
    v = grad_y * torch.sign(x_at - w_at)
    gx = torch.zeros_like(x).scatter_add_(1, idx, v) if need_x else None
    gw = torch.zeros(w.shape[1], w.shape[0], dtype=w.dtype, device=w.device).scatter_add_(0, idx, -v).t().contiguous() \
        if need_w else None
    return gx, gw


def _interval_scatter(grad_lo, grad_hi, lower, upper, w, lo, hi, aux):
    """Sparse p = inf interval backward (conventions of :mod:`linf_plugin.ops.reference`)."""
    wt = w.t()
    g_l, g_u = torch.zeros_like(lower), torch.zeros_like(upper)
    g_wt = torch.zeros(w.shape[1], w.shape[0], dtype=w.dtype, device=w.device)
    # upper end: far = max(w - l, u - w) at k = argmax
    k = aux[1]
    l_k, u_k, w_k = lower.gather(1, k), upper.gather(1, k), wt.gather(0, k)
    v = torch.where(hi > 0, grad_hi, torch.zeros_like(grad_hi))
    up = (u_k - w_k) >= (w_k - l_k)
    zero = torch.zeros_like(v)
    g_u.scatter_add_(1, k, torch.where(up, v, zero))
    g_l.scatter_add_(1, k, torch.where(up, zero, -v))
    g_wt.scatter_add_(0, k, torch.where(up, -v, v))
    # lower end: near = l - w (l > w) or w - u (w > u) at k = argmax
    k = aux[0]
    l_k, u_k, w_k = lower.gather(1, k), upper.gather(1, k), wt.gather(0, k)
    v = torch.where(lo > 0, grad_lo, zero)
    below = -(w_k - l_k) > 0
    g_l.scatter_add_(1, k, torch.where(below, v, zero))
    g_u.scatter_add_(1, k, torch.where(below, zero, -v))
    g_wt.scatter_add_(0, k, torch.where(below, -v, v))
    return g_l, g_u, g_wt.t().contiguous()
