"""Every registered l_inf-dist and hybrid model trains one step through the CuPy path on the CPU.

Inside ``cupy_on_cpu`` (see conftest) every ``lp_dist`` / ``lp_dist_interval``
call of the model goes to ``CupyBackend`` -> the real ``CupyLauncher`` -> the
CPU stand-in for CuPy -> the g++-compiled ``.cu`` kernels.  The step
(:mod:`model_step`: objective incl. the hybrids' interval bounds, backward,
optimizer step) must give the loss, gradients and updated parameters of the
same step on the torch backend.  Before the launcher detached its arguments
this failed at the first layer (``BufferError``: DLPack refuses tensors that
require grad), exactly as on the GPU.

Widths are kept small so the emulator stays fast: entries that take a width
get one; the three 5120-wide entries have a fixed architecture, so their
constructor runs at emulator width here (``model_step.STAND_IN``), and the
full-width models train on a GPU in ``test_gpu.py``.
"""
from __future__ import annotations

import copy
import math

import pytest
from .model_step import AS_REGISTERED, FAMILY_MODELS, SMALL, STAND_IN, assert_same_step, build, train_step


def test_every_family_model_has_a_size_here():
    known = set(SMALL) | set(STAND_IN) | AS_REGISTERED
    assert set(FAMILY_MODELS) <= known, sorted(set(FAMILY_MODELS) - known)


@pytest.mark.parametrize("p", (8.0, math.inf), ids=("p8", "pinf"))
@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_training_step_through_the_cupy_path_matches_the_torch_path(request, name, p):
    model = build(name)
    want = train_step(copy.deepcopy(model), p)                    # torch backend (CPU auto)
    backend = request.getfixturevalue("cupy_on_cpu")              # from here on: the CuPy path
    got = train_step(model, p)
    launched = {n.split("<")[0] for n, _ in backend.launcher.calls}
    assert ({"linf_forward", "lp_forward"} & launched) and ({"linf_backward", "lp_backward_fused"} & launched), launched
    if model.family == "hybrid":
        assert {"interval_inf_forward", "interval_lp_forward"} & launched, launched
    assert_same_step(got, want)
