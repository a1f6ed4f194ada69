"""Pieces every subcommand shares: run folders, the environment record, devices, timing, safe steps.

Nothing here certifies or trains; it only decides where files go and how a
step that fails is recorded (a comparison harness must finish the other
models when one method of one model raises, and say so in the results).
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from linf_plugin import distributed as pg

__all__ = ["UsageError", "usage_errors", "make_run_dir", "shared_run_dir", "environment", "resolve_device", "Timer",
           "error_record", "fmt_eps", "fmt_pct", "fmt_seconds", "fmt_share", "fmt_shares", "fmt_gap", "fmt_points",
           "MIN_POINTS", "progress_enabled", "count_params", "nan_to_none", "torch_threads", "SCHEMA_VERSION", "log"]

SCHEMA_VERSION = 1


class UsageError(ValueError):
    """Bad arguments to a subcommand; the message names the argument and the choices.

    The command line prints it and exits with code 2; every other exception
    is a bug (or an environment failure) and raises with its traceback.
    """


@contextmanager
def usage_errors():
    """Inside the block, a ``ValueError`` is a :class:`UsageError`: wrap calls that only check arguments."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def log(msg: str) -> None:
    """One line of progress on stderr (stdout is kept for the final summary); rank 0 alone under torchrun."""
    if pg.is_main():
        print(msg, file=sys.stderr, flush=True)


def make_run_dir(command: str, out: Optional[str] = None, root: str = "runs") -> Path:
    """``out`` if given (created), else ``runs/<command>-<UTC timestamp>`` (a fresh folder).

    Args:
        command: the subcommand name (``run``, ``mirman``, ``theorem``).
        out: the folder the user asked for (may exist; files in it are replaced).
        root: parent of the default folder.

    Returns:
        The folder, created.
    """
    if out is not None:
        path = Path(out)
    else:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = Path(root) / f"{command}-{stamp}"
        k = 1
        while path.exists():
            k += 1
            path = Path(root) / f"{command}-{stamp}-{k}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_run_dir(command: str, out: Optional[str] = None, root: str = "runs") -> Path:
    """:func:`make_run_dir` on rank 0, the same path on every rank (the others create nothing; rank 0 writes)."""
    path = make_run_dir(command, out, root) if pg.is_main() else None
    return Path(pg.broadcast_object(None if path is None else str(path), what="sharing the run folder"))


def environment(device: torch.device) -> dict:
    """Versions and hardware that a result depends on (JSON-able)."""
    import auto_LiRPA

    import linf_plugin

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "auto_LiRPA": getattr(auto_LiRPA, "__version__", "unknown"),
           "linf_plugin": getattr(linf_plugin, "__version__", "unknown"), "platform": platform.platform(),
           "device": str(device), "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "argv": list(sys.argv)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def resolve_device(device: Optional[str]) -> torch.device:
    """``auto`` / None → CUDA when available, else CPU; anything else as given (checked)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} was requested but CUDA is not available; use --device cpu")
    return dev


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall clock, synchronising CUDA)."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device = device
        self.seconds = math.nan

    def _sync(self):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self._start
        return False


def error_record(exc: BaseException) -> dict:
    """What the results keep of a failed step: type, message and the innermost frames."""
    tb = traceback.extract_tb(exc.__traceback__)[-3:]
    return {"status": "error", "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}",
            "where": [f"{f.filename}:{f.lineno} in {f.name}" for f in tb]}


def progress_enabled(flag: Optional[bool]) -> bool:
    """Progress bars: on when asked, off when asked, else when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else bool(flag)


def count_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def fmt_eps(eps: float) -> str:
    """ε for labels: fractions of 255 as ``8/255`` when exact to 1e-9, else ``%g``."""
    k = eps * 255
    if eps > 0 and abs(k - round(k)) < 1e-9 and round(k) not in (0, 255) and abs(eps - round(eps, 3)) > 1e-12:
        return f"{int(round(k))}/255"
    return f"{eps:g}"


def fmt_pct(x: Optional[float], digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.{digits}f}"


#: A table shows an accuracy as a percentage only when it was computed on at least this many points;
#: below that it shows the counts (``"1 / 1 / 0 of 1 pt"``), which no reader takes for a rate.
MIN_POINTS = 20


def fmt_points(n: int) -> str:
    """``"1 pt"``, ``"3 pts"``."""
    return f"{n} pt" if n == 1 else f"{n} pts"


def fmt_shares(fractions, n: Optional[int], digits: int = 1, sep: str = " / ", percent_sign: bool = False) -> str:
    """Accuracies measured on the same ``n`` points, joined by ``sep``.

    ``n >= MIN_POINTS`` (or unknown): percentages, ``"93.2 / 85.1"`` (``%``
    appended with ``percent_sign``); fewer points: the counts they stand for,
    ``"1 / 1 / 0 of 1 pt"``.
    """
    fractions = list(fractions)
    if n is None or n >= MIN_POINTS or any(f is None or (isinstance(f, float) and math.isnan(f))
                                           for f in fractions):
        return sep.join(fmt_pct(f, digits) for f in fractions) + ("%" if percent_sign else "")
    return sep.join(str(int(round(f * n))) for f in fractions) + f" of {fmt_points(n)}"


def fmt_share(fraction: Optional[float], n: Optional[int], digits: int = 1, percent_sign: bool = False) -> str:
    """One accuracy measured on ``n`` points (see :func:`fmt_shares`)."""
    return fmt_shares([fraction], n, digits, percent_sign=percent_sign)


def fmt_gap(gap: float, n: int, sign: bool = True, unit: bool = True) -> str:
    """An accuracy difference on ``n`` points: percentage points, or the count when ``n < MIN_POINTS``."""
    plus = "+" if sign else ""
    if n >= MIN_POINTS:
        return f"{100 * gap:{plus}.1f}" + (" points" if unit else "")
    return f"{int(round(gap * n)):{plus}d} of {fmt_points(n)}"


def fmt_seconds(s: Optional[float]) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "n/a"
    if s < 1:
        return f"{s:.3f} s"
    if s < 100:
        return f"{s:.2f} s"
    return f"{s:.0f} s"


def nan_to_none(x):
    """JSON has no NaN: NaN/inf floats become None (recursively)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
    return x


@contextmanager
def torch_threads(n: Optional[int]):
    """Run the block with ``n`` CPU threads (None: unchanged)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)
