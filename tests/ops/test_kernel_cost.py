"""The GPU-free cost model (benchmarks/kernel_cost.py): the counting counts, and the kernels' fused multiply-adds.

Compiles the catalogue with NVRTC for sm_90 (no GPU needed) and
disassembles with nvdisasm (PyPI ``nvidia-cuda-nvdisasm``, in the ``test``
extra); cubins are cached under pytest's cache directory (a temporary one
when the cache plugin is off), keyed by the source, shared with
tests/ops/test_nvrtc.py (which checks every architecture for spills), so reruns
take seconds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from linf_plugin.ops.kernel_specs import module_spec

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_cost.py"


@pytest.fixture(scope="session")
def tools(kc, nvrtc):
    if kc.find_tool("nvdisasm") is None:
        pytest.skip("nvdisasm not installed (pip install nvidia-cuda-nvdisasm)")
    return kc


@pytest.fixture(scope="session")
def cache(nvrtc_cache):
    return nvrtc_cache


SASS = """
        .section .text._Z4demoPf,"ax",@progbits
.text._Z4demoPf:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
.L_x_1:
        /*0020*/                   LDS R2, [R0] ;
        /*0030*/                   MUFU.LG2 R3, |R2| ;
        /*0040*/              @P0 BRA `(.L_x_1) ;
.L_x_3:
        /*0050*/                   LDG.E R4, desc[UR4][R6.64] ;
        /*0060*/              @P2 BRA `(.L_x_3) ;
        /*0070*/                   IMAD R5, R5, 0x2, R6 ;
        /*0080*/              @!P1 BRA `(.L_x_0) ;
.L_x_2:
        /*0090*/                   BRA `(.L_x_2);
"""


def test_hot_loop_counting_on_handmade_code(kc, monkeypatch):
    """Barrier loop .L_x_0: 3 own instructions, a k-loop (reads shared memory) of 3 run 4 times, a tile-copy
    loop of 2 run once: 3 + 12 + 2 = 17 per iteration, for 2 triples."""
    import subprocess

    class Done:
        returncode, stdout, stderr = 0, SASS, ""

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    code = kc.disassemble(b"\x7fELF", nvdisasm="nvdisasm")["_Z4demoPf"]
    assert kc.loops(code) == [(3, 6), (7, 9), (1, 11)]    # the self-loop .L_x_2 is not a loop
    per = kc.hot_loop_cost(code, triples=2, inner_trips=4)
    assert per["instructions"] == 17 / 2 and per["loop_instructions"] == 8
    assert per["mufu"] == 4 / 2 and per["lds_words"] == 4 / 2 and per["half_rate"] == 1 / 2
    assert per["cycles"] == kc.MUFU_CYCLES * 2            # 2 MUFU per triple bound it, not the 8.5 issued
    with pytest.raises(ValueError, match="barrier"):
        kc.hot_loop_cost([c for c in code if not c.startswith("BAR")], triples=2)


def test_ptxas_log_parsing(kc):
    log = """ptxas info    : Compiling entry function '_Z1fv' for 'sm_90'
