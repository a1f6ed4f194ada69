"""Command line: ``python -m linf_plugin.training --preset digits-linf --out runs/x [--FIELD VALUE ...]``.

Every :class:`~linf_plugin.training.config.TrainConfig` field is an option
(``--eps-train 0.2``, ``--model-kwargs '{"width": 256}'``,
``--lr-milestones 70,90``, ``--resume``); a preset sets the starting values
and options override them field by field.  Under ``torchrun`` every rank
runs this same command.  ``--list-presets`` / ``--list-models`` print the
choices.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from dataclasses import MISSING, fields

from .config import DEPRECATED_FIELDS, ConfigError, TrainConfig, sanitize_name
from .presets import PresetError, get_preset, list_presets
from .trainer import TrainingDivergedError, train

__all__ = ["main", "build_parser", "config_from_args"]

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def _parse_bool(s: str) -> bool:
    v = str(s).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


def _optional(conv):
    def parse(s: str):
        return None if str(s).strip().lower() in ("none", "null", "") else conv(s)
    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _float(s: str) -> float:
    try:
        return float(s)  # accepts "inf"
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def _tuple_of(conv):
    def parse(s: str) -> tuple:
        s = str(s).strip()
        return () if s in ("", "()", "none") else tuple(conv(v) for v in s.strip("()[]").split(",") if v.strip())
    return parse


def _json_dict(s: str) -> dict:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 256}}', got {s!r} ({e})")
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return v


def _converter(name: str, annotation: str):
    ann = annotation.replace(" ", "")
    optional = ann.startswith("Optional[")
    base = ann[len("Optional["):-1] if optional else ann
    if base == "bool":
        conv = _parse_bool
    elif base == "int":
        conv = int
    elif base == "float":
        conv = _float
    elif base == "str":
        conv = str
    elif base == "dict":
        conv = _json_dict
    elif base.startswith("Tuple[int"):
        conv = _tuple_of(int)
    elif base.startswith("Tuple[float"):
        conv = _tuple_of(_float)
    else:  # pragma: no cover - a new field type must be handled here
        raise TypeError(f"no command-line converter for field {name!r} of type {annotation}")
    return _optional(conv) if optional else conv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m linf_plugin.training",
        description="Train an ℓ∞-dist net, a hybrid or a ReLU baseline (IBP / CROWN-IBP) with checkpoints, "
                    "resume and DDP (launch with torchrun for several processes).")
    p.add_argument("--preset", help="start from this training preset (a recipe: model, loss, schedules); see "
                                    "--list-presets. python -m comparisons run --suite NAME names a data set and "
                                    "its models, each trained with one of these presets")
    p.add_argument("--out", dest="out_dir", default=None,
                   help="output folder (default: runs/<preset name, sanitised>)")
    p.add_argument("--list-presets", action="store_true", help="print the training preset names and exit")
    p.add_argument("--list-models", action="store_true", help="print the registered models and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    hints = typing.get_type_hints(TrainConfig)
    group = p.add_argument_group("config fields (override the preset)")
    for f in fields(TrainConfig):
        if f.name == "out_dir":
            continue
        ann = str(f.type) if isinstance(f.type, str) else repr(hints[f.name])
        ann = ann.replace("typing.", "")
        conv = _converter(f.name, ann)
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        note = f"deprecated: use {DEPRECATED_FIELDS[f.name]}; " if f.name in DEPRECATED_FIELDS else ""
        kw = dict(dest=f.name, type=conv, default=argparse.SUPPRESS, metavar=f.name.upper(),
                  help=f"({note}default {default!r})")
        if ann in ("bool", "Optional[bool]"):
            kw.update(nargs="?", const=True)
        group.add_argument("--" + f.name.replace("_", "-"), **kw)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config a parsed command line asks for (preset, then overrides)."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    overrides.pop("out_dir", None)
    cfg = get_preset(args.preset) if args.preset else TrainConfig()
    cfg = cfg.replace(**overrides)
    cfg.out_dir = args.out_dir or f"runs/{sanitize_name(cfg.name)}"
    if args.quiet:
        cfg.progress = False
    return cfg


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    if args.list_models:
        from ..models import list_models

        print("\n".join(list_models()))
        return 0
    # auto_LiRPA configures the root logger on import, so basicConfig would be a no-op here
    logger = logging.getLogger("linf_plugin")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    # the handler lives for this call only: main() may run in-process (tests, notebooks), where a
    # handler left on a since-closed stderr would break every later log call
    old_state = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    logger.propagate = False
    try:
        cfg = config_from_args(args)
        result = train(cfg)
    except (PresetError, ConfigError) as e:
        parser.exit(2, f"error: {e}\n")
    except TrainingDivergedError as e:
        parser.exit(3, f"error: {e}\n")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_state[0])
        logger.propagate = old_state[1]
    m = result.final_metrics
    if m:
        cert = m.get("test_cert_acc", m.get("cert_acc"))
        clean = m.get("test_clean_acc", m.get("clean_acc"))
        print(f"done: clean accuracy {clean:.4f}, certified accuracy {cert:.4f} at eps={cfg.eps:g} "
              f"({m.get('method')}); files in {result.out_dir}" if clean is not None and cert is not None
              else f"done; files in {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
