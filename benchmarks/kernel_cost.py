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

The hot loop of a kernel is its innermost-but-one loop that contains a
barrier (the loop over shared-memory tiles); inner loops nested in it are
weighted by their trip count.  Per triple it reports instructions issued,
MUFU (special-function) instructions, shared-memory loads and an estimate
of issue cycles per warp on one sm_90 sub-partition: one instruction issues
per cycle, the MUFU unit takes 8 cycles per warp instruction (16 lanes per
SM), integer multiply-adds 2, shared loads 4 per 32-bit word a lane reads
(128 bytes per cycle per SM), and the cycles are the maximum of those
(the pipes run in parallel).  It is a throughput model: latency, occupancy,
global memory and bank conflicts are not in it.

Compiles are cached by source hash (``--cache``, default
``~/.cache/linf_plugin/kernel_cost``): the seed's three files take minutes.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import hashlib
import json
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
from linf_plugin.ops.torch_kernels import p_variant  # noqa: E402

__all__ = ["find_tool", "nvrtc_cubin", "nvcc_cubin", "disassemble", "parse_ptxas_log", "hot_loop_cost",
           "KernelCost", "our_costs", "seed_costs", "VARIANTS", "main"]

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
    """``build() -> (cubin bytes, log str)``, memoised on disk under ``cache`` by ``key``."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    cubin, log = cache / f"{digest}.cubin", cache / f"{digest}.log"
    if cubin.exists() and log.exists():
        return cubin.read_bytes(), log.read_text()
    data, text = build()
    cache.mkdir(parents=True, exist_ok=True)
    for path, content, mode in ((log, text, "w"), (cubin, data, "wb")):   # cubin last: it marks completion
        fd, tmp = tempfile.mkstemp(dir=cache)
        with os.fdopen(fd, mode) as fh:
            fh.write(content)
        os.replace(tmp, path)
    return data, text


def nvrtc_cubin(source: str, name_expressions, options, arch: str = ARCH, cache: Path | None = None):
    """(cubin bytes, ptxas log) of ``source`` compiled by NVRTC for ``arch``.

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
            return cubin.raw, text
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))

    if cache is None:
        return build()
    return _cached(cache, "nvrtc\0" + "\0".join(opts) + "\0" + "\0".join(name_expressions) + "\0" + source, build)


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
    iteration of that loop; loops nested in it run ``inner_trips`` times per
    iteration.  Returns ``instructions``, ``mufu``, ``lds_words``,
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
    nested = [(s, e) for s, e in found if start <= s and e <= end and (s, e) != (start, end)]
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

    def as_dict(self) -> dict:
        return {"kernel": self.name, "mangled": self.mangled, "registers": self.registers,
                "spill_bytes": self.spill_bytes, "stack_bytes": self.stack_bytes, "per_triple": self.per_triple}


def _kernel_costs(cubin: bytes, log: str, names: dict, triples: dict, inner: dict | None = None) -> dict:
    """``{name: KernelCost}`` for ``names`` (readable -> mangled); ``triples[name]`` per hot-loop iteration."""
    code, res = disassemble(cubin), parse_ptxas_log(log)
    out = {}
    for name, mangled in names.items():
        r = res.get(mangled, {})
        per = None
        if triples.get(name):
            per = hot_loop_cost(code[mangled], triples[name], (inner or {}).get(name, 1))
        out[name] = KernelCost(name, mangled, r.get("registers", -1),
                               r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0), r.get("stack_bytes", 0),
                               per)
    return out


