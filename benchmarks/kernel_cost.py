"""A GPU-free cost model of the CUDA kernels: sm_90 machine code, counted per (b, n, i) triple.

    python benchmarks/kernel_cost.py                              # ours only
    python benchmarks/kernel_cost.py --seed-repo /path/to/L_inf-dist-net-v2 \\
        --out benchmarks/results/kernel_cost.json                 # ours and the seed's, variant by variant

Our kernels are compiled exactly as the CuPy backend compiles them (the
catalogue of :mod:`linf_plugin.ops.kernel_specs`) with NVRTC to an sm_90
cubin (``--ptxas-options=-v`` reports registers and spills); the seed's
``core/cuda/*.cu`` mix host and device code, so they go through nvcc
(``-cubin -arch=sm_90 -O3``, the flags the seed is built with).  Both cubins
are disassembled with nvdisasm (PyPI ``nvidia-cuda-nvdisasm``,
``nvidia-cuda-nvcc``).

The hot loop of a kernel is its innermost loop that contains a barrier (the
loop over shared-memory tiles); the k-loops nested in it (those reading
shared memory) are weighted by their trip count, tile-copy loops by one.  Per triple it reports instructions issued,
MUFU (special-function) instructions, shared-memory loads and an estimate
of issue cycles per warp on one sm_90 sub-partition: one instruction issues
per cycle, the MUFU unit takes 8 cycles per warp instruction (16 lanes per
SM), integer multiply-adds 2, shared loads 4 per 32-bit word a lane reads
(128 bytes per cycle per SM), and the cycles are the maximum of those
(the pipes run in parallel).  It is a throughput model: latency, occupancy,
global memory and bank conflicts are not in it.  For p = 2 and 8 our forward
is the raw sum (``lp_forward_raw``) followed by a fixup launch of the
normalising ``lp_forward`` that returns before its hot loop in every block
the raw sum did not flag; the fixup is listed (registers, spills, its hot
loop) but not added to the totals.

Compiles are cached by source hash (``--cache``, default
``~/.cache/linf_plugin/kernel_cost``): the seed's three files take minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from linf_plugin.io import atomic_write_json  # noqa: E402
from linf_plugin.ops.kernel_specs import BK, module_spec  # noqa: E402

__all__ = ["find_tool", "lowered_names", "nvrtc_cubin", "nvcc_cubin", "disassemble", "parse_ptxas_log", "loops", "hot_loop_cost",
           "scan_loop_cost", "KernelCost", "MODES", "DET_MODES", "module_costs", "our_costs", "seed_plan", "seed_costs", "totals", "report", "VARIANTS",
           "main"]

ARCH = "sm_90"
MUFU_CYCLES = 8        # sm_90: 16 MUFU lanes per SM, 4 per sub-partition -> 8 cycles per warp instruction
HALF_RATE_CYCLES = 2   # IMAD and friends: 16 lanes per sub-partition
LDS_CYCLES_PER_WORD = 4  # 128 B/cycle of shared memory per SM shared by 4 sub-partitions
VARIANTS = (8.0, 8.5, 100.0, math.inf)
SEED_FILES = ("norm_dist_cuda.cu", "inf_dist_cuda.cu")
_DEFAULT_CACHE = Path.home() / ".cache" / "linf_plugin" / "kernel_cost"


# -- tools ---------------------------------------------------------------------
def find_tool(name: str) -> str | None:
    """``name`` (nvdisasm, nvcc) from the PyPI NVIDIA wheels on sys.path, then PATH, then /usr/local/cuda*."""
    for entry in sys.path:
        for path in sorted(glob.glob(os.path.join(entry, "nvidia", "cu*", "bin", name)), reverse=True):
            if os.access(path, os.X_OK):
                return path
    found = shutil.which(name)
    if found:
        return found
    for path in sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"), reverse=True):
        if os.access(path, os.X_OK):
            return path
    return None


def _libnvrtc() -> ctypes.CDLL:
    candidates = []
    for entry in sys.path:
        candidates += sorted(glob.glob(os.path.join(entry, "nvidia", "cu*", "lib", "libnvrtc.so*")))
    candidates += ["libnvrtc.so"]
    for lib in candidates:
        if "builtins" in lib:
            continue
        try:
            return ctypes.CDLL(lib)
        except OSError:
            continue
    raise RuntimeError("libnvrtc not found: install the CUDA wheels (torch with CUDA, or nvidia-cuda-nvrtc)")


def _cached(cache: Path, key: str, build):
    """``build() -> (cubin bytes, log str)``, memoised on disk under ``cache`` by ``key``.

    Processes sharing ``cache`` (pytest-xdist workers: the NVRTC tests and the cost model compile the same
    modules) wait for each other's build of one key when ``filelock`` is installed, instead of repeating it.
    """
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    cubin, log = cache / f"{digest}.cubin", cache / f"{digest}.log"
    cache.mkdir(parents=True, exist_ok=True)
    try:
        from filelock import FileLock  # noqa: PLC0415  (optional: a test dependency)
        lock = FileLock(str(cache / f"{digest}.lock"))
    except ImportError:
        lock = contextlib.nullcontext()
    with lock:
        if cubin.exists() and log.exists():
            return cubin.read_bytes(), log.read_text()
        data, text = build()
        for path, content, mode in ((log, text, "w"), (cubin, data, "wb")):   # cubin last: it marks completion
            fd, tmp = tempfile.mkstemp(dir=cache)
            with os.fdopen(fd, mode) as fh:
                fh.write(content)
            os.replace(tmp, path)
    return data, text


def lowered_names(log: str) -> dict:
    """``{name expression: mangled name}`` recorded in an :func:`nvrtc_cubin` log."""
    return dict(m.groups() for m in re.finditer(r"^// lowered: (.+) -> (\S+)$", log, re.M))


def nvrtc_cubin(source: str, name_expressions, options, arch: str = ARCH, cache: Path | None = None):
    """(cubin bytes, ptxas log) of ``source`` compiled by NVRTC for ``arch``; the log ends with the
    expressions' mangled names (:func:`lowered_names`).

    Calls libnvrtc through ctypes: CuPy's ``getCUBIN`` binding drops the
    last byte of the image, which nvdisasm then rejects.
    """
    opts = [*options, f"--gpu-architecture={arch}", "--ptxas-options=-v"]

    def build():
        lib = _libnvrtc()
        prog = ctypes.c_void_p()
        if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernels.cu", 0, None, None):
            raise RuntimeError("nvrtcCreateProgram failed")
        try:
            for expr in name_expressions:
                lib.nvrtcAddNameExpression(prog, expr.encode())
            raw = [o.encode() for o in opts]
            status = lib.nvrtcCompileProgram(prog, len(raw), (ctypes.c_char_p * len(raw))(*raw))
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            text = log.value.decode(errors="replace")
            if status:
                raise RuntimeError(f"NVRTC failed ({arch}):\n{text}")
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
            cubin = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetCUBIN(prog, cubin)
            # the mangled name of each expression, as "// lowered: EXPR -> NAME" lines after the log
            for expr in name_expressions:
                name = ctypes.c_char_p()
                lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(name))
                text += f"\n// lowered: {expr} -> {name.value.decode()}"
            return cubin.raw, text
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))

    if cache is None:
        return build()
    return _cached(cache, "nvrtc-lowered\0" + "\0".join(opts) + "\0" + "\0".join(name_expressions) + "\0" + source, build)


def nvcc_cubin(path: Path, arch: str = ARCH, cache: Path | None = None, nvcc: str | None = None):
    """(cubin bytes, ptxas log) of a ``.cu`` file with host code, through nvcc (g++ as the host compiler)."""
    nvcc = nvcc or find_tool("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found: pip install nvidia-cuda-nvcc")
    path = Path(path)
    args = ["-cubin", f"-arch={arch}", "-O3", "-ccbin", shutil.which("g++") or "g++", "-Xptxas", "-v",
            f"-I{path.parent}"]

    def build():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.cubin"
            proc = subprocess.run([nvcc, *args, "-o", str(out), str(path)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed for {path.name}:\n{proc.stderr[-4000:]}")
            return out.read_bytes(), proc.stdout + proc.stderr

    if cache is None:
        return build()
    headers = "".join(p.read_text() for p in sorted(path.parent.glob("*.h*")))
    return _cached(cache, "nvcc\0" + "\0".join(args) + "\0" + path.read_text() + headers, build)


# -- machine code --------------------------------------------------------------
_FUNC = re.compile(r"^\s*\.text\.(\S+):\s*$")
_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def disassemble(cubin: bytes, nvdisasm: str | None = None) -> dict:
    """``{mangled name: [instruction or label line]}`` of every kernel in ``cubin``.

    Labels are kept as ``".L_x_N:"`` entries; instructions are the opcode
    text without address and encoding (predicate included, e.g.
    ``"@!P0 BRA `(.L_x_3)"``).
    """
    nvdisasm = nvdisasm or find_tool("nvdisasm")
    if nvdisasm is None:
        raise RuntimeError("nvdisasm not found: pip install nvidia-cuda-nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        proc = subprocess.run([nvdisasm, "-c", fh.name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {proc.stderr.strip()}")
    funcs, current = {}, None
    for line in proc.stdout.splitlines():
        m = _FUNC.match(line)
        if m:
            current = funcs.setdefault(m.group(1), [])
            continue
        if current is None:
            continue
        m = _LABEL.match(line.strip())
        if m:
            current.append(m.group(1) + ":")
            continue
        m = _INSTR.match(line)
        if m:
            current.append(m.group(1))
    return funcs


_PTXAS_FN = re.compile(r"Compiling entry function '(\S+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict:
    """``{mangled name: {registers, stack_bytes, spill_store_bytes, spill_load_bytes}}`` from ptxas -v."""
    out, current = {}, None
    for line in log.splitlines():
        m = _PTXAS_FN.search(line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            current.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                           spill_load_bytes=int(m.group(3)))
        m = _PTXAS_REGS.search(line)
        if m:
            current["registers"] = int(m.group(1))
    return out


def _opcode(instr: str) -> str:
    parts = instr.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def loops(code: list) -> list:
    """``[(start, end)]`` index ranges of loops: a label and a later branch back to it (self-loops excluded)."""
    where = {line[:-1]: i for i, line in enumerate(code) if line.endswith(":")}
    found = []
    for i, line in enumerate(code):
        m = _BRANCH.search(line)
        if m and m.group(1) in where and where[m.group(1)] < i - 1:
            found.append((where[m.group(1)], i))
    return found


def hot_loop_cost(code: list, triples: int, inner_trips: int = 1) -> dict:
    """Counts per triple in the hot loop: the largest loop that contains a barrier and no other such loop.

    ``triples`` is the number of (b, n, i) triples one thread handles per
    iteration of that loop; loops nested in it that read shared memory run
    ``inner_trips`` times per iteration, the others (tile copies) once.  Returns ``instructions``, ``mufu``, ``lds_words``,
    ``half_rate``, ``cycles`` (per triple, per warp, on one sub-partition)
    and ``loop_instructions`` (static length of the hot loop).
    """
    found = loops(code)
    with_bar = [(s, e) for s, e in found if any(_opcode(code[j]).startswith("BAR") for j in range(s, e + 1))]
    if not with_bar:
        raise ValueError("no loop with a barrier: not a tiled kernel")
    innermost = [(s, e) for s, e in with_bar if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e)
                                                         for s2, e2 in with_bar)]
    start, end = max(innermost, key=lambda r: r[1] - r[0])
    # nested loops that read shared memory are the k-loops (LP_SUM_UNROLL, the seed's unroll(4)); the
    # others copy a tile to shared memory, unrolled to one trip per tile
    nested = [(s, e) for s, e in found if start <= s and e <= end and (s, e) != (start, end)
              and any(_opcode(code[j]).startswith("LDS") for j in range(s, e + 1))]
    counts = {"instructions": 0.0, "mufu": 0.0, "lds_words": 0.0, "half_rate": 0.0}
    static = 0
    for j in range(start, end + 1):
        line = code[j]
        if line.endswith(":"):
            continue
        static += 1
        weight = inner_trips if any(s <= j <= e for s, e in nested) else 1
        op = _opcode(line)
        counts["instructions"] += weight
        if op.startswith("MUFU"):
            counts["mufu"] += weight
        if op.startswith("LDS"):
            width = {"64": 2, "128": 4}.get(op.rsplit(".", 1)[-1], 1)
            counts["lds_words"] += weight * width
        if op.startswith(("IMAD", "IMUL")) and op not in ("IMAD.MOV", "IMAD.MOV.U32", "IMAD.IADD", "IMAD.SHL.U32"):
            counts["half_rate"] += weight
    per = {k: v / triples for k, v in counts.items()}
    per["cycles"] = max(per["instructions"], MUFU_CYCLES * per["mufu"], HALF_RATE_CYCLES * per["half_rate"],
                        LDS_CYCLES_PER_WORD * per["lds_words"])
    per["loop_instructions"] = static
    return per


def scan_loop_cost(code: list, columns: int, loads_per_entry: int) -> dict:
    """Counts per triple of lp_scatter_rows: its loop over entries (the longest loop that reads global memory
    and holds no barrier), where each entry (r, c) is tested against ``columns`` (KC) coordinates and costs
    ``loads_per_entry`` global loads, which give the loop's unrolling.  Same keys as :func:`hot_loop_cost`."""
    found = loops(code)
    scans = [(s, e) for s, e in found
             if not any(_opcode(code[j]).startswith("BAR") for j in range(s, e + 1))
             and any(_opcode(code[j]).startswith("LDG") for j in range(s, e + 1))]
    if not scans:
        raise ValueError("no loop that reads global memory without a barrier")
    start, end = max(scans, key=lambda r: r[1] - r[0])
    counts = {"instructions": 0.0, "mufu": 0.0, "lds_words": 0.0, "half_rate": 0.0}
    static = 0
    for j in range(start, end + 1):
        if code[j].endswith(":"):
            continue
        static += 1
        op = _opcode(code[j])
        counts["instructions"] += 1
        counts["mufu"] += op.startswith("MUFU")
        if op.startswith("LDS"):
            counts["lds_words"] += {"64": 2, "128": 4}.get(op.rsplit(".", 1)[-1], 1)
        if op.startswith(("IMAD", "IMUL")) and op not in ("IMAD.MOV", "IMAD.MOV.U32", "IMAD.IADD", "IMAD.SHL.U32"):
            counts["half_rate"] += 1
    loads = sum(_opcode(code[j]).startswith("LDG") for j in range(start, end + 1))
    if loads % loads_per_entry:
        raise ValueError(f"{loads} global loads in the loop: not a whole number of {loads_per_entry}-load entries")
    triples = columns * loads // loads_per_entry
    per = {k: v / triples for k, v in counts.items()}
    per["cycles"] = max(per["instructions"], MUFU_CYCLES * per["mufu"], HALF_RATE_CYCLES * per["half_rate"],
                        LDS_CYCLES_PER_WORD * per["lds_words"])
    per["loop_instructions"] = static
    return per


