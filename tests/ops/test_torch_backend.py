"""The PyTorch path: eager and compiled (inductor) against the reference, chunking, fallback.

The compiled tests compile real inductor graphs (about a second each on two
cores once inductor is warm; the first graph of a process also pays
inductor's start-up).  They share one backend instance per module so each
graph is compiled once.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
from .oracles import box_argmax_oracle

from linf_plugin.ops import torch_kernels as K
from linf_plugin.ops.reference import ReferenceBackend
from linf_plugin.ops.torch_backend import COMPILE_ENV, TorchBackend

REF = ReferenceBackend()
INF = math.inf


def _problem(B, N, D, dtype, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:
        x = torch.randint(-2, 3, (B, D), generator=g).to(dtype)
        w = torch.randint(-2, 3, (N, D), generator=g).to(dtype)
    else:
        x = torch.randn(B, D, generator=g, dtype=dtype)
        w = torch.randn(N, D, generator=g, dtype=dtype)
    r = torch.rand(B, D, generator=g, dtype=dtype)
    return x, w, x - r, x + r, torch.randn(B, N, generator=g, dtype=dtype)


def _compare(backend, B, N, D, dtype, p, seed=0, ties=False, interval=True):
    x, w, lower, upper, g = _problem(B, N, D, dtype, seed, ties)
    tol = dict(rtol=0, atol=0) if math.isinf(p) else (
        dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11))
    gtol = dict(rtol=5e-5, atol=5e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    y, aux = backend.forward(x, w, p)
    y_ref, aux_ref = REF.forward(x, w, p)
    torch.testing.assert_close(y, y_ref, **tol)
    if math.isinf(p):
        assert torch.equal(aux, aux_ref), "argmax must be the lowest index"
    for got, want in zip(backend.backward(g, x, w, y, aux, p), REF.backward(g, x, w, y_ref, aux_ref, p)):
        torch.testing.assert_close(got, want, **gtol)
    if not interval:
        return
    lo, hi, iaux = backend.interval_forward(lower, upper, w, p)
    lo_r, hi_r, iaux_r = REF.interval_forward(lower, upper, w, p)
    torch.testing.assert_close(lo, lo_r, **tol)
    torch.testing.assert_close(hi, hi_r, **tol)
    if math.isinf(p):
        assert torch.equal(iaux, iaux_r)
    # from its own generator, not the global one: the draw (and so the worst-case
    # element against the tolerance) must not depend on which tests ran first
    g2 = torch.randn(g.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    got = backend.interval_backward(g, g2, lower, upper, w, lo, hi, iaux, p)
    want = REF.interval_backward(g, g2, lower, upper, w, lo_r, hi_r, iaux_r, p)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **gtol)


# -- eager ----------------------------------------------------------------------
@pytest.mark.parametrize("p", (1.0, 2.0, 8.0, 8.5, 100.0, INF))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_eager_matches_reference(dtype, p):
    _compare(TorchBackend(compile=False), 13, 17, 19, dtype, p)


@pytest.mark.parametrize("shape", [(1, 4, 5), (3, 1, 5), (3, 4, 1), (1, 1, 1)], ids=str)
def test_eager_degenerate_shapes(shape):
    for p in (2.5, INF):
        _compare(TorchBackend(compile=False), *shape, torch.float64, p)


def test_chunking_under_a_tiny_budget_gives_the_same_result():
    tiny = TorchBackend(compile=False, eager_budget=50)            # one row per chunk
    assert len(list(tiny._chunks(13, 17, 19, False))) == 13
    for p in (8.0, INF):
        _compare(tiny, 13, 17, 19, torch.float64, p)


@pytest.mark.parametrize("rows", [1, 2, 9, 10, 11, 12, 13, 97])
def test_chunks_are_balanced_and_cover_every_row(rows):
    b = TorchBackend(compile=False, eager_budget=100)
    sl = list(b._chunks(rows, 3, 10, False))  # 3 rows fit a chunk: 10 rows -> 3, 3, 2, 2
    sizes = [s.stop - s.start for s in sl]
    assert len(sl) == -(-rows // 3) and max(sizes) <= 3  # the fewest chunks the budget allows
    assert max(sizes) - min(sizes) <= 1  # balanced
    assert sl[0].start == 0 and sl[-1].stop == rows and all(a.stop == b_.start for a, b_ in zip(sl, sl[1:]))
    assert [s.stop - s.start for s in b._chunks(10, 3, 10, False)] == [3, 3, 2, 2]


def test_eager_ties_take_the_lowest_index():
    _compare(TorchBackend(compile=False), 11, 13, 9, torch.float32, INF, ties=True)


def test_compile_environment_variable(monkeypatch):
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert TorchBackend().compile is False
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert TorchBackend().compile is True
    monkeypatch.setenv(COMPILE_ENV, "auto")
    assert TorchBackend().compile is None
    monkeypatch.setenv(COMPILE_ENV, "sometimes")
    with pytest.raises(ValueError, match=COMPILE_ENV):
        TorchBackend()


def test_small_problems_and_size_one_operands_stay_eager():
    b = TorchBackend(compile=True, min_compiled_work=1000)
    x = torch.zeros(10, 10)
    assert b.uses_compiled(x, 10, 10)
    assert not b.uses_compiled(x, 5, 10)          # 500 triples < 1000
    assert not b.uses_compiled(x, 1, 2000)        # N = 1 would specialise a graph
    assert not b.uses_compiled(x, 2000, 1)
    assert not TorchBackend(compile=False).uses_compiled(x, 100, 100)


def test_a_compiled_inf_forward_serves_smaller_problems():
    """Once the p = inf forward's graph exists, problems down to min_warm_work use it (an output layer)."""
    b = TorchBackend(compile=True, min_compiled_work=5000, min_warm_work=500, compile_backend="eager")
    x, w, *_ = _problem(20, 16, 20, torch.float32)              # 6400 triples: compiles
    small, w_small, *_ = _problem(20, 3, 20, torch.float32)     # 1200 triples
    assert not b.uses_compiled(small, 3, 20, "linf_max")
    b.forward(x, w, INF, need_aux=False)
    assert b.uses_compiled(small, 3, 20, "linf_max")
    assert not b.uses_compiled(small, 3, 20)                   # other kernels keep the cold threshold
    assert not b.uses_compiled(small[:2], 3, 20, "linf_max")    # 120 triples < 500
    calls = b.compiled_calls
    y, aux = b.forward(small, w_small, INF, need_aux=False)
    assert b.compiled_calls == calls + 1 and aux is None
    assert torch.equal(y, REF.forward(small, w_small, INF)[0])
    y, aux = b.forward(small, w_small, INF)                    # with the argmax: the cold threshold
    assert b.compiled_calls == calls + 1 and torch.equal(y, REF.forward(small, w_small, INF)[0])