def module_costs(spec, cache: Path | None = None, arch: str = ARCH) -> dict:
    """``{role: KernelCost}`` of one catalogue module (every kernel's registers; tiled ones' counts)."""
    from linf_plugin.ops.kernel_specs import nvrtc_compile  # noqa: PLC0415  (lowered names via CuPy's binding)

    lowered = nvrtc_compile(spec.source, spec.name_expressions, spec.options, arch)
    cubin, log = nvrtc_cubin(spec.source, spec.name_expressions, spec.options, arch, cache)
    names = {role: lowered[k.name] for role, k in spec.kernels.items()}
    triples = {role: k.tile[0] * k.tile[1] // 256 * BK for role, k in spec.kernels.items() if k.tile}
    return _kernel_costs(cubin, log, names, triples)


def _our_plan(p: float) -> dict:
    """Which of our float kernels run for ``lp_dist`` at ``p``: ``{"fwd": [...], "bwd": [...]}`` of (family, pv, role)."""
    if math.isinf(p):
        return {"fwd": [("linf", None, "forward")],
                "fwd_grad": [("linf", None, "forward_save")], "bwd": []}
    pv = p_variant(p)
    from linf_plugin.ops.cupy_backend import CupyBackend  # noqa: PLC0415

    return CupyBackend.kernel_plan(p)


def our_costs(cache: Path | None = None) -> dict:
    """Per variant p: the kernels of forward and backward with their counts (float32, sm_90)."""
    result = {}
    modules = {}
    for p in VARIANTS:
        plan = _our_plan(p)
        entry = {}
        for mode, steps in plan.items():
            rows = []
            for family, pv, role in steps:
                key = (family, pv)
                if key not in modules:
                    modules[key] = module_costs(module_spec(family, "float", pv), cache)
                rows.append(modules[key][role])
            entry[mode] = rows
        result[p] = entry
    return result


# -- the seed's kernels ----------------------------------------------------------
# What the seed launches for a fully connected layer (HW = 1, D and N multiples
# of 32: has_hw = false, check_ci = false), read off core/cuda/norm_dist.cpp and
# the helper macros, with the triples one thread handles per hot-loop iteration.
def _seed_plan(p: float) -> dict:
    if math.isinf(p):
        return {"fwd": [("inf_dist_forward_kernel", "nograd")], "fwd_grad": [("inf_dist_forward_kernel", "pos")],
                "bwd": []}
    ip = int(p) if p == int(p) and 0 <= p <= 8 else -1
    ipb = int(p - 1) if p - 1 == int(p - 1) and 0 <= p - 1 <= 8 else -1
    fwd = ("norm_dist_forward_kernel", f"with_max<{ip}>") if p <= 10 else ("norm_dist_forward_kernel", f"tiles<{ip}>")
    return {"fwd": [fwd], "fwd_grad": [fwd], "bwd": [("norm_dist_backward_input_weight_kernel", f"<{ipb}>")]}


def _seed_instance(template: str, which: str, names: list) -> tuple:
    """The mangled name of the instance the seed launches, its triples per hot-loop iteration, inner trips."""
    def pick(pattern):
        hits = [n for n in names if re.fullmatch(pattern, n)]
        if len(hits) != 1:
            raise RuntimeError(f"seed kernel {template} {which}: {len(hits)} matches for {pattern}")
        return hits[0]

    def ip_code(ip):
        return f"Lin{-ip}E" if ip < 0 else f"Li{ip}E"

    if template == "inf_dist_forward_kernel":
        # forward_nograd / forward: <has_hw, check_ci, [ci_split,] GROUP_CI, GROUP_CO, GROUP_B>
        cands = [n for n in names if n.startswith("_Z23inf_dist_forward_kernel")]
        return cands, None, None
    ip = int(re.search(r"<(-?\d+)>", which).group(1))
    if template == "norm_dist_forward_kernel" and which.startswith("with_max"):
        # <ip, has_hw=false, has_max=false, check_ci=false, GROUP_CO, GROUP_B=4>, pointer max_output argument
        group_co = 4 if ip >= 0 else 2
        m = pick(rf"_Z24norm_dist_forward_kernelI{ip_code(ip)}Lb0ELb0ELb0ELi{group_co}ELi4EEvPKfS1_S1_iiiiiPff")
        return m, BK * group_co * 4, 1
    if template == "norm_dist_forward_kernel":
        # <ip, has_hw=false, check_ci=false, GROUP_CI=2, GROUP_CO=2, GROUP_B=4>: per 32-deep tile, a max loop
        # (unrolled by 4, 4 trips per 16 coordinates) then the sum, unrolled
        m = pick(rf"_Z24norm_dist_forward_kernelI{ip_code(ip)}Lb0ELb0ELi2ELi2ELi4EEvPKfS1_iiiiiPff")
        return m, 2 * BK * 2 * 4, 4
    # backward_input_weight <ip, has_hw=false, multiple_co_block=true, GROUP_CI=4, GROUP_B=2, 64>
    m = pick(rf"_Z38norm_dist_backward_input_weight_kernelI{ip_code(ip)}Lb0ELb1ELi4ELi2ELi64EEvPKfS1_S1_S1_iiiiiPfS2_fi")
    return m, None, None


def seed_costs(seed_repo: Path, cache: Path | None = None) -> dict:
    """Per variant p: the seed's kernels (fully connected layer) with the same counts as ours."""
    seed_repo = Path(seed_repo)
    cuda = seed_repo / "core" / "cuda"
    if not (cuda / "norm_dist_cuda.cu").exists():
        raise FileNotFoundError(f"{cuda}/norm_dist_cuda.cu not found: --seed-repo must be an L_inf-dist-net-v2 checkout")
    codes, logs = {}, {}
    for f in SEED_FILES:
        cubin, log = nvcc_cubin(cuda / f, cache=cache)
        codes.update(disassemble(cubin))
        logs.update(parse_ptxas_log(log))
    names = list(codes)
    result = {}
    for p in VARIANTS:
        entry = {}
        for mode, steps in _seed_plan(p).items():
            rows = []
            for template, which in steps:
                rows.append(_seed_kernel_cost(template, which, names, codes, logs))
            entry[mode] = rows
        result[p] = entry
    return result


def _seed_kernel_cost(template, which, names, codes, logs) -> KernelCost:
    if template == "inf_dist_forward_kernel":
        return _seed_inf_cost(which, names, codes, logs)
    if template == "norm_dist_backward_input_weight_kernel":
        mangled, _, _ = _seed_instance(template, which, names)
        # hot loop: the t loop (no barrier), 16 / 4 trips of 4 steps x GROUP_CI 4 x GROUP_B 2 triples
        code = codes[mangled]
        per = _innermost_cost(code, triples=4 * 4 * 2)
        r = logs.get(mangled, {})
        return KernelCost(f"{template}{which}", mangled, r.get("registers", -1),
                          r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0), r.get("stack_bytes", 0), per)
    mangled, triples, inner = _seed_instance(template, which, names)
    r = logs.get(mangled, {})
    return KernelCost(f"{template}{which}", mangled, r.get("registers", -1),
                      r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0), r.get("stack_bytes", 0),
                      hot_loop_cost(codes[mangled], triples, inner))


def _innermost_cost(code: list, triples: int) -> dict:
    """Counts per triple in the largest loop with no loop inside (for kernels whose hot loop has no barrier)."""
    found = loops(code)
    inner = [(s, e) for s, e in found if not any(s < s2 and e2 <= e for s2, e2 in found if (s2, e2) != (s, e))]
    start, end = max(inner, key=lambda r: r[1] - r[0])
    marked = code[:start] + ["BAR.SYNC.MARK"] + code[start:end + 1] + [code[end]]
    # reuse hot_loop_cost's counting on the one loop: rebuild a range with a barrier marker
    sub = [".L_x_hot:"] + code[start:end + 1] + ["BAR.SYNC.MARK", "BRA `(.L_x_hot)"]
    del marked
    per = hot_loop_cost(sub, triples)
    per["instructions"] -= 2 / triples      # the marker and the extra branch
    per["loop_instructions"] -= 2
    per["cycles"] = max(per["instructions"], MUFU_CYCLES * per["mufu"], HALF_RATE_CYCLES * per["half_rate"],
                        LDS_CYCLES_PER_WORD * per["lds_words"])
    return per
