"""Every CUDA kernel, in every variant, compiles with NVRTC for sm_80 and sm_90 (no GPU needed).

The source, options and template instances come from the catalogue the CuPy
backend loads (:mod:`linf_plugin.ops.kernel_specs`), so this compiles exactly
what the backend compiles.  ``sm_*`` targets produce cubins, so ptxas limits
(static shared memory, registers) are enforced as well.
"""
from __future__ import annotations

import pytest

from linf_plugin.ops.kernel_specs import (DTYPES, KERNEL_FAMILIES, NVRTC_OPTIONS, P_VARIANTS, RAW_P_VARIANTS,
                                          all_module_specs, full_source, module_spec, nvrtc_compile)

ARCHS = ("sm_80", "sm_90")
SPECS = all_module_specs()


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


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(str(k) for k in s.key))
def test_module_compiles(nvrtc, spec, arch):
    lowered = nvrtc_compile(spec.source, spec.name_expressions, spec.options, arch, f"{spec.family}.cu")
    assert set(lowered) == set(spec.name_expressions)
    for expr, name in lowered.items():
        assert name.startswith("_Z"), (expr, name)   # a mangled, real kernel symbol


@pytest.mark.parametrize("arch", ARCHS)
def test_broken_source_fails_the_same_check(nvrtc, arch):
    spec = module_spec("linf", "float")
    broken = spec.source.replace("lp_max_nan(m[i][j], lp_abs(xv[i] - wv[j]))", "lp_max_nan(m[i][j], lp_abs(xv[i] - wv))")
    assert broken != spec.source
    with pytest.raises(RuntimeError, match="NVRTC failed"):
        nvrtc_compile(broken, spec.name_expressions, spec.options, arch)


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