def _stack_reference(x, layers, extra):
    outs, z = [], x
    for w, sub, add in layers:
        z = REF.forward(z, w, INF)[0]
        z = z - sub if sub is not None else z
        z = z + add if add is not None else z
        outs.append(z)
    ranges = [[t.min().item(), t.max().item()] for w, s, a in layers for t in (w, s, a) if t is not None]
    ranges += [[t.min().item(), t.max().item()] for t in extra]
    return outs, torch.stack([t.abs().amax(1) for t in (x, *outs)]), torch.tensor(ranges, dtype=torch.float64)


def _stack_problem(B, dims, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, dims[0], generator=g, dtype=dtype)
    layers = []
    for k, (d, n) in enumerate(zip(dims, dims[1:])):
        vec = lambda: torch.randn(n, generator=g, dtype=dtype)  # noqa: E731
        layers.append((torch.randn(n, d, generator=g, dtype=dtype), vec() if k % 2 == 0 else None,
                       vec() if k > 0 else None))
    return x, layers, [torch.rand(3, generator=g, dtype=dtype) + 0.5]


def _same_stack(got, want):
    return len(got[0]) == len(want[0]) and all(torch.equal(a, b) for a, b in zip(got[0], want[0])) and \
        torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_stack_graphs_match_and_keep_the_batch_dynamic():
    """linf_stack_fixed: one graph per stack of weight shapes, any batch, the reference's values (each layer's
    output, row magnitudes, tensor ranges), NaN kept; capped; None where it would not run compiled."""
    from torch._dynamo.utils import counters

    b = TorchBackend(compile=True, min_compiled_work=0, compile_backend="eager", max_fixed_shapes=1)
    for dtype in (torch.float32, torch.float64):   # one stack (a graph per dtype under it)
        x, layers, extra = _stack_problem(12, (20, 16, 9, 4), dtype)
        assert _same_stack(b.linf_stack_fixed(x, layers, extra), _stack_reference(x, layers, extra))
    before, calls = counters["stats"]["unique_graphs"], b.compiled_calls
    for B in (5, 31, 2):
        x, layers, extra = _stack_problem(B, (20, 16, 9, 4), torch.float32, seed=B)
        assert _same_stack(b.linf_stack_fixed(x, layers, extra), _stack_reference(x, layers, extra))
        assert not hasattr(x, "_dynamo_dynamic_indices")        # the caller's tensor is not marked
    assert counters["stats"]["unique_graphs"] == before and b.compiled_calls == calls + 3
    # a change of global state (deterministic algorithms: the trainer turns them on for its evaluations)
    # recompiles once, and the new graph keeps the batch dynamic
    det = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(not det)
        for B in (7, 12, 3, 40):
            x, layers, extra = _stack_problem(B, (20, 16, 9, 4), torch.float32, seed=B)
            assert _same_stack(b.linf_stack_fixed(x, layers, extra), _stack_reference(x, layers, extra))
    finally:
        torch.use_deterministic_algorithms(det)
    assert counters["stats"]["unique_graphs"] == before + 1
    x, layers, extra = _stack_problem(6, (20, 16, 9, 4), torch.float32, seed=1)
    x[2, 3] = math.nan
    layers[1][0][0, 0] = math.nan
    got = b.linf_stack_fixed(x, layers, extra)
    assert torch.isnan(got[1][0, 2]) and torch.isnan(got[0][0][2]).all() and torch.isnan(got[2][2]).all()
    assert not torch.isnan(got[2][[0, 1, 3]]).any()
    x, layers, extra = _stack_problem(6, (9, 7), torch.float32)    # a new stack past the cap: not compiled
    assert b.linf_stack_fixed(x, layers, extra) is None
    assert sum(k[1] == "fixed" for k in b._compiled) == 1
    assert b.linf_stack_fixed(x[:1], *_stack_problem(1, (20, 16, 9, 4), torch.float32)[1:]) is None  # one row
    assert TorchBackend(compile=False).linf_stack_fixed(x, layers, extra) is None
    small = TorchBackend(compile=True, compile_backend="eager")   # below min_compiled_work: not worth a graph
    assert small.linf_stack_fixed(x, layers, extra) is None and small.compiled_calls == 0


