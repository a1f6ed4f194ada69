"""The command line: ``python -m comparisons {run, mirman, theorem, report}``.

Each subcommand fills the settings dataclass of its module and calls it;
the run folder gets ``results.json`` (the data) and the Markdown, CSV and
PNG files rendered from it.  A short summary is printed at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from typing import List, Optional

from .common import UsageError

__all__ = ["main", "build_parser"]

EPILOG_RUN = """A suite (--suite) is a data set, an eps grid and the models compared on it; each model is
trained with a training preset (a recipe: model, loss, schedules), which python -m linf_plugin.training
takes as --preset and --models accepts here.

examples:
  python -m comparisons run                                  # digits, eps 0.05/0.1/0.2, four models
  python -m comparisons run --suite fashion-mnist            # real data (`make data` first), ~30 min on 2 cores
  python -m comparisons run --models linf,ibp --methods margin,ibp,crown
  python -m comparisons run --epochs 20 --set linf.model_kwargs='{"width": 64}'
  python -m comparisons run --suite fashion-mnist --models fashion-mnist-0.1 --device cuda   # the paper's recipe
  python -m comparisons run --suite mnist-0.3 --data-root ~/data --device cuda
  python -m comparisons report runs/run-20260101-120000     # re-render tables and plots from results.json
"""


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _floats(text: str) -> List[float]:
    out = []
    for t in _csv(text):
        if "/" in t:
            a, b = t.split("/", 1)
            out.append(float(a) / float(b))
        else:
            out.append(float(t))
    return out


def _ints(text: str) -> List[int]:
    return [int(t) for t in _csv(text)]


def _points(items: Optional[List[str]], option: str = "--points", kind=int) -> dict:
    out = {}
    for item in items or ():
        if "=" not in item:
            raise UsageError(f"{option} expects METHOD={'N' if kind is int else 'SECONDS'}, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = kind(v)
        except ValueError:
            raise UsageError(f"{option} {item!r}: {v!r} is not a number") from None
    return out


def _common(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--out", help=out_help)
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, dest="num_threads", help="CPU threads for torch")
    bars = p.add_mutually_exclusive_group()
    bars.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="progress bars (default: when stderr is a terminal)")
    bars.add_argument("--no-progress", dest="progress", action="store_false")


def _cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default="cache", help="checkpoint cache folder (default ./cache)")
    p.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="retrain every model; keep its checkpoint in the run folder, not the cache")
    p.add_argument("--data-root", default=None,
                   help="data root holding FashionMNIST/raw, MNIST/raw or cifar-10-batches-py (else $LINF_DATA_ROOT; "
                        "Fashion-MNIST also where `make data` installs it); nothing is downloaded")


def build_parser() -> argparse.ArgumentParser:
    from linf_plugin.certification import METHODS

    from .suites import SUITES

    parser = argparse.ArgumentParser(
        prog="python -m comparisons",
        description="Compare l_inf-dist nets with IBP / CROWN-IBP-trained ReLU nets: certified accuracy, "
                    "certification time, PGD, and the three-point and Theorem 3.2 experiments.")
    sub = parser.add_subparsers(dest="command", metavar="{run,mirman,theorem,report}")
    sub.required = True

    p = sub.add_parser("run", help="train/reuse each model, certify with every method, attack with PGD, report",
                       epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default=None, choices=sorted(SUITES),
                   help="the data set and its models: digits (default, CPU, embedded), fashion-mnist (CPU, real "
                        "data: `make data`), or the paper's mnist-0.3 / cifar10-8/255 (GPU, --data-root)")
    p.add_argument("--preset", dest="suite_alias", default=None, choices=sorted(SUITES), help=argparse.SUPPRESS)
    p.add_argument("--models", type=_csv, default=None,
                   help="comma list of the suite's model keys (linf, hybrid, ibp, crown-ibp) or training presets "
                        "(python -m linf_plugin.training --list-presets)")
    p.add_argument("--methods", type=_csv, default=None,
                   help=f"comma list of certification methods (default: every one that applies): {', '.join(METHODS)}")
    p.add_argument("--eps", type=_floats, default=None, help="comma list of eps in pixel units (a/b allowed: 8/255)")
    p.add_argument("--epochs", type=int, default=None,
                   help="squeeze every training recipe to this many epochs (phases kept in proportion)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[MODEL.]FIELD=JSON",
                   help="override a training config field, for all models or one (repeatable), "
                        "e.g. --set epochs=5 --set linf.model_kwargs='{\"width\": 64}'")
    p.add_argument("--train-subset", type=int, default=None, help="train on the first n training samples")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first n test samples")
    p.add_argument("--points", dest="method_points", action="append", default=None, metavar="METHOD=N",
                   help="certify METHOD on the first N test points only (marked † in the table), e.g. alpha-crown=100")
    p.add_argument("--budget", dest="budgets", action="append", default=None, metavar="METHOD=SECONDS",
                   help="per model, certify METHOD on the leading test points that fit in SECONDS for the whole "
                        "eps grid (marked † in the table); the default: crown=20, alpha-crown=20 on digits, 30 and 30 on "
                        "fashion-mnist")
    p.add_argument("--full", action="store_true",
                   help="everything, as the first runs: digits: the full training presets (digits-*, about 40 "
                        "minutes on 2 cores), no time budgets, alpha-crown on 10 points; fashion-mnist: PGD on "
                        "all 10,000 points, crown on the first 1,000 and alpha-crown on the first 10, no budgets")
    p.add_argument("--pgd-steps", type=int, default=100)
    p.add_argument("--pgd-points", type=int, default=None, metavar="N",
                   help="attack the first N test points (default: the suite's: fashion-mnist 1,000; --full: all)")
    p.add_argument("--pgd-restarts", type=int, default=1)
    p.add_argument("--bisect", action="store_true",
                   help="bound propagation: bisect each sample's radius (dense curves) instead of one pass per eps")
    p.add_argument("--bisect-steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--alpha-iterations", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue the run stopped in --out (Ctrl-C, SIGTERM, a dead rank): the certification, "
                        "bisection and PGD batches it saved are read back, not computed again; changed settings "
                        "are refused")
    _cache(p)
    _common(p, "run folder (default runs/run-<timestamp>)")

    from .mirman import add_arguments as mirman_args
    p = sub.add_parser("mirman", help="the three-point contrast (Mirman et al.): radii per point and method")
    mirman_args(p)
    _common(p, "run folder (default runs/mirman-<timestamp>)")

    from .theorem import add_arguments as theorem_args
    p = sub.add_parser("theorem", help="Theorem 3.2 / A.2 nets on r-separated real data vs trained baselines")
    theorem_args(p)
    _cache(p)
    _common(p, "run folder (default runs/theorem-<timestamp>)")

    p = sub.add_parser("report", help="re-render results.md / results.csv / PNGs of a run folder from results.json")
    p.add_argument("run_dir")
    return parser


def _suite_word(suite: Optional[str], alias: Optional[str]) -> str:
    """``--suite``, or the deprecated ``--preset`` it replaces (a warning), or the default ``digits``."""
    if alias is not None:
        warnings.warn("`python -m comparisons run --preset NAME` is deprecated and will be removed in the next "
                      "release: use --suite NAME (a suite is a data set and its models; --preset now names "
                      "training presets only, as in python -m linf_plugin.training)", FutureWarning, stacklevel=2)
        if suite is not None and suite != alias:
            raise UsageError(f"--suite {suite} and its deprecated alias --preset {alias} disagree; "
                             f"pass --suite only")
        return alias
    return suite or "digits"


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, print its summary; returns the exit code.

    Under ``torchrun`` every rank runs the whole command (certification is
    sharded over the ranks, training uses DDP) and rank 0 writes and prints.
    SIGTERM and Ctrl-C stop it with the shell's code for the signal (143, 130)
    and, for ``run --out DIR``, the command that resumes it.
    """
    from linf_plugin import distributed as pg
    from linf_plugin.certification.distributed import Interrupted, stop_on_signals

    parser = build_parser()
    args = parser.parse_args(argv)
    stack = contextlib.ExitStack()
    try:
        if args.command != "report":
            pg.join_group(args.device)
        stack.enter_context(stop_on_signals())
        if args.command == "run":
            from .run import RunSettings, run_comparison
            from .summary import summarize_run

            kw = {k: v for k, v in vars(args).items() if k not in ("command", "suite_alias")}
            kw["suite"] = _suite_word(args.suite, args.suite_alias)
            kw["method_points"] = _points(kw.get("method_points"))
            kw["budgets"] = _points(kw.get("budgets"), "--budget", float)
            run_dir, res = run_comparison(RunSettings(**kw))
            _print_main(summarize_run(run_dir, res))
        elif args.command == "mirman":
            from .mirman import settings_from_args, run_mirman
            from .summary import summarize_mirman

            run_dir, res = run_mirman(settings_from_args(args))
            _print_main(summarize_mirman(run_dir, res))
        elif args.command == "theorem":
            from .summary import summarize_theorem
            from .theorem import run_theorem, settings_from_args as theorem_settings

            run_dir, res = run_theorem(theorem_settings(args))
            _print_main(summarize_theorem(run_dir, res))
        else:
            from .report import render_report

            figs = render_report(args.run_dir)
            print(f"re-rendered {args.run_dir}: results.md, results.csv, " + ", ".join(f["file"] for f in figs))
    except _user_errors() as exc:  # bad arguments or inputs; anything else is a bug and keeps its traceback
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except pg.RankFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        _print_main(_stopped(exc, args, sys.argv[1:] if argv is None else argv), file=sys.stderr)
        return exc.exit_code
    finally:
        stack.close()
    return 0


