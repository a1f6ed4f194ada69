"""The shape of every ``results.json``, as plain dict specs, and a small checker (no dependency).

Spec language:

* ``"str" | "int" | "float" | "bool" | "any"``; ``"float"`` accepts ints;
  a trailing ``?`` allows ``None`` (``"float?"``);
* a tuple of literals: the value must be one of them;
* ``[spec]``: a list whose items all match ``spec``;
* ``{key: spec}``: a dict holding those keys (a key ending in ``?`` is
  optional; other keys are allowed, so records can grow);
* a callable ``f(value, path)``: custom checks (raises :class:`SchemaError`).
"""
from __future__ import annotations

from typing import Any

from linf_plugin.names import FAMILIES, METHODS

__all__ = ["SchemaError", "check", "validate_results", "RUN_SCHEMA", "MIRMAN_SCHEMA", "THEOREM_SCHEMA",
           "SCHEMAS"]


class SchemaError(ValueError):
    """A results file does not have the documented shape; the message names the path."""


_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def check(value: Any, spec: Any, path: str = "$") -> None:
    """Raise :class:`SchemaError` unless ``value`` matches ``spec``."""
    if callable(spec) and not isinstance(spec, (str, dict, list, tuple)):
        spec(value, path)
        return
    if isinstance(spec, str):
        nullable = spec.endswith("?")
        name = spec.rstrip("?")
        if value is None:
            if nullable or name == "any":
                return
            raise SchemaError(f"{path}: null where a {name} is required")
        if name == "any":
            return
        types = _TYPES[name]
        if isinstance(value, bool) and name != "bool":
            raise SchemaError(f"{path}: expected {name}, got a bool")
        if not isinstance(value, types):
            raise SchemaError(f"{path}: expected {name}, got {type(value).__name__} {value!r:.60}")
        return
    if isinstance(spec, tuple):
        if value not in spec:
            raise SchemaError(f"{path}: {value!r} is not one of {spec}")
        return
    if isinstance(spec, list):
        if not isinstance(value, list):
            raise SchemaError(f"{path}: expected a list, got {type(value).__name__}")
        for i, v in enumerate(value):
            check(v, spec[0], f"{path}[{i}]")
        return
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected an object, got {type(value).__name__}")
        for key, sub in spec.items():
            optional = key.endswith("?")
            k = key.rstrip("?")
            if k not in value:
                if optional:
                    continue
                raise SchemaError(f"{path}: missing key {k!r}")
            check(value[k], sub, f"{path}.{k}")
        return
    raise TypeError(f"bad spec {spec!r}")


def _map_of(spec):
    def f(value, path):
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected an object")
        for k, v in value.items():
            check(v, spec, f"{path}.{k}")
    return f


def _either(*specs):
    def f(value, path):
        errors = []
        for s in specs:
            try:
                check(value, s, path)
                return
            except SchemaError as e:
                errors.append(str(e))
        raise SchemaError(" / ".join(errors))
    return f


def _nullable(spec):
    def f(value, path):
        if value is not None:
            check(value, spec, path)
    return f


ENVIRONMENT = {"python": "str", "torch": "str", "auto_LiRPA": "str", "device": "str", "cpu_threads": "int",
               "created": "str", "argv": ["str"]}
ERROR = {"status": ("error",), "error": "str"}
CURVE = {"eps": ["float"], "certified_accuracy": ["float"]}
METHOD_OK = {"status": ("ok",), "one_pass": "bool", "n": "int", "time": "float",
             "results": [{"eps": "float", "certified_accuracy": "float", "time": "float"}],
             "curve": _nullable(CURVE), "extra": "any",
             # a method run under a time budget: the points it covered (the leading `points` of `of`)
             "budget?": {"seconds": "float", "probe_points": "int", "probe_time": "float", "points": "int",
                         "of": "int", "probes?": [["float"]]}}
METHOD_RECORD = _either(METHOD_OK, ERROR, {"status": ("n/a", "not run")})
PGD = _either({"status": ("ok",), "steps": "int", "restarts": "int",
               "results": [{"eps": "float", "accuracy": "float", "time": "float"}]}, ERROR)
METHOD_NAMES = tuple(m.value for m in METHODS)


def _methods(value, path):
    if not isinstance(value, dict) or set(value) != set(METHOD_NAMES):
        raise SchemaError(f"{path}: expected one record per method {METHOD_NAMES}, got "
                          f"{sorted(value) if isinstance(value, dict) else type(value).__name__}")
    for k, v in value.items():
        check(v, METHOD_RECORD, f"{path}.{k}")