def test_float32_key_packs_value_and_lowest_index():
    d = torch.tensor([[[0.0, 3.0, 1.0, 3.0]]])      # value 3 at indices 1 and 3
    x = torch.zeros(1, 4)
    w = -d[0]
    key = K.linf_key(x, w)
    value, index = K.decode_key(key)
    assert value.item() == 3.0 and index.item() == 1
    big = torch.tensor([[float("inf"), 0.0]])
    value, index = K.decode_key(K.linf_key(big, torch.zeros(1, 2)))
    assert value.item() == INF and index.item() == 0


# -- compiled -------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled():
    return TorchBackend(compile=True, min_compiled_work=0, compiled_budget=2000)


# Each graph costs seconds to compile, so the float64 cases leave the interval to the float32 ones
# (the functions compiled are the ones the eager tests check in every variant).
@pytest.mark.slow
@pytest.mark.parametrize("dtype, p, interval", [(torch.float32, INF, True), (torch.float64, INF, False),
                                                (torch.float32, 8.0, True), (torch.float64, 8.5, False)], ids=str)
def test_compiled_matches_reference(compiled, dtype, p, interval):
    # compiled_budget=2000 splits the 13 rows into chunks of 5, 5 and 3: the batch size is dynamic.
    calls = compiled.compiled_calls
    _compare(compiled, 13, 17, 19, dtype, p, interval=interval)
    assert compiled.compile_failed is None, compiled.compile_failed
    assert compiled.compiled_calls > calls


@pytest.mark.slow
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_compiled_argmax_takes_the_lowest_index_on_exact_ties(compiled, dtype):
    _compare(compiled, 12, 14, 30, dtype, INF, seed=5, ties=True, interval=dtype == torch.float32)
    x = torch.zeros(4, 40, dtype=dtype)
    w = torch.zeros(3, 40, dtype=dtype)
    x[:, [7, 19, 38]] = 2.0
    w[1, [19, 38]] = -1.0
    w[2, 38] = -5.0
    calls = compiled.compiled_calls
    y, aux = compiled.forward(x, w, INF)
    assert compiled.compiled_calls > calls
    assert y.tolist() == [[2.0, 3.0, 7.0]] * 4
    assert aux.tolist() == [[7, 19, 38]] * 4
    assert compiled.compile_failed is None