# -- our kernels ---------------------------------------------------------------
@dataclass
class KernelCost:
    """One kernel's resources and, for tiled kernels, its hot-loop counts per triple."""

    name: str
    mangled: str
    registers: int
    spill_bytes: int
    stack_bytes: int
    per_triple: dict | None
    fixup: bool = False

    def as_dict(self) -> dict:
        d = {"kernel": self.name, "mangled": self.mangled, "registers": self.registers,
             "spill_bytes": self.spill_bytes, "stack_bytes": self.stack_bytes, "per_triple": self.per_triple}
        if self.fixup:
            d["fixup"] = True
            d["note"] = ("the fixup launch after the raw sum: blocks the raw sum did not flag return before the "
                         "hot loop (ordinary data: all of them), so its per-triple counts are not in the totals")
        return d


def _resources(res: dict, mangled: str) -> dict:
    r = res.get(mangled)
    if r is None or "registers" not in r:
        raise RuntimeError(f"ptxas reported nothing for {mangled}")
    return {"registers": r["registers"], "spill_bytes": r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0),
            "stack_bytes": r.get("stack_bytes", 0)}


def _sum_unroll() -> int:
    """LP_SUM_UNROLL of common.cuh: the unrolling of the k-loops nested in our hot loops."""
    from linf_plugin.ops.kernel_specs import read_source  # noqa: PLC0415

    m = re.search(r"#define\s+LP_SUM_UNROLL\s+(\d+)", read_source("common.cuh"))
    if m is None:
        raise RuntimeError("LP_SUM_UNROLL not found in common.cuh")
    return int(m.group(1))


