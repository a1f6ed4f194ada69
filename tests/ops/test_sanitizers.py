"""Sanitizers on the emulated kernels, and planted bugs that show what each one catches.

The g++ emulation (tests/ops/emulation) runs every kernel family of
``sanitize_run.MODULES`` on shapes with partial tiles, with real threads (256
OS threads per block), under

* ThreadSanitizer: data races between the threads of a block (a missing
  barrier, racing stores to shared memory);
* AddressSanitizer with UndefinedBehaviorSanitizer: out-of-bounds and
  use-after-free accesses to the tensors (heap) and to shared memory (static
  storage with red zones), misaligned 16-byte vector loads (``alignment``),
  signed overflow, bad shifts;

and compares every result with the reference backend.  Each sanitized build
runs in a child process that preloads the sanitizer's runtime (the runtimes
cannot be loaded into an already running Python); the builds are cached by
source hash under pytest's cache directory.  A read of shared memory that the
block never wrote is caught by none of these (GCC has no MemorySanitizer):
the emulation fills shared memory with 0xFF bytes (NaN) before every block,
so such a read turns a result into NaN.

Planted bugs, one per checker, each a small edit of the real source that the
plain emulation does not notice (the results stay right), and that its
checker reports:

=================  ==========================================  =============================
checker            planted bug                                  kernel
=================  ==========================================  =============================
ThreadSanitizer    the raw sum's block flag as a shared int     lp_forward_raw
                   that many threads store to (a benign race)
ThreadSanitizer    the barrier at the end of the tile loop      lp_forward_raw
                   removed
UBSan alignment    shared rows padded by 8 bytes, not 16:       lp_forward_raw
                   misaligned 16-byte loads
AddressSanitizer   the loads of the argmax test hoisted above   linf_resolve
                   its bounds check (reads past the tensors)
poisoned shared    the zero padding of a transposed tile not    interval_lp_forward
memory             written
=================  ==========================================  =============================

A sanitizer runtime missing from the machine skips its tests with the reason
(on Debian 12, g++-12 brings them all: libtsan2, libasan8 and libubsan1 are
dependencies of libgcc-12-dev).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from linf_plugin.ops.kernel_specs import module_spec

_HERE = Path(__file__).parent
_RUN = _HERE / "emulation" / "sanitize_run.py"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RUN = _load("lp_sanitize_run", _RUN)


def _kernels(*keys):
    return [k.name for key in keys for k in module_spec(*key).kernels.values()]


def _edit(source: str, anchor: str, old: str, new: str) -> str:
    """``source`` with the first ``old`` after ``anchor`` replaced by ``new`` (both must be there)."""
    at = source.index(anchor)
    where = source.index(old, at)
    return source[:where] + new + source[where + len(old):]


def _racy_flag(source):
    return _edit(source, "lp_forward_raw(const T*", """    const int any_unsafe = __syncthreads_or(unsafe);
""", """    __shared__ int any_unsafe;
    if (tx == 0 && ty == 0) any_unsafe = 0;
    __syncthreads();
    if (unsafe) any_unsafe = 1;   // racing stores of the same value
    __syncthreads();