@pytest.mark.slow
def test_compiled_graphs_do_not_recompile_for_new_shapes(compiled):
    from torch._dynamo.utils import counters

    x, w, *_ = _problem(13, 17, 19, torch.float32)
    compiled.forward(x, w, INF, need_aux=False)
    before, calls = counters["stats"]["unique_graphs"], compiled.compiled_calls
    for B, N, D in ((9, 23, 31), (40, 5, 12), (3, 64, 7)):
        x, w, *_ = _problem(B, N, D, torch.float32)
        y, _ = compiled.forward(x, w, INF, need_aux=False)
        torch.testing.assert_close(y, REF.forward(x, w, INF)[0], rtol=0, atol=0)
    assert compiled.compiled_calls >= calls + 3
    assert counters["stats"]["unique_graphs"] == before


def test_a_failing_compiler_falls_back_to_eager_once(caplog):
    calls = []

    def broken_backend(gm, example_inputs):
        calls.append(1)
        raise RuntimeError("no C++ compiler here")

    b = TorchBackend(compile=True, min_compiled_work=0, compile_backend=broken_backend)
    with caplog.at_level(logging.WARNING, logger="linf_plugin.ops.torch_backend"):
        _compare(b, 6, 7, 8, torch.float32, INF, interval=False)
        _compare(b, 6, 7, 8, torch.float64, 8.0)
    assert b.compile_failed is not None and "no C++ compiler here" in b.compile_failed
    assert len(calls) == 1                                   # never retried
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1
    assert not b.uses_compiled(torch.zeros(6, 8), 7, 8)


@pytest.mark.slow
def test_lp_dist_uses_the_compiled_path_for_large_problems(monkeypatch, compiled):
    import importlib

    lp_mod = importlib.import_module("linf_plugin.ops.lp_dist")
    from linf_plugin.ops import lp_dist

    monkeypatch.setitem(lp_mod._instances, "torch", compiled)
    calls = compiled.compiled_calls
    x = torch.randn(20, 30, requires_grad=True)
    w = torch.randn(25, 30, requires_grad=True)
    # "auto" serves CPU tensors with the native kernels where they build, so ask for torch by name
    lp_dist(x, w, backend="torch").sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    lp_dist(x, w, backend="reference").sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=0, atol=0)
    torch.testing.assert_close(gw, w.grad, rtol=1e-6, atol=1e-6)
    assert compiled.compiled_calls > calls


# Inductor realises a node with several users once its inner function reads more than
# realize_reads_threshold inputs (default 4).  Where that count lands differs between torch
# versions: on torch 2.11 with 16 threads the interval gradients got (b, n, D) buffers, which
# torch 2.14 reproduces at threshold 3.  "strict" compiles at threshold 2, so the graphs must
# fuse for any torch that realises no more eagerly than that.
_STRICTNESS = {"default": {}, "strict": {"realize_reads_threshold": 2}}


@pytest.mark.slow
@pytest.mark.parametrize("strictness", _STRICTNESS)
@pytest.mark.parametrize("name", ["lp_grad_x", "lp_grad_w", "ival_grad_lower", "ival_grad_upper", "ival_grad_w",
                                  "lp_sum", "ival_sum"])