def module_costs(spec, cache: Path | None = None, arch: str = ARCH) -> dict:
    """``{role: KernelCost}`` of one catalogue module: every kernel's registers and spills; tiled kernels'
    per-triple counts (one thread handles ``tile_rows * tile_cols / 256 * LP_BK`` triples per tile)."""
    cubin, log = nvrtc_cubin(spec.source, spec.name_expressions, spec.options, arch, cache)
    lowered = lowered_names(log)
    code, res = disassemble(cubin), parse_ptxas_log(log)
    trips = BK // _sum_unroll()
    out = {}
    for role, k in spec.kernels.items():
        mangled = lowered[k.name]
        if k.tile:
            per = hot_loop_cost(code[mangled], k.tile[0] * k.tile[1] // 256 * BK, trips)
        elif k.template == "lp_scatter_rows":      # the fixed-order p = inf gradient sums: KC coordinates per entry
            per = scan_loop_cost(code[mangled], k.targs[0], 2 * k.targs[1])
        else:
            per = None                             # per output (resolve, atomic scatter): O(B N), not O(B N D)
        out[role] = KernelCost(k.name, mangled, per_triple=per, **_resources(res, mangled))
    return out


MODES = ("fwd", "bwd", "fwd+bwd")
# under torch.use_deterministic_algorithms(True): no atomics (CupyBackend.kernel_plan(deterministic=True))
DET_MODES = ("bwd det", "fwd+bwd det")


def our_costs(cache: Path | None = None, ps=VARIANTS) -> dict:
    """``{p: {mode: [KernelCost]}}`` for each of :data:`MODES`: the float32 kernels lp_dist launches
    (``"bwd"``: both gradients, the fused kernel at finite p).

    Steps the plan lists as ``"fixup"`` (p = 2, 8: the normalising forward after the raw sum, which
    returns at once in every block the raw sum did not flag) carry ``fixup=True`` and stay out of
    :func:`totals`: on ordinary data their hot loop does not run.
    """
    from dataclasses import replace  # noqa: PLC0415

    from linf_plugin.ops.cupy_backend import CupyBackend  # noqa: PLC0415

    modules, result = {}, {}
    for p in ps:
        plan = CupyBackend.kernel_plan(p)
        det = CupyBackend.kernel_plan(p, deterministic=True)
        fixups = set(plan.get("fixup", ()))
        rows = {}
        for mode, steps in (("fwd", plan["fwd"]), ("bwd", plan["bwd"]), ("fwd+bwd", plan["fwd_grad"] + plan["bwd"]),
                            ("bwd det", det["bwd"]), ("fwd+bwd det", det["fwd_grad"] + det["bwd"])):
            rows[mode] = []
            for family, pv, role in steps:
                if (family, pv) not in modules:
                    modules[(family, pv)] = module_costs(module_spec(family, "float", pv), cache)
                cost = modules[(family, pv)][role]
                rows[mode].append(replace(cost, fixup=True) if (family, pv, role) in fixups else cost)
        result[p] = rows
    return result


# -- the seed's kernels ----------------------------------------------------------
# What the seed launches for a fully connected layer of these sizes (HW = 1;
# D and N multiples of 32, so check_ci = false; B = 512 and N = 5120 make the
# no-grad p = inf forward split D, ci_split = true), read off
# core/cuda/norm_dist.cpp and the launch macros: the mangled instance, the
# triples one thread handles per iteration of its hot loop, and the trips of
# the loops nested in it (the unroll(4) loops over 16 or 32 coordinates).
def _seed_norm_fwd(p: float) -> tuple:
    ip = int(p) if p == int(p) and 0 <= p <= 8 else -1
    code = f"Li{ip}E" if ip >= 0 else "Lin1E"
    if p <= 10:   # forward_with_max(max = null): <ip, has_hw, has_max, check_ci, GROUP_CO, GROUP_B = 4>, one pass
        group_co = 4 if ip >= 0 else 2
        return (f"_Z24norm_dist_forward_kernelI{code}Lb0ELb0ELb0ELi{group_co}ELi4EEvPKfS1_S1_iiiiiPff",
                BK * group_co * 4, 1)
    # <ip, has_hw, check_ci, GROUP_CI = 2, GROUP_CO = 2, GROUP_B = 4>: per 32 coordinates a max loop then the sum
    return f"_Z24norm_dist_forward_kernelI{code}Lb0ELb0ELi2ELi2ELi4EEvPKfS1_iiiiiPff", 2 * BK * 2 * 4, 4


def _seed_norm_bwd(p: float) -> tuple:
    ip = int(p - 1) if p - 1 == int(p - 1) and 0 <= p - 1 <= 8 else -1
    code = f"Li{ip}E" if ip >= 0 else "Lin1E"
    # <ip, has_hw, multiple_co_block, GROUP_CI = 4, GROUP_B = 2, 64>: per 32 output columns 16 t-steps
    # (unroll 4: 4 trips) of 4 x 2 triples, both gradients from one power
    return (f"_Z38norm_dist_backward_input_weight_kernelI{code}Lb0ELb1ELi4ELi2ELi64EEvPKfS1_S1_S1_iiiiiPfS2_fi",
            BK * 4 * 2, 4)


def seed_plan(p: float) -> dict:
    """``{"fwd": [...], "bwd": [...], "fwd+bwd": [...]}`` of (mangled name, triples per hot-loop iteration,
    nested trips);
    a ``None`` triple count marks a kernel whose work is per output, not per triple."""
    if math.isinf(p):
        nograd = ("_Z23inf_dist_forward_kernelILb0ELb0ELb1ELi1ELi4ELi4EEvPKfS1_iiiiiPf", BK * 4 * 4, 1)
        withpos = ("_Z23inf_dist_forward_kernelILb0ELb0ELi1ELi4ELi4EEvPKfS1_iiiiiPfPi", BK * 4 * 4, 1)
        scatter = ("_Z37inf_dist_backward_input_weight_kernelILb0ELi32ELi16EEvPKfPKiiiiiiPfS4_", None, 1)
        return {"fwd": [nograd], "bwd": [scatter], "fwd+bwd": [withpos, scatter]}
    fwd, bwd = _seed_norm_fwd(p), _seed_norm_bwd(p)
    return {"fwd": [fwd], "bwd": [bwd], "fwd+bwd": [fwd, bwd]}


def seed_costs(seed_repo: Path, cache: Path | None = None, ps=VARIANTS) -> dict:
    """Per variant p, the seed's kernels (fully connected layer) with the same counts as ours."""
    cuda = Path(seed_repo) / "core" / "cuda"
    if not (cuda / "norm_dist_cuda.cu").exists():
        raise FileNotFoundError(f"{cuda / 'norm_dist_cuda.cu'} not found: --seed-repo must be an L_inf-dist-net-v2 "
                                "checkout")
    code, res = {}, {}
    for name in SEED_FILES:
        cubin, log = nvcc_cubin(cuda / name, cache=cache)
        code.update(disassemble(cubin))
        res.update(parse_ptxas_log(log))
    result = {}
    for p in ps:
        rows = {}
        for mode, steps in seed_plan(p).items():
            rows[mode] = []
            for mangled, triples, trips in steps:
                if mangled not in code:
                    raise RuntimeError(f"the seed's cubin has no {mangled}: its launch configuration changed?")
                per = hot_loop_cost(code[mangled], triples, trips) if triples else None
                rows[mode].append(KernelCost(mangled.split("I", 1)[0][4:], mangled, per_triple=per,
                                             **_resources(res, mangled)))
        result[p] = rows
    return result


# -- report ----------------------------------------------------------------------
def totals(kernels: list) -> dict:
    """Per-triple sums over the tiled kernels of one mode (the per-output kernels add O(B N) work only;
    fixup launches, which exit before their hot loop on ordinary data, are left out)."""
    keys = ("instructions", "mufu", "lds_words", "cycles")
    return {k: round(sum(c.per_triple[k] for c in kernels if c.per_triple and not c.fixup), 3) for k in keys}


def _label(p: float) -> str:
    return "inf" if math.isinf(p) else f"{p:g}"


def report(ours: dict, seed: dict | None) -> dict:
    rows = []
    for p in ours:
        for mode in MODES + DET_MODES:
            row = {"p": _label(p), "mode": mode, "ours": totals(ours[p][mode]),
                   "ours_kernels": [c.as_dict() for c in ours[p][mode]]}
            if seed is not None and mode in MODES:
                row["seed"] = totals(seed[p][mode])
                row["seed_kernels"] = [c.as_dict() for c in seed[p][mode]]
                ours_cycles = row["ours"]["cycles"]     # 0 for p = inf "bwd": scatters, no per-triple work
                row["cycles_seed_over_ours"] = round(row["seed"]["cycles"] / ours_cycles, 3) if ours_cycles else None
            rows.append(row)
    return {"rows": rows}


def print_table(result: dict) -> None:
    seed = any("seed" in r for r in result["rows"])
    head = f"{'p':>5} {'mode':>11} | {'ours instr':>10} {'mufu':>5} {'cycles':>6}"
    if seed:
        head += f" | {'seed instr':>10} {'mufu':>5} {'cycles':>6} | {'seed/ours':>9}"
    print(head)
    for r in result["rows"]:
        o = r["ours"]
        line = f"{r['p']:>5} {r['mode']:>11} | {o['instructions']:10.2f} {o['mufu']:5.2f} {o['cycles']:6.2f}"
        if "seed" in r:
            s = r["seed"]
            ratio = r["cycles_seed_over_ours"]
            line += (f" | {s['instructions']:10.2f} {s['mufu']:5.2f} {s['cycles']:6.2f} | "
                     + (f"{ratio:9.2f}" if ratio is not None else f"{'-':>9}"))
        print(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed-repo", type=Path, help="a checkout of L_inf-dist-net-v2 (compiles core/cuda with nvcc)")
    ap.add_argument("--out", type=Path, help="JSON path (e.g. benchmarks/results/kernel_cost.json)")
    ap.add_argument("--cache", type=Path, default=_DEFAULT_CACHE, help="compile cache directory")
    args = ap.parse_args(argv)
    for tool in ("nvdisasm",) + (("nvcc",) if args.seed_repo else ()):
        if find_tool(tool) is None:
            ap.error(f"{tool} not found: pip install nvidia-cuda-{'nvdisasm' if tool == 'nvdisasm' else 'nvcc'}")
    ours = our_costs(args.cache)
    seed = seed_costs(args.seed_repo, args.cache) if args.seed_repo else None
    result = {"benchmark": "kernel_cost", "arch": ARCH, "dtype": "float32",
              "model": {"mufu_cycles": MUFU_CYCLES, "half_rate_cycles": HALF_RATE_CYCLES,
                        "lds_cycles_per_word": LDS_CYCLES_PER_WORD,
                        "note": "per (b, n, i) triple, per warp on one sm_90 sub-partition; hot loop only; "
                                "p = 2, 8 count the raw-sum forward (lp_forward_raw): its fixup launch "
                                "(lp_forward, marked fixup) exits before its hot loop in every block the "
                                "raw sum did not flag, i.e. everywhere on ordinary data; 'bwd det' and 'fwd+bwd det': "
                                "the kernels under torch.use_deterministic_algorithms(True) (finite p: the two "
                                "single-gradient kernels; p = inf: lp_scatter_rows twice, its scan loop counted per "
                                "entry and coordinate of its column chunk, the tree reduction not counted), "
                                "where the default p = inf backward (atomics, per output) counts 0"},
           "tools": {"nvdisasm": find_tool("nvdisasm"), "nvcc": find_tool("nvcc") if args.seed_repo else None},
           **report(ours, seed)}
    print_table(result)
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
