"""The catalogue of CUDA kernels: sources, NVRTC options, template instances, launch shapes.

One place decides what is compiled and how it is launched, for three users:
the CuPy backend (``cupy.RawModule(code, options, name_expressions)``), the
NVRTC compile test (the same source and options, plus ``--gpu-architecture``)
and the CPU emulation test (the same source under a shim, launched with the
same grids).  Nothing here imports CuPy.

A *module* is one RawModule: a family of kernels for one dtype and one
p-variant, compiled from ``common.cuh`` plus the family's ``.cu`` files:

=============  ======================================  ===================================
family         files                                   kernels (roles)
=============  ======================================  ===================================
linf           linf_forward, linf_backward,            forward, forward_save, resolve, backward,
               scatter_rows                            backward_det
lp (pv)        lp_forward, lp_backward                 forward, backward_x, backward_w
                                                       (+ forward/backward_x/backward_w_precise:
                                                       float, pv 0; + forward_raw: pv 2, 8),
                                                       backward_fused (both
                                                       gradients; + backward_fused_precise:
                                                       float, pv 0)
interval_inf   interval_forward, interval_backward,    forward, forward_save, resolve, backward,
               scatter_rows                            backward_det
interval_lp    interval_forward, interval_backward     forward, backward_box, backward_w
box_argmax     linf_box_argmax                         argmax
=============  ======================================  ===================================

p-variants ``pv``: 1, 2, 8 (exact multiplication chains) and 0 (general p).

``forward_raw`` (pv 2 and 8) sums (x - w)^p without normalisation and marks
each block with an output outside its safe range in an int32 buffer, one
entry per block; ``forward`` then runs with that buffer as its fixup (same
grid and tile, so the same blocks) and recomputes the marked blocks only.
Without the buffer (a null pointer) ``forward`` computes every block.

``backward_det`` (``lp_scatter_rows``) sums the sparse p = inf gradients in a
fixed order, for ``torch.use_deterministic_algorithms(True)``; ``backward``
adds them with atomics (faster, last bits vary from run to run).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

__all__ = ["KERNEL_DIR", "NVRTC_OPTIONS", "DTYPES", "P_VARIANTS", "KERNEL_FAMILIES", "KernelSpec", "ModuleSpec",
           "module_spec", "all_module_specs", "read_source", "full_source", "grid_for", "MAX_GRID_Y", "FAST_GRAD_MAX_P",
           "RAW_P_VARIANTS", "fused_n_splits", "nvrtc_compile", "SCATTER_COLUMNS"]

KERNEL_DIR = Path(__file__).with_name("kernels")
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false")   # every fused multiply-add is explicit (common.cuh)
DTYPES = ("float", "double")
P_VARIANTS = (1, 2, 8, 0)
RAW_P_VARIANTS = (2, 8)      # lp_forward_raw, with lp_forward as its fixup
TILE_THREADS = 16            # LP_TX = LP_TY in common.cuh
THREADS = 256                # LP_THREADS
BK = 16                      # LP_BK
MAX_GRID_Y = 65535
MAX_GRID_Z = 65535
FAST_GRAD_MAX_P = 128.0      # float gradients through lg2/ex2.approx up to this p (error analysis: common.cuh)
SCATTER_COLUMNS = {"float": 32, "double": 16}   # KC of lp_scatter_rows: 33 KiB of shared partials either way

_FAMILY_FILES = {
    "linf": ("linf_forward.cu", "linf_backward.cu", "scatter_rows.cu"),
    "lp": ("lp_forward.cu", "lp_backward.cu"),
    "interval_inf": ("interval_forward.cu", "interval_backward.cu", "scatter_rows.cu"),
    "interval_lp": ("interval_forward.cu", "interval_backward.cu"),
    "box_argmax": ("linf_box_argmax.cu",),
}
KERNEL_FAMILIES = tuple(_FAMILY_FILES)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"common\.cuh"\s*$', re.M)


@dataclass(frozen=True)
class KernelSpec:
    """One template instance and how to launch it.

    ``params`` lists the kernel's parameter kinds in order: ``"T*"`` (a
    tensor of the module dtype, ``None`` allowed where the kernel accepts a
    null pointer), ``"int*"``, ``"int"`` and ``"T"`` (a scalar of the module
    dtype).  ``tile`` is ``(rows, cols)`` of output per block for 2-D tiled
    kernels (grid = (ceil(cols_total / cols), ceil(rows_total / rows)),
    block (16, 16)), or ``None`` for 1-D kernels with 256 threads per block.
    """

    template: str
    ctype: str
    targs: tuple = ()
    params: tuple = ()
    tile: tuple | None = None

    @property
    def name(self) -> str:
        args = [self.ctype] + [("true" if a else "false") if isinstance(a, bool) else str(a) for a in self.targs]
        return f"{self.template}<{', '.join(args)}>"

    @property
    def block(self) -> tuple:
        return (TILE_THREADS, TILE_THREADS, 1) if self.tile else (THREADS, 1, 1)


@dataclass(frozen=True)
class ModuleSpec:
    """One RawModule: ``family`` for ``ctype`` (``"float"``/``"double"``) and p-variant ``pv``."""

    family: str
    ctype: str
    pv: int | None
    kernels: dict = field(hash=False, compare=False)

    @property
    def key(self) -> tuple:
        return (self.family, self.ctype, self.pv)

    @property
    def files(self) -> tuple:
        return _FAMILY_FILES[self.family]

    @property
    def options(self) -> tuple:
        return NVRTC_OPTIONS

    @property
    def source(self) -> str:
        return full_source(self.files)

    @property
    def name_expressions(self) -> tuple:
        return tuple(k.name for k in self.kernels.values())


def read_source(filename: str) -> str:
    """The text of one file under ``kernels/``."""
    return (KERNEL_DIR / filename).read_text()


def full_source(files) -> str:
    """``common.cuh`` followed by ``files``, with their ``#include "common.cuh"`` inlined once.

    Inlining (rather than ``-I``) keeps CuPy's on-disk kernel cache honest: it
    hashes the source text, so an edited header recompiles.
    """
    parts = [f"// ---- common.cuh\n{read_source('common.cuh')}"]
    for name in files:
        parts.append(f"// ---- {name}\n{_INCLUDE.sub('', read_source(name))}")
    return "\n".join(parts)


_TP, _IP, _I, _S = "T*", "int*", "int", "T"


def _tiles(family: str, role: str, ctype: str, pv: int | None = None) -> tuple:
    """Register blocking ``(RA, RB)`` per thread; 16x16 threads per block."""
    if family == "linf" and role == "forward":
        return (8, 8) if ctype == "float" else (4, 4)
    if family == "linf" and role == "forward_save":
        return (8, 4) if ctype == "float" else (4, 4)
    if family == "lp" and role == "forward" and ctype == "double" and pv == 0:
        return (4, 2)  # running max, scale, offset and sum per output: (4, 4) doubles spill registers
    if family == "interval_lp" and role == "backward_w" and ctype == "double":
        return (2, 4)  # six double tiles must stay under 48 KiB of static shared memory
    if family.startswith("interval") and ctype == "double":
        return (4, 2)  # two outputs (or two operands) per element: (4, 4) doubles spill registers
    return (4, 4)


def _fused_backward(ctype: str, pv: int, approx: bool, params: tuple) -> KernelSpec:
    """lp_backward_fused<T, PV, TB, RB, RI, APPROX>: 256 threads as TB x (256 / TB), tile (TB RB, 256 / TB RI).

    float: 8 x 32 threads of 8 x 2 outputs (64 x 64); 4 rows at p = 1 and for the accurate powers, whose
    sign selects / exp2f and log2f spill at 8 rows.  double: 4 x 64 threads of 4 x 1 (16 x 64), so that
    the gw partials (LP_BK x TB x 64 doubles, 32 KiB) and the operand tiles fit 48 KiB of shared memory.
    """
    if ctype == "float":
        tb, rb, ri = 8, (4 if pv == 1 or (pv == 0 and not approx) else 8), 2
    else:
        tb, rb, ri = 4, 4, 1
    return KernelSpec("lp_backward_fused", ctype, (pv, tb, rb, ri, approx), params,
                      (tb * rb, THREADS // tb * ri))


def _build(family: str, ctype: str, pv: int | None) -> dict:
    def tiled(template, role, targs, params):
        ra, rb = _tiles(family, role, ctype, pv)
        return KernelSpec(template, ctype, targs(ra, rb), params, (TILE_THREADS * ra, TILE_THREADS * rb))

    # lp_scatter_rows<T, KC, SOURCES>: out (R, D) from idx0, s0 (and idx1, s1 when SOURCES = 2), all (R, C);
    # KC columns per block (scatter_rows.cu).  p = inf: one argmax per output; intervals: two (near, far)
    det = KernelSpec("lp_scatter_rows", ctype, (SCATTER_COLUMNS[ctype], 1 if family == "linf" else 2),
                     (_IP, _TP, _IP, _TP, _TP, _I, _I, _I))
    if family == "linf":
        return {
            "forward": tiled("linf_forward", "forward", lambda a, b: (a, b, False), (_TP, _TP, _TP, _IP, _I, _I, _I)),
            "forward_save": tiled("linf_forward", "forward_save", lambda a, b: (a, b, True),
                                  (_TP, _TP, _TP, _IP, _I, _I, _I)),
            "resolve": KernelSpec("linf_resolve", ctype, (), (_TP, _TP, _TP, _IP, _I, _I, _I)),
            "backward": KernelSpec("linf_backward", ctype, (), (_TP, _TP, _TP, _IP, _TP, _TP, _I, _I, _I)),
            "backward_det": det,
        }
    if family == "lp":
        bw = (_TP, _TP, _TP, _TP, _TP, _I, _I, _I, _S)
        approx = pv == 0 and ctype == "float"   # hardware log2/exp2 gradients, up to FAST_GRAD_MAX_P
        fw = (_TP, _TP, _TP, _IP, _I, _I, _I, _S)    # x, w, y, redo (null: every block), B, N, D, p
        kernels = {
            "forward": tiled("lp_forward", "forward", lambda a, b: (pv, a, b, approx), fw),
            "backward_x": tiled("lp_backward", "backward", lambda a, b: (pv, a, b, False, approx), bw),
            "backward_w": tiled("lp_backward", "backward", lambda a, b: (pv, a, b, True, approx), bw),
        }
        if pv in RAW_P_VARIANTS:   # the raw sum; its fixup is "forward", so it must share that tile
            kernels["forward_raw"] = tiled("lp_forward_raw", "forward", lambda a, b: (pv, a, b),
                                           (_TP, _TP, _TP, _IP, _I, _I, _I))
        if approx:   # gradients at p above FAST_GRAD_MAX_P: the accurate exp2f/log2f, forward and backward
            kernels["forward_precise"] = tiled("lp_forward", "forward", lambda a, b: (pv, a, b, False), fw)
            kernels["backward_x_precise"] = tiled("lp_backward", "backward", lambda a, b: (pv, a, b, False, False), bw)
            kernels["backward_w_precise"] = tiled("lp_backward", "backward", lambda a, b: (pv, a, b, True, False), bw)
        fused = (_TP,) * 6 + (_I, _I, _I, _S)      # both gradients in one kernel
        kernels["backward_fused"] = _fused_backward(ctype, pv, approx, fused)
        if approx:
            kernels["backward_fused_precise"] = _fused_backward(ctype, pv, False, fused)
        return kernels
    if family == "interval_inf":
        fw = (_TP, _TP, _TP, _TP, _TP, _IP, _I, _I, _I)
        return {
            "forward": tiled("interval_inf_forward", "forward", lambda a, b: (a, b, False), fw),
            "forward_save": tiled("interval_inf_forward", "forward_save", lambda a, b: (a, b, True), fw),
            "resolve": KernelSpec("interval_resolve", ctype, (), (_TP, _TP, _TP, _TP, _TP, _IP, _I, _I, _I)),
            "backward": KernelSpec("interval_inf_backward", ctype, (),
                                   (_TP,) * 7 + (_IP, _TP, _TP, _TP, _I, _I, _I)),
            "backward_det": det,
        }
    if family == "interval_lp":
        return {
            "forward": tiled("interval_lp_forward", "forward", lambda a, b: (pv, a, b),
                             (_TP, _TP, _TP, _TP, _TP, _I, _I, _I, _S)),
            "backward_box": tiled("interval_lp_backward_box", "backward_box", lambda a, b: (pv, a, b),
                                  (_TP,) * 9 + (_I, _I, _I, _S)),
            "backward_w": tiled("interval_lp_backward_w", "backward_w", lambda a, b: (pv, a, b),
                                (_TP,) * 8 + (_I, _I, _I, _S)),
        }
    if family == "box_argmax":
        # six accumulators per output: (4, 2) keeps the double version out of local memory
        ra, rb = (4, 4) if ctype == "float" else (4, 2)
        return {"argmax": KernelSpec("linf_box_argmax", ctype, (ra, rb), (_TP, _TP, _TP, _IP, _I, _I, _I),
                                     (TILE_THREADS * ra, TILE_THREADS * rb))}
    raise ValueError(f"unknown kernel family {family!r}; choose from {KERNEL_FAMILIES}")


@lru_cache(maxsize=None)
def module_spec(family: str, ctype: str, pv: int | None = None) -> ModuleSpec:
    """The module of ``family`` for ``ctype``; ``pv`` only for ``lp`` and ``interval_lp``."""
    if ctype not in DTYPES:
        raise ValueError(f"unknown kernel dtype {ctype!r}; choose from {DTYPES}")
    if family in ("lp", "interval_lp"):
        if pv not in P_VARIANTS:
            raise ValueError(f"{family} needs a p-variant in {P_VARIANTS}, got {pv!r}")
    elif pv is not None:
        raise ValueError(f"{family} takes no p-variant, got {pv!r}")
    return ModuleSpec(family, ctype, pv, _build(family, ctype, pv))


def all_module_specs() -> list:
    """Every module the backend can load (every family x dtype x p-variant)."""
    specs = []
    for family in KERNEL_FAMILIES:
        for ctype in DTYPES:
            for pv in (P_VARIANTS if family in ("lp", "interval_lp") else (None,)):
                specs.append(module_spec(family, ctype, pv))
    return specs


def grid_for(kernel: KernelSpec, rows: int, cols: int = 0) -> tuple:
    """Launch grid: tiled kernels cover ``rows x cols`` outputs; 1-D kernels ``rows`` items.

    For 1-D kernels ``rows`` counts threads' work items (the resolve kernels
    take 16 items per block, the scatter kernels one per thread, capped and
    grid-strided); ``lp_scatter_rows`` takes one block per row and per
    ``KC`` of the ``cols`` columns.
    """
    if kernel.tile:
        gy = -(-rows // kernel.tile[0])
        if gy > MAX_GRID_Y:
            raise ValueError(f"{rows} rows exceed the kernel's grid limit ({MAX_GRID_Y * kernel.tile[0]})")
        return (max(1, -(-cols // kernel.tile[1])), max(1, gy), 1)
    if kernel.template.endswith("resolve"):
        return (max(1, -(-rows // (THREADS // BK))), 1, 1)
    if kernel.template == "lp_scatter_rows":   # one block per row and KC columns
        chunks = -(-cols // kernel.targs[0])
        if chunks > MAX_GRID_Y:
            raise ValueError(f"{cols} columns exceed the kernel's grid limit ({MAX_GRID_Y * kernel.targs[0]})")
        return (max(1, rows), max(1, chunks), 1)
    return (max(1, min(-(-rows // THREADS), 1 << 20)), 1, 1)


FUSED_TARGET_BLOCKS = 1024     # enough blocks for a few waves on a large GPU (132 SMs x 2 blocks)
FUSED_MIN_SPLIT_N = 512        # n per share at least: gx's atomics stay under 1 per 512 triples


def fused_n_splits(kernel: KernelSpec, B: int, N: int, D: int) -> int:
    """How many shares of n ``lp_backward_fused`` gets (``gridDim.z``) for a ``(B, D)`` output.

    Its grid covers gx, ``ceil(B / 64) ceil(D / 64)`` blocks: 640 for the paper's 512 x 5120 layer,
    a fraction of a wave for small batches, while every block runs all of n.  Splitting n into S
    shares multiplies the blocks by S at the price of gx summed by atomics (S per element, into
    zeros; no longer bit-for-bit reproducible).  S brings the grid to about
    :data:`FUSED_TARGET_BLOCKS`, with at least :data:`FUSED_MIN_SPLIT_N` n per share.
    """
    blocks = -(-B // kernel.tile[0]) * -(-D // kernel.tile[1])
    return max(1, min(-(-FUSED_TARGET_BLOCKS // blocks), N // FUSED_MIN_SPLIT_N, MAX_GRID_Z))


def nvrtc_compile(source: str, name_expressions, options, arch: str, name: str = "lp_kernels.cu") -> dict:
    """Compile with NVRTC for ``arch`` (e.g. ``"sm_90"``) without a GPU; return the lowered names.

    Uses ``cupy_backends.cuda.libs.nvrtc`` (CuPy's NVRTC binding).  An
    ``sm_*`` target makes NVRTC produce a cubin, so ptxas limits (shared
    memory, registers) are checked too.

    Raises:
        RuntimeError: the compile failed; the message carries NVRTC's log.
        ImportError: CuPy (or its NVRTC library) is missing.
    """
    from cupy_backends.cuda.libs import nvrtc  # noqa: PLC0415  (optional dependency)

    prog = nvrtc.createProgram(source, name, [], [])
    try:
        for expr in name_expressions:
            nvrtc.addNameExpression(prog, expr)
        try:
            nvrtc.compileProgram(prog, [*options, f"--gpu-architecture={arch}"])
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed for {name} ({arch}): {exc}\n{nvrtc.getProgramLog(prog)}") from exc
        return {expr: nvrtc.getLoweredName(prog, expr) for expr in name_expressions}
    finally:
        nvrtc.destroyProgram(prog)