def _user_errors() -> tuple:
    """The exception types that report a user's mistake (arguments, files, names), each with a message."""
    from linf_plugin.certification import MethodNotApplicableError
    from linf_plugin.certification.chunks import ResumeError
    from linf_plugin.models import CheckpointError, UnknownModelError
    from linf_plugin.training import ConfigError, PresetError

    from .schema import SchemaError

    # FileNotFoundError: a missing results.json or data set (DataNotFoundError)
    # ResumeError: a run folder or job that cannot be resumed with these settings (the fields are named)
    return (UsageError, SchemaError, ConfigError, PresetError, UnknownModelError, CheckpointError,
            MethodNotApplicableError, FileNotFoundError, ResumeError)


def _print_main(text: str, file=None) -> None:
    from linf_plugin import distributed as pg

    if pg.is_main():
        print(text, file=file)


def _stopped(exc, args, argv: List[str]) -> str:
    """What a stop by a signal left behind, and how to go on."""
    import signal

    from .jobs import resume_command

    msg = f"stopped by {signal.Signals(exc.signum).name}"
    if args.command != "run":
        return msg + "; nothing of this command is saved, run it again"
    if args.out is None:
        return msg + "; run with --out DIR to be able to resume a stopped run"
    return (f"{msg}; every finished batch is saved in {args.out}/chunks (trained models in the cache). "
            f"Resume with:\n  {resume_command(argv)}")
