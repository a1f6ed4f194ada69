"""The l_p-distance primitive and nothing else.

``lp_dist(x, w, p)`` -> ``(B, N)`` distances; ``lp_dist_interval(lower,
upper, w, p)`` -> the exact, differentiable per-output range over an input
box; ``linf_box_argmax`` -> the coordinates that decide that range for p = inf
(for CROWN's relaxation); ``LpDistFunction`` is the autograd Function (with the ONNX symbolic that
auto_LiRPA parses as ``custom::LpDist``), ``LpDistIntervalFunction`` the
interval's.  Backends: ``torch`` (compiled chunked reductions, any device),
``cupy`` (CUDA kernels, optional), ``reference`` (the plain oracle); ``use_backend`` routes one device type's calls
to a backend instance (how the CPU suite runs the CuPy path on emulated kernels).
"""
from .lp_dist import (BACKEND_ENV, BACKENDS, LpDistFunction, LpDistIntervalFunction, get_backend, linf_box_argmax,
                      lp_dist, lp_dist_interval, resolve_backend, use_backend)

__all__ = ["lp_dist", "lp_dist_interval", "linf_box_argmax", "LpDistFunction", "LpDistIntervalFunction", "get_backend",
           "resolve_backend", "use_backend", "BACKEND_ENV", "BACKENDS"]