RUN_MODEL_OK = {"key": "str", "label": "str", "preset": "str", "status": ("ok",), "model_name": "str",
                "family": tuple(f.value for f in FAMILIES), "training": "str", "n_params": "int",
                "train": {"time": "float", "epochs": "int", "cache": {"key": "str", "hit": "bool", "checkpoint": "str"},
                          "config": "any"},
                "evaluation": {"n": "int", "clean_accuracy": "float", "pgd": PGD, "methods": _methods}}
RUN_MODEL_ERR = {"key": "str", "label": "str", "preset": "str", "status": ("error",), "stage": "str",
                 "error": "str"}
COMPARISON = {"eps": "float", "linf_certified": "float", "linf_time": "float", "baseline_key": "str",
              "baseline_method": "str", "baseline_certified": "float", "baseline_time": "float",
              "accuracy_gap": "float", "speedup": "float?", "accuracy_met": "bool", "speed_met": "bool"}

RUN_SCHEMA = {
    "schema": ("comparisons.run",), "schema_version": "int", "command": ("run",), "environment": ENVIRONMENT,
    "settings": {"suite": "str", "dataset": "str", "eps": ["float"], "test_points": "int", "methods": ["str"],
                 "pgd_steps": "int", "seed": "int"},
    "models": [_either(RUN_MODEL_OK, RUN_MODEL_ERR)],
    "speed_accuracy": {"linf_model": "str?", "comparisons": [COMPARISON],
                       "goal": _nullable({"eps": ["float"], "criterion": "str", "met": "bool?"})},
    "wall_time": "float",
}

MIRMAN_ROW_OK = {"setting": "str", "dim": "int", "separation": "float", "net": "str", "group": "str",
                 "family": ("linf_dist", "relu"), "training": "str", "method": "str", "status": ("ok",),
                 "radius": ["float"], "capped": ["bool"], "min_radius": "float", "tolerance": "float",
                 "time": "float", "true_radius": _nullable(["float"]), "reaches_r": "bool", "below_r": "bool",
                 "certified_at?": {"0.999r": ["bool"], "r": ["bool"]}}
MIRMAN_ROW_ERR = {"setting": "str", "net": "str", "method": "str", "status": ("error",)}
MIRMAN_CHECK = {"kind": ("theorem", "observed"), "passed": "bool", "claim": "str", "detail": "str"}
FIGURE_DATA = {"net": "str", "description": "str", "r": "float", "boundary": "float", "points": ["float"], "x": ["float"], "f": ["float"],
               "eps": ["float"], "ibp": {"lower": ["float"], "upper": ["float"]},
               "crown": {"lower": ["float"], "upper": ["float"]},
               "true_range": {"lower": ["float"], "upper": ["float"]}}
MIRMAN_SCHEMA = {
    "schema": ("comparisons.mirman",), "schema_version": "int", "command": ("mirman",), "environment": ENVIRONMENT,
    "settings": {"r": "float", "dims": ["int"], "separations": ["float"], "bisect_steps": "int",
                 "alpha_bisect_steps": "int", "dtype": ("float64",), "true_radius_grid": "float",
                 "grid_per_r": "int"},
    "rows": [_either(MIRMAN_ROW_OK, MIRMAN_ROW_ERR)],
    "nets": [{"setting": "str", "net": "str", "group": "str", "family": "str", "training": "str",
              "n_params": "int", "description": "str"}],
    "figure_data": [FIGURE_DATA],
    "checks": [MIRMAN_CHECK],
    "wall_time": "float",
}

THEOREM_METHOD = _either({"status": ("ok",), "time": "float",
                          "results": [{"fraction": "float", "eps": "float", "certified_accuracy": "float",
                                       "time": "float"}]}, ERROR, {"status": ("n/a", "not run")})
THEOREM_NET = {"label": "str", "kind": "str", "status": "str", "n_params?": "int", "widths?": ["int"],
               "methods?": _map_of(THEOREM_METHOD)}
THEOREM_SCHEMA = {
    "schema": ("comparisons.theorem",), "schema_version": "int", "command": ("theorem",),
    "environment": ENVIRONMENT,
    "settings": {"fractions": ["float"], "datasets": ["str"]},
    "datasets": [{"dataset": "str", "n": "int", "r": "float", "status": "str", "nets": [THEOREM_NET],
                  "baselines": [THEOREM_NET]}],
    "skipped": [{"dataset": "str", "reason": "str"}],
    "wall_time": "float",
}

SCHEMAS = {"run": RUN_SCHEMA, "mirman": MIRMAN_SCHEMA, "theorem": THEOREM_SCHEMA}


def validate_results(results: dict) -> None:
    """Check a ``results.json`` dict against the schema of its ``command``.

    Raises:
        SchemaError: naming the first path that does not fit.
    """
    if not isinstance(results, dict) or results.get("command") not in SCHEMAS:
        raise SchemaError(f"$: not a comparisons results object (command must be one of {sorted(SCHEMAS)})")
    check(results, SCHEMAS[results["command"]])