""")


def _no_barrier(source):
    return _edit(source, "lp_forward_raw(const T*", """        __syncthreads();
    }

    const T lo =""", """    }

    const T lo =""")


def _misaligned(source):
    return _edit(source, "lp_forward_raw(const T*", "constexpr int PAD = LP_VPAD(T);", "constexpr int PAD = LP_PAD;")


def _oob_read(source):
    return _edit(source, "linf_resolve(const T*", """        hit[slot][lane] = (k < D && lp_abs(x[b * D + k] - w[n * D + k]) == y[o]) ? 1 : 0;""",
                 """        const T xk = x[b * D + k], wk = w[n * D + k];   // loaded before the bounds check
        hit[slot][lane] = (k < D && lp_abs(xk - wk) == y[o]) ? 1 : 0;""")


def _uninit(source):
    return _edit(source, "lp_load_transposed(T (*dst)", """        dst[k][r] = (row < rows && col < cols) ? src[(lp_i64)row * cols + col] : T(0);""",
                 """        if (row < rows && col < cols) dst[k][r] = src[(lp_i64)row * cols + col];""")


LP8, LINF = ("lp", "float", 8), ("linf", "float", None)
# case: (sanitizer, the source edit, the scenario, the kernels built, what the report must say).  A report
# belongs to a case when it comes between the case's markers and names the case's library (whose frames the
# runtime may fail to symbolise when several instrumented libraries are loaded).
PLANTED = {
    "racy_flag": ("thread", _racy_flag, "raw_p8_tiny", _kernels(LP8), r"ThreadSanitizer: data race"),
    "no_barrier": ("thread", _no_barrier, "raw_p8", _kernels(LP8), r"ThreadSanitizer: data race"),
    "misaligned": ("address", _misaligned, "raw_p8", _kernels(LP8),
                   r"runtime error: load of misaligned address .* which requires 16 byte alignment"),
    "oob_read": ("address", _oob_read, "resolve_inf", _kernels(LINF), r"AddressSanitizer: heap-buffer-overflow"),
}
# ignore_noninstrumented_modules: TSan sees only the instrumented kernels, not torch's own (uninstrumented)
# memcpy and memset calls; the child also keeps torch to one thread (no OpenMP pool whose synchronisation
# TSan cannot see).
_OPTIONS = {
    "thread": {"TSAN_OPTIONS": "halt_on_error=0 exitcode=66 report_signal_unsafe=0 ignore_noninstrumented_modules=1",
               "OMP_NUM_THREADS": "1"},
    "address": {"ASAN_OPTIONS": "detect_leaks=0 halt_on_error=0 verify_asan_link_order=0 detect_odr_violation=0",
                "UBSAN_OPTIONS": "halt_on_error=0 print_stacktrace=1"},
}
_REPORT = {"thread": "ThreadSanitizer", "address": "(AddressSanitizer|runtime error)"}


@pytest.fixture(scope="session")
def build_dir(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("lp_kernel_sanitizers")) if cache is not None else tmp_path_factory.mktemp("san")


_RUNTIMES: dict = {}


def _runtime(harness, sanitizer: str, tmp: Path) -> str:
    """The sanitizer's runtime library, after a smoke test; skips (with the reason) where it is missing."""
    if sanitizer not in _RUNTIMES:
        cxx = harness.compiler()
        path = harness.sanitizer_runtime(sanitizer) if cxx else None
        reason = None
        if cxx is None:
            reason = "no C++ compiler (g++)"
        elif path is None:
            reason = (f"the {sanitizer} sanitizer runtime ({harness.SANITIZERS[sanitizer][1][0]}) is not installed; "
                      "on Debian it comes with g++ (libgcc-12-dev depends on libtsan2, libasan8, libubsan1)")
        else:
            src = tmp / "smoke.cpp"
            src.write_text("int main() { return 0; }\n")
            flags = [f for f in harness.SANITIZERS[sanitizer][0] if f.startswith("-fsanitize")]
            build = subprocess.run([cxx, *flags, str(src), "-o", str(tmp / "smoke")], capture_output=True, text=True)
            run = subprocess.run([str(tmp / "smoke")], capture_output=True, text=True) if build.returncode == 0 else build
            if run.returncode != 0:
                reason = f"{sanitizer} sanitizer builds do not run here: {(run.stderr or run.stdout)[-400:]}"
        _RUNTIMES[sanitizer] = (path, reason)
    path, reason = _RUNTIMES[sanitizer]
    if reason:
        pytest.skip(reason)
    return path


def _sections(stderr: str) -> dict:
    return {m.group(1): m.group(2) for m in re.finditer(r"@@begin (\S+)\n(.*?)@@end \1\n", stderr, re.S)}


_RUNS: dict = {}


@pytest.fixture(scope="session")
def sanitized(harness, build_dir, tmp_path_factory):
    """``run(sanitizer) -> {case: {"ok", "errors", "report"}}``: the kernels of sanitize_run.MODULES ("kernels") and
    the planted bugs checked by that sanitizer, built with it and run in one child process (once per session)."""
    def run(sanitizer):
        if sanitizer in _RUNS:
            return _RUNS[sanitizer]
        runtime = _runtime(harness, sanitizer, tmp_path_factory.mktemp("smoke"))
        main = harness.build_library_file(build_dir, harness.harness_source(_kernels(*RUN.MODULES)),
                                          sanitizer=sanitizer)
        cases = [f"kernels=families={main}"]
        for case, (which, edit, scenario, kernels, _) in PLANTED.items():
            if which == sanitizer:
                lib = harness.build_library_file(build_dir, harness.harness_source(kernels, edit), sanitizer=sanitizer)
                cases.append(f"{case}={scenario}={lib}")
        env = dict(os.environ, LD_PRELOAD=runtime, **_OPTIONS[sanitizer])
        proc = subprocess.run([sys.executable, str(_RUN), *cases], env=env, capture_output=True, text=True,
                              timeout=900)
        results = {}
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                results[row["case"]] = row
        sections = _sections(proc.stderr)
        libs = {c.split("=")[0]: Path(c.split("=", 2)[2]).stem for c in cases}
        for case, row in results.items():
            row["report"], row["library"] = sections.get(case, ""), libs[case]
        missing = [c.split("=")[0] for c in cases if c.split("=")[0] not in results]
        assert not missing, f"the {sanitizer} child did not finish {missing}: exit {proc.returncode}\n" \
                            f"{proc.stderr[-3000:]}"
        _RUNS[sanitizer] = results
        return results

    return run


