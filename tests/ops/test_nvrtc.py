"""Every CUDA kernel, in every variant, compiles with NVRTC for every supported GPU (no GPU needed).

Supported: compute capability 7.5 and up.  The architectures compiled here are
one per generation a user may have: sm_75 (T4, RTX 20xx), sm_80 (A100),
sm_86 (A10, RTX 30xx), sm_89 (L4, L40, RTX 40xx), sm_90 (H100, H200), sm_100
(B200) and sm_120 (RTX 50xx) where the NVRTC in use knows it.  The source,
options and template instances come from the catalogue the CuPy backend loads
(:mod:`linf_plugin.ops.kernel_specs`), so this compiles exactly what the
backend compiles.  ``sm_*`` targets produce cubins, so ptxas limits (static
shared memory, registers) are enforced as well, and ptxas's report shows
register spills.  Cubins are cached by source, options and architecture under
pytest's cache directory (shared with tests/ops/test_kernel_cost.py, which
disassembles the sm_90 ones).
"""
from __future__ import annotations

import pytest

from linf_plugin.ops.kernel_specs import (DTYPES, KERNEL_FAMILIES, NVRTC_OPTIONS, P_VARIANTS, RAW_P_VARIANTS,
                                          all_module_specs, full_source, module_spec, nvrtc_compile)

ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120")
OPTIONAL = {"sm_120"}     # NVRTC 12.8 added it; the others are known to every NVRTC that CuPy 14 supports
SPECS = all_module_specs()
# Register spills per kernel (bytes stored + loaded, ptxas -v): none on sm_90, the architecture the cost model
# (benchmarks/kernel_cost.py) counts; elsewhere ptxas allocates differently and keeps a few values of some
# kernels in local memory (L1-cached): at most 36 bytes on sm_75-sm_89 (the 8 x 8 p = inf forward on sm_75,
# the fused backward on sm_80-sm_89) and 80 bytes on sm_100/sm_120 (double forwards, p = 1 backward).  The
# bound catches what matters: kernels that spill kilobytes, as the single-gradient double and accurate-power
# kernels did on Blackwell before they asked for one block per SM there.
SPILL_LIMIT = {"sm_90": 0}
OTHER_SPILL_LIMIT = 96


def test_catalogue_covers_every_variant():
    keys = {s.key for s in SPECS}
    for ctype in DTYPES:
        assert ("linf", ctype, None) in keys and ("interval_inf", ctype, None) in keys
        for pv in P_VARIANTS:
            assert ("lp", ctype, pv) in keys and ("interval_lp", ctype, pv) in keys
    assert {s.family for s in SPECS} == set(KERNEL_FAMILIES)
    assert all(s.options == NVRTC_OPTIONS for s in SPECS)


def test_raw_sum_and_its_fixup_share_the_grid():
    """lp_forward (the fixup) reads the block flags of lp_forward_raw by block index: same tile, same grid."""
    for ctype in DTYPES:
        for pv in P_VARIANTS:
            kernels = module_spec("lp", ctype, pv).kernels
            assert ("forward_raw" in kernels) == (pv in RAW_P_VARIANTS)
            if pv in RAW_P_VARIANTS:
                assert kernels["forward_raw"].tile == kernels["forward"].tile
                assert kernels["forward_raw"].params[3] == kernels["forward"].params[3] == "int*"
    # its safe range (lp_forward.cu) assumes gradual underflow: flushing subnormals would need a wider one
    assert not any(flag in opt for opt in NVRTC_OPTIONS for flag in ("ftz=true", "fast_math", "fast-math"))
    # no implicit contraction: the kernels write their fused multiply-adds (common.cuh), the emulation rounds alike
    assert "--fmad=false" in NVRTC_OPTIONS


@pytest.fixture(scope="module")
def known_archs(nvrtc):
    return {f"sm_{a}" for a in nvrtc.getSupportedArchs()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(str(k) for k in s.key))
def test_module_compiles_without_spills(kc, nvrtc_cache, known_archs, spec, arch):
    if arch not in known_archs:
        if arch in OPTIONAL:
            pytest.skip(f"this NVRTC does not know {arch}")
        pytest.fail(f"this NVRTC does not know {arch}, a supported architecture: use the CUDA 13 wheels")
    cubin, log = kc.nvrtc_cubin(spec.source, spec.name_expressions, spec.options, arch, nvrtc_cache)
    lowered = kc.lowered_names(log)
    assert set(lowered) == set(spec.name_expressions)
    resources = kc.parse_ptxas_log(log)
    limit = SPILL_LIMIT.get(arch, OTHER_SPILL_LIMIT)
    for expr, name in lowered.items():
        assert name.startswith("_Z"), (expr, name)   # a mangled, real kernel symbol
        r = resources[name]
        spilled = r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0)
        assert r["registers"] > 0 and spilled <= limit, f"{expr} on {arch}: {spilled} bytes of spills"


