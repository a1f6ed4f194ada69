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
# The C++ compiler's unsafe-math optimisations and FMA contraction stay off
# whatever the environment says (TORCHINDUCTOR_CPP_ENABLE_UNSAFE_MATH_OPT_FLAG,
# ..._FLOATING_POINT_CONTRACT_FLAG): they may reassociate ``(y - m) + b`` or
# fuse a product into a sum, and the margin certificate's float argument and
# its bit-for-bit tests assume each op rounds once, in the written order.
_INDUCTOR_OPTIONS = {"cpp.dynamic_threads": True, "cpp.min_chunk_size": 1,
                     "cpp.enable_unsafe_math_opt_flag": False, "cpp.enable_floating_point_contract_flag": "off"}


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


def _stack_fn(spec):
    """The p = inf layers of ``spec`` with their magnitudes, under a code object of its own.

    ``spec``: ``(layers, n_extra)`` with ``layers`` a tuple of
    ``(N, D, has_sub, has_add)``; the graph takes ``x`` and, per layer, its
    weight, then its ``sub`` and ``add`` where present, then ``n_extra`` more
    tensors (see :meth:`TorchBackend.linf_stack_fixed`).
    """
    layers, n_extra = spec

    def stack(x, *tensors):
        outs, rows, z, i = [], [x.abs().amax(1)], x, 0
        for _n, _d, has_sub, has_add in layers:
            z = K.linf_max(z, tensors[i])
            if has_sub:
                z = z - tensors[i + 1]
            if has_add:
                z = z + tensors[i + 1 + has_sub]
            outs.append(z)
            rows.append(z.abs().amax(1))
            i += 1 + has_sub + has_add
        ranges = torch.stack([v.double() for t in tensors for v in torch.aminmax(t)]).view(-1, 2)
        return outs, torch.stack(rows), ranges
    shapes = "_".join(f"{n}x{d}{'s' if hs else ''}{'a' if ha else ''}" for n, d, hs, ha in layers)
    return _renamed(stack, f"linf_stack_{shapes}_e{n_extra}")


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
        max_fixed_shapes: how many layer stacks :meth:`linf_stack_fixed`
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
        self._marked: dict = {}          # linf_stack_fixed: the (dtype, device) pairs each graph has seen

    # -- plumbing ----------------------------------------------------------
    def uses_compiled(self, ref: torch.Tensor, n: int, d: int, kernel: str | None = None) -> bool:
        """Whether a problem with rows like ``ref`` against ``(n, d)`` runs compiled.

        ``kernel`` names the (p-variant-free) kernel the problem runs; when its
        graph is compiled already, ``min_warm_work`` replaces ``min_compiled_work``.
        """
        if not self._compiles_on(ref):
            return False
        warm = kernel is not None and any(key[0] == kernel for key in self._compiled)
        least = min(self.min_warm_work, self.min_compiled_work) if warm else self.min_compiled_work
        return n >= 2 and d >= 2 and ref.shape[0] * n * d >= least

    def _compiles_on(self, ref: torch.Tensor) -> bool:
        """Whether compiled code may run on ``ref``'s device (compilation on, not failed; Triton on CUDA)."""
        if self.compile is False or self.compile_failed is not None:
            return False
        if ref.device.type == "cuda":
            return self.compile is not None or _triton_available()
        return ref.device.type == "cpu"

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
                self._stop_compiling(exc)
        return self._fn(name, pv, False)(*args)

    def _stop_compiling(self, exc: Exception) -> None:
        """After the first failure of compiled code: record it, warn once, and run eagerly from now on."""
        self.compile_failed = _describe(exc)
        log.warning("lp_dist: torch.compile failed (%s); the torch backend runs eagerly from now on",
                    self.compile_failed)

    def _rows_per_chunk(self, n: int, d: int, compiled: bool) -> int:
        budget = self.compiled_budget if compiled else self.eager_budget
        return max(1, budget // max(1, n * d))

    def _chunks(self, rows: int, n: int, d: int, compiled: bool):
        """The fewest chunks of at most the budget's rows each, balanced: their sizes differ by at most one
        (10 rows, 3 a chunk: 3, 3, 2, 2, not 3, 3, 3, 1 -- no tiny last chunk to specialise a graph for)."""
        cap = self._rows_per_chunk(n, d, compiled)
        count = -(-rows // cap)
        start = 0
        for i in range(count):
            size = rows // count + (i < rows % count)
            yield slice(start, start + size)
            start += size

    def linf_stack_fixed(self, x: torch.Tensor, layers, extra=()):
        """A stack of p = inf distance layers in ONE graph compiled for its weight shapes, the batch dynamic.

        Layer ``l`` computes ``z_l = lp_dist(z_{l-1}, w_l, inf)``, then
        ``- sub_l`` and ``+ add_l`` where given, in that order (an ℓ∞-dist
        layer's mean shift and bias), each rounded once as the eager ops
        round them (inductor compiles without fast-math: nothing is contracted
        or reassociated, and max is exact), so every ``z_l`` equals the layer
        by layer result bit for bit.  The same graph returns each row's
        largest magnitude and each tensor's range, which the margin
        certificate's error bound needs: one call instead of a graph, a
        reduction and a read-back per layer.  With ``N`` and ``D`` constants
        inductor's loops have fixed trip counts and the reduction over ``D``
        unrolls.  Each new stack compiles a graph (seconds, once per process
        with a warm inductor cache), at most ``max_fixed_shapes`` of them.

        Args:
            x: ``(B, D_0)``.
            layers: ``[(w_l (N_l, D_{l-1}), sub_l (N_l,) or None, add_l (N_l,) or None)]``,
                contiguous, the dtype and device of ``x``.
            extra: more tensors whose ranges are wanted (any shape, non-empty).

        Returns:
            ``(outs, row_max, ranges)``: ``[z_l (B, N_l)]``; ``(L + 1, B)``
            ``max |x[b]|`` then ``max_n |z_l[b, n]|``; float64 ``(T, 2)``
            ``(min, max)`` of every tensor in the order given (each layer's
            ``w``, ``sub``, ``add``, then ``extra``), NaN where it holds one.
            None where the stack would not run compiled (compilation off,
            unavailable or failed; fewer than 2 rows; a layer too large for one
            chunk; the cap reached): the caller then runs the layers as usual.
        """
        B = x.shape[0]
        spec = (tuple((w.shape[0], w.shape[1], sub is not None, add is not None) for w, sub, add in layers),
                len(extra))
        key = ("linf_stack", "fixed", spec)
        fn = self._compiled.get(key)
        if fn is None and sum(k[1] == "fixed" for k in self._compiled) >= self.max_fixed_shapes:
            return None
        if B < 2 or not layers or not self._compiles_on(x) or \
                B * sum(n * d for n, d, _, _ in spec[0]) < self.min_compiled_work or \
                not all(self._one_chunk(B, n, d, True) for n, d, _, _ in spec[0]):
            return None
        if fn is None:
            # dynamic=None (automatic): a recompile for another reason (the global state it was compiled
            # under, e.g. deterministic algorithms, changed) keeps the batch dynamic, which dynamic=False
            # would specialise again on every later batch size; N and D never vary under one key
            options = _INDUCTOR_OPTIONS if self.compile_backend == "inductor" else None
            fn = self._compiled[key] = torch.compile(_stack_fn(spec), dynamic=None, backend=self.compile_backend,
                                                     options=options)
        tensors = [t for w, sub, add in layers for t in (w, sub, add) if t is not None] + list(extra)
        # The batch is marked dynamic (on a view: the caller's tensor is left alone) on the first call
        # for each dtype and device, the calls that compile; later calls reuse that graph for any batch
        # unmarked (marking costs more than a small layer's kernel), and a recompile keeps it dynamic.
        seen = self._marked.setdefault(key, set())
        if (x.dtype, x.device) not in seen:
            x = x.view(x.shape)
            torch._dynamo.mark_dynamic(x, 0)
            seen.add((x.dtype, x.device))
        try:
            out = fn(x, *tensors)
        except Exception as exc:  # noqa: BLE001  (as in _run: any compile failure -> eager, once)
            self._stop_compiling(exc)
            return None
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