def test_compiled_graphs_never_allocate_a_b_n_d_buffer(name, strictness):
    """The point of the compiled path: every reduction fuses, no (b, n, D) temporary exists."""
    import re

    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from linf_plugin.ops.torch_backend import _INDUCTOR_OPTIONS, _pv_fn

    fn = _pv_fn(K.KERNELS[name], 8)            # a fresh code object: a real compile, not a dynamo cache hit
    compiled = torch.compile(fn, dynamic=True, options=_INDUCTOR_OPTIONS)
    x, w, lower, upper, g = _problem(6, 7, 9, torch.float32)
    r = torch.rand(6, 7)
    p = torch.tensor(8.0)
    args = {"lp_sum": (x, w, r, p), "ival_sum": (lower, upper, w, r, r, p)}.get(
        name, (x, w, g, r, p) if name.startswith("lp_") else (lower, upper, w, g, r, g, r, p))
    with inductor_config.patch(fx_graph_cache=False, **_STRICTNESS[strictness]):
        out, code = run_and_get_code(compiled, *args)
    eager = fn(*args)
    for a, b in zip(out if isinstance(out, tuple) else (out,), eager if isinstance(eager, tuple) else (eager,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    source = "\n".join(code)
    assert "cpp_fused" in source
    found = re.findall(r"empty_strided_cpu\(\(\w+, \w+, \w+\)", source)
    assert not found, f"a (b, n, D) buffer was allocated: {found} (torch {torch.__version__}, " \
                      f"{torch.get_num_threads()} threads, {strictness})"


# -- linf_box_argmax (the p = inf relaxation's coordinates) ------------------------
def _check_box_argmax(backend, B, N, D, dtype, seed, ties):
    _, w, lower, upper, _ = _problem(B, N, D, dtype, seed, ties)
    if ties:  # integer boxes: many exact ties in near and far
        lower, upper = lower.round(), lower.round() + torch.randint(0, 3, lower.shape).to(dtype)
    got = backend.linf_box_argmax(lower, upper, w)
    for g, want in zip(got, box_argmax_oracle(lower, upper, w)):
        assert g.dtype == torch.int64 and torch.equal(g, want)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("ties", (False, True))
@pytest.mark.parametrize("shape", ((5, 7, 9), (3, 4, 1), (1, 1, 2), (6, 3, 40)))
def test_eager_linf_box_argmax_matches_the_oracle(dtype, ties, shape):
    _check_box_argmax(TorchBackend(compile=False, eager_budget=50), *shape, dtype, seed=3, ties=ties)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_compiled_linf_box_argmax_matches_the_oracle(compiled, dtype):
    calls = compiled.compiled_calls
    for ties in (False, True):
        _check_box_argmax(compiled, 13, 17, 19, dtype, seed=4, ties=ties)
    assert compiled.compile_failed is None, compiled.compile_failed
    assert compiled.compiled_calls > calls


def test_linf_box_argmax_checks_its_box():
    from linf_plugin.ops import linf_box_argmax

    w = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="empty box"):
        linf_box_argmax(torch.ones(2, 4), torch.zeros(2, 4), w)
    with pytest.raises(ValueError, match="NaN"):
        linf_box_argmax(torch.full((2, 4), float("nan")), torch.zeros(2, 4), w)
    k = linf_box_argmax(torch.zeros(0, 4), torch.zeros(0, 4), w)
    assert all(t.shape == (0, 3) for t in k)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ival_key_excl", "ival_max_excl", "ival_argmax_excl"])
def test_compiled_runner_up_reductions_never_allocate_a_b_n_d_buffer(name):
    import re

    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from linf_plugin.ops.torch_backend import _INDUCTOR_OPTIONS

    kernel = K.KERNELS[name]

    def fn(*args):  # a fresh code object: a real compile, not a dynamo cache hit
        return kernel(*args)

    _, w, lower, upper, _ = _problem(6, 7, 9, torch.float32)
    k = torch.randint(0, 9, (6, 7))
    args = (lower, upper, w, k) + ((torch.rand(6, 7),) if name == "ival_argmax_excl" else ())
    with inductor_config.patch(fx_graph_cache=False):
        out, code = run_and_get_code(torch.compile(fn, dynamic=True, options=_INDUCTOR_OPTIONS), *args)
    assert torch.equal(out, kernel(*args))
    source = "\n".join(code)
    assert "cpp_fused" in source
    assert not re.search(r"empty_strided_cpu\(\(\w+, \w+, \w+\)", source), "a (b, n, D) buffer was allocated"


def test_compiled_graphs_keep_safe_float_flags_whatever_the_environment():
    """The environment may turn on inductor's unsafe-math and FMA-contraction C++ flags for every graph; the
    backend's graphs override both, so the certificate's float argument (each op rounds once, in order)
    holds for them."""
    from torch._inductor import config, cpp_builder

    from linf_plugin.ops.torch_backend import _INDUCTOR_OPTIONS

    # (config.patch, not monkeypatch: undoing a monkeypatch on inductor's config deletes the option)
    with config.patch({"cpp.enable_unsafe_math_opt_flag": True, "cpp.enable_floating_point_contract_flag": "fast"}):
        unsafe = cpp_builder._get_ffast_math_flags()
        with config.patch(_INDUCTOR_OPTIONS):
            flags = cpp_builder._get_ffast_math_flags()
    assert "fno-unsafe-math-optimizations" not in unsafe and "ffp-contract=fast" in unsafe
    assert "fno-unsafe-math-optimizations" in flags and "ffp-contract=off" in flags