def test_sm75_takes_the_fallback_max(kc, nvrtc_cache):
    """max.NaN.f32 needs sm_80 (ptxas: "Modifier '.NaN' requires .target sm_80 or higher"): sm_75 compiles the
    integer-max fallback of common.cuh, sm_80 the instruction."""
    from linf_plugin.ops.kernel_specs import BK

    if kc.find_tool("nvdisasm") is None:
        pytest.skip("nvdisasm not installed (pip install nvidia-cuda-nvdisasm)")
    spec = module_spec("linf", "float")
    kernel = spec.kernels["forward"]
    ops, cost = {}, {}
    for arch in ("sm_75", "sm_80"):
        cubin, log = kc.nvrtc_cubin(spec.source, spec.name_expressions, spec.options, arch, nvrtc_cache)
        code = kc.disassemble(cubin)[kc.lowered_names(log)[kernel.name]]
        ops[arch] = {kc._opcode(line) for line in code}
        cost[arch] = kc.hot_loop_cost(code, kernel.tile[0] * kernel.tile[1] // 256 * BK)["instructions"]
    assert "FMNMX.NAN" in ops["sm_80"] and not any(o.startswith("IMNMX") for o in ops["sm_80"])
    assert "IMNMX.U32" in ops["sm_75"] and "FMNMX.NAN" not in ops["sm_75"]
    # the integer max cannot take |x - w| as an operand modifier: about one instruction more per triple
    assert cost["sm_80"] < cost["sm_75"] < cost["sm_80"] + 1.25, cost


@pytest.mark.parametrize("arch", ("sm_75", "sm_90"))
def test_broken_source_fails_the_same_check(nvrtc, arch):
    spec = module_spec("linf", "float")
    broken = spec.source.replace("lp_max_nonneg(m[i][j], lp_abs(xv[i] - wv[j]))",
                                 "lp_max_nonneg(m[i][j], lp_abs(xv[i] - wv))")
    assert broken != spec.source
    with pytest.raises(RuntimeError, match="NVRTC failed"):
        nvrtc_compile(broken, spec.name_expressions, spec.options, arch)


def test_the_nan_modifier_needs_sm80(nvrtc):
    """What the fallback avoids: the instruction itself does not assemble for sm_75."""
    src = """
__global__ void uses_max_nan(float* out) {
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(out[threadIdx.x]), "f"(1.0f));
    out[threadIdx.x] = r;
}
"""
    nvrtc_compile(src, ["uses_max_nan"], NVRTC_OPTIONS, "sm_80")
    with pytest.raises(RuntimeError, match="requires .target sm_80"):
        nvrtc_compile(src, ["uses_max_nan"], NVRTC_OPTIONS, "sm_75")


def test_shared_memory_limit_is_enforced(nvrtc):
    """A kernel over the 48 KiB static shared-memory limit fails at compile time, not at launch."""
    src = full_source(()) + """
template <typename T> __global__ void too_big(T* out) {
    __shared__ T tile[7000];
    tile[threadIdx.x] = T(1);
    __syncthreads();
    out[threadIdx.x] = tile[(threadIdx.x + 1) % 7000];
}
"""
    nvrtc_compile(src, ["too_big<float>"], NVRTC_OPTIONS, "sm_90")
    with pytest.raises(RuntimeError, match="shared"):
        nvrtc_compile(src, ["too_big<double>"], NVRTC_OPTIONS, "sm_90")


def test_the_gpu_tests_maxima_kernel_compiles(nvrtc):
    """test_gpu.py compares the NaN-keeping max instruction with the sm_75 fallbacks on the GPU; its kernel
    compiles (sm_80: the instruction needs it)."""
    from pathlib import Path

    text = Path(__file__).with_name("test_gpu.py").read_text()
    source = text[text.index('MAXIMA_SOURCE = """') + len('MAXIMA_SOURCE = """'):]
    source = source[:source.index('"""')]
    nvrtc_compile(full_source(()) + source, ["maxima"], NVRTC_OPTIONS, "sm_80")