@pytest.mark.parametrize("sanitizer", ("thread", "address"))
def test_every_kernel_family_is_clean_under_the_sanitizer(sanitized, sanitizer):
    """Every family (p = inf and its deterministic sums, the raw sum and its fixup, general p fast and accurate,
    the fused and single-gradient backward, double, intervals, box argmax) on partial tiles, with real threads:
    no report, and every result as the reference's."""
    row = sanitized(sanitizer)["kernels"]
    assert row["ok"], row["errors"]
    assert not re.search(_REPORT[sanitizer], row["report"]), row["report"][:4000]


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_each_planted_bug_is_reported_by_its_sanitizer(sanitized, case):
    sanitizer, _, _, _, expected = PLANTED[case]
    row = sanitized(sanitizer)[case]
    assert re.search(expected, row["report"]) and row["library"] in row["report"], row["report"][:4000]
    if case != "no_barrier":      # the others corrupt nothing the results depend on: only the sanitizer sees them
        assert row["ok"], row["errors"]


@pytest.mark.parametrize("case", ("racy_flag", "misaligned", "oob_read"))
def test_the_planted_bugs_pass_without_the_sanitizers(harness, build_dir, case):
    """What the sanitizers add: the same planted sources built without them give the reference's results, with
    fibers in a shuffled order and with real threads (x86 loads misaligned vectors, the stray reads land in
    the heap, the racing stores store the same value)."""
    _, edit, scenario, kernels, _ = PLANTED[case]
    lib = harness.load_library(harness.build_library_file(build_dir, harness.harness_source(kernels, edit)))
    for schedule in ("shuffled", "threads"):
        assert RUN.run_scenario(lib, scenario, schedule) == [], schedule


def test_poisoned_shared_memory_catches_an_uninitialised_read(harness, build_dir):
    """The zero padding of lp_load_transposed left unwritten: interval_lp_forward then reads shared memory the
    block never wrote.  Poisoned (0xFF: NaN) before every block, the result is NaN; zero-filled, or left as
    the previous block left it (what the emulation did before: static storage, zero at first), the bug is
    invisible on this one-block problem."""
    kernels = _kernels(("interval_inf", "float", None), ("interval_lp", "float", 8))
    lib = harness.load_library(harness.build_library_file(build_dir, harness.harness_source(kernels, _uninit)))
    try:
        errors = RUN.run_scenario(lib, "interval_p8", "shuffled")
        assert errors and any("lo p=8.0" in e or "hi p=8.0" in e for e in errors), errors
        for byte in (0, -1):
            lib.emu_configure_poison(byte)
            assert RUN.run_scenario(lib, "interval_p8", "shuffled") == [], byte
    finally:
        lib.emu_configure_poison(0xFF)


def test_every_kernel_with_shared_memory_is_poisoned(emulator_lib):
    """The emulator finds every kernel's __shared__ variables in its symbol table: each catalogue kernel whose
    body declares shared memory has its variables registered for poisoning, and the scatter kernels (no shared
    memory) have none."""
    from linf_plugin.ops.kernel_specs import all_module_specs, read_source

    rows = [line.split("\t") for line in Path(emulator_lib._name).with_suffix(".shared").read_text().splitlines()]
    registered = {kernel for kernel, _, _ in rows}
    specs = all_module_specs()
    sources = [read_source(f) for f in {f for s in specs for f in s.files}]
    declares = {k.template for s in specs for k in s.kernels.values()
                if any(_declares_shared(text, k.template) for text in sources)}
    for spec in specs:
        for k in spec.kernels.values():
            assert (k.name in registered) == (k.template in declares), k.name
    assert declares >= {"lp_forward", "lp_forward_raw", "lp_backward", "lp_backward_fused", "linf_forward",
                        "linf_resolve", "lp_scatter_rows", "interval_lp_forward", "linf_box_argmax"}
    assert not declares & {"linf_backward", "interval_inf_backward"}
    assert all(int(size) > 0 for _, _, size in rows)


def _declares_shared(source: str, template: str) -> bool:
    """Whether the body of kernel ``template`` in ``source`` declares a __shared__ variable."""
    m = re.search(rf"\n{template}\(", source)
    if m is None:
        return False
    body = source[source.index("{", m.end()):]
    depth = 0
    for i, ch in enumerate(body):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            return "__shared__" in body[:i]
    return False