ptxas info    : Function properties for _Z1fv
ptxas         .     16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 1024 bytes smem"""
    assert kc.parse_ptxas_log(log) == {"_Z1fv": {"stack_bytes": 16, "spill_store_bytes": 12,
                                                 "spill_load_bytes": 8, "registers": 64}}


# the modules whose hot loops multiply and add: every product that meets an addition is an explicit fma
_FMA_MODULES = [("lp", "float", 2), ("lp", "float", 8), ("lp", "float", 0), ("lp", "double", 8),
                ("interval_lp", "float", 8), ("interval_lp", "float", 0)]


@pytest.mark.parametrize("key", _FMA_MODULES, ids=lambda k: "-".join(map(str, k)))
def test_fmad_false_costs_no_instruction(tools, cache, key):
    """The catalogue compiles with --fmad=false (nothing fused behind the source's back, so the CPU emulation
    rounds as the GPU does); the kernels write their fused multiply-adds explicitly, so NVRTC's default
    contraction finds nothing left to fuse: every kernel has the same floating-point adds, multiplies and
    fused multiply-adds as with --fmad=true (register allocation, and so integer and move instructions, may
    differ)."""
    from collections import Counter

    arithmetic = {"FADD", "FMUL", "FFMA", "DADD", "DMUL", "DFMA"}

    spec = module_spec(*key)
    assert "--fmad=false" in spec.options
    contracted = tuple(o for o in spec.options if o != "--fmad=false") + ("--fmad=true",)
    ops = []
    for options in (spec.options, contracted):
        cubin, log = tools.nvrtc_cubin(spec.source, spec.name_expressions, options, tools.ARCH, cache)
        code, lowered = tools.disassemble(cubin), tools.lowered_names(log)
        ops.append({role: Counter(op for op in map(tools._opcode, code[lowered[k.name]])
                                  if op.split(".")[0] in arithmetic)
                    for role, k in spec.kernels.items()})
    for role in spec.kernels:
        assert ops[0][role] == ops[1][role], (role, (ops[0][role] - ops[1][role]), (ops[1][role] - ops[0][role]))


def test_counts_per_triple_are_plausible(tools, cache):
    """The p = inf forward is a subtraction and a max per triple plus a little; general p costs ~1.5 MUFU
    (lg2 for every term, ex2 for half of them) and no more than ~20 instructions."""
    linf = tools.module_costs(module_spec("linf", "float"), cache)
    inf = linf["forward"].per_triple
    assert 2.0 <= inf["instructions"] < 3.0 and inf["mufu"] == 0
    assert linf["backward"].per_triple is None                    # a scatter: per output, not per triple
    general = tools.module_costs(module_spec("lp", "float", 0), cache)
    fast = general["forward"].per_triple
    assert 1.5 <= fast["mufu"] < 1.8 and 10 < fast["instructions"] < 20
    precise = general["forward_precise"].per_triple
    assert precise["instructions"] > fast["instructions"]          # the accurate log2f is longer
    plan = tools.our_costs(cache, ps=(8.5, math.inf))
    assert [c.name for c in plan[math.inf]["fwd"]] == [linf["forward"].name]
    assert tools.totals(plan[8.5]["fwd+bwd"])["instructions"] > fast["instructions"]


def test_p8_forward_is_the_raw_sum_and_no_dearer_than_the_seeds(tools, cache):
    """p = 8 forward counts the raw-sum kernel (4 instructions per triple: FADD, FMUL, FMUL, FFMA, plus the
    tile overhead) and not its fixup, which returns before its hot loop on ordinary data; the total is at
    most the seed's count stored in benchmarks/results/kernel_cost.json (recorded with --seed-repo)."""
    import json

    plan = tools.our_costs(cache, ps=(8.0,))[8.0]
    raw, fixup = plan["fwd"]
    assert raw.name == "lp_forward_raw<float, 8, 4, 4>" and not raw.fixup
    assert fixup.name == "lp_forward<float, 8, 4, 4, false>" and fixup.fixup
    assert 4.0 <= raw.per_triple["instructions"] < 4.5 and raw.per_triple["mufu"] == 0
    assert tools.totals(plan["fwd"])["instructions"] == round(raw.per_triple["instructions"], 3)
    stored = json.loads((_PATH.parents[0] / "results" / "kernel_cost.json").read_text())
    seed = next(r["seed"] for r in stored["rows"] if r["p"] == "8" and r["mode"] == "fwd")
    assert tools.totals(plan["fwd"])["instructions"] <= seed["instructions"]


def test_the_fused_backward_costs_no_more_than_the_seeds(tools, cache):
    """Issue #14: both finite-p gradients per triple at or below the seed's fused grad_input + grad_weight kernel
    (its counts as benchmarks/kernel_cost.py --seed-repo recorded them; compiling the seed needs nvcc and
    minutes), and below our two single-gradient kernels together.  The backend's plan for both gradients is
    the fused kernel alone."""
    from linf_plugin.ops.cupy_backend import CupyBackend

    stored = json.loads((_PATH.parent / "results" / "kernel_cost.json").read_text())
    seed = {r["p"]: r["seed"] for r in stored["rows"] if r["mode"] == "bwd"}
    for p, label in ((8.0, "8"), (8.5, "8.5"), (100.0, "100")):
        assert CupyBackend.kernel_plan(p)["bwd"] == [("lp", 8 if p == 8.0 else 0, "backward_fused")]
        costs = tools.module_costs(module_spec("lp", "float", 8 if p == 8.0 else 0), cache)
        fused = costs["backward_fused"].per_triple
        two = costs["backward_x"].per_triple["instructions"] + costs["backward_w"].per_triple["instructions"]
        assert fused["instructions"] < 0.6 * two, p
        assert fused["instructions"] <= seed[label]["instructions"], (p, fused, seed[label])
        assert fused["cycles"] <= seed[label]["cycles"], (p, fused, seed[label])


def test_the_deterministic_plans_and_what_they_cost(tools, cache):
    """Under torch.use_deterministic_algorithms(True) nothing adds with atomics.  p = inf sums its sparse
    gradients with lp_scatter_rows (twice: grad_x and grad_w), about 11 instructions per (b, n) entry and chunk
    of 32 coordinates, so under half an instruction per triple and gradient in float, against the atomic
    scatter's cost per output (counted 0 here); finite p runs the two single-gradient kernels, about twice the
    fused kernel."""
    from linf_plugin.ops.cupy_backend import CupyBackend

    plan = tools.our_costs(cache, ps=(8.0, math.inf))
    assert [c.name for c in plan[math.inf]["bwd det"]] == ["lp_scatter_rows<float, 32, 1>"] * 2
    assert tools.totals(plan[math.inf]["bwd"])["instructions"] == 0
    per_gradient = plan[math.inf]["bwd det"][0].per_triple["instructions"]
    assert 0.1 < per_gradient < 0.5
    assert plan[math.inf]["bwd det"][0].spill_bytes == 0
    fused = tools.totals(plan[8.0]["bwd"])["instructions"]
    assert 1.5 * fused < tools.totals(plan[8.0]["bwd det"])["instructions"] < 2.5 * fused
    assert CupyBackend.kernel_plan(8.0, deterministic=True)["bwd"] == [("lp", 8, "backward_x"), ("lp", 8, "backward_w")]
