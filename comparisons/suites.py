"""What ``python -m comparisons run --suite NAME`` trains: one suite per data set, one spec per model.

A *suite* (``--suite``) names a data set, an ε grid and its models; each
model is a training *preset* of :mod:`linf_plugin.training` (``--preset``
there: a recipe of model, loss and schedules), and the harness only picks
presets and applies the user's overrides.  ``digits`` is the default and
``fashion-mnist`` the real-data suite, both sized for a CPU; ``mnist-0.3`` and
``cifar10-8/255`` are the paper's settings (a GPU and a local ``--data-root``
are expected).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from linf_plugin.training import EPOCH_FIELDS, TrainConfig, get_preset, list_presets, scale_epochs

__all__ = ["ModelSpec", "Suite", "SUITES", "get_suite", "select_models", "training_label", "scale_epochs",
           "parse_overrides", "apply_overrides", "build_config", "eps_label_list", "EPOCH_FIELDS"]


@dataclass(frozen=True)
class ModelSpec:
    """One model of a suite.

    Attributes:
        key: short name used by ``--models`` (``linf``, ``hybrid``, ``ibp``, ``crown-ibp``).
        preset: the :mod:`linf_plugin.training` preset that trains it.
        label: the row name in tables and plots.
    """

    key: str
    preset: str
    label: str


@dataclass(frozen=True)
class Suite:
    """A data set, an ε grid and the models compared on it."""

    name: str
    dataset: str
    eps: tuple
    models: tuple
    goal_eps: tuple = ()
    note: str = ""
    points: tuple = ()  # ((method, n), ...): default --points (a method too slow for the whole test set)
    budgets: tuple = ()  # ((method, seconds), ...): per model, that method runs on the points that fit (not --full)
    full_models: tuple = ()  # the models of --full (default: models)
    full_points: tuple = ()  # the --points of --full (default: points)
    pgd_points: Optional[int] = None  # PGD on the first n test points (None: all); --full attacks all of them

    def models_for(self, full: bool) -> tuple:
        return self.full_models if full and self.full_models else self.models

    def points_for(self, full: bool) -> dict:
        return dict(self.full_points if full and self.full_points else self.points)

    def budgets_for(self, full: bool) -> dict:
        return {} if full else dict(self.budgets)

    def pgd_points_for(self, full: bool) -> Optional[int]:
        return None if full else self.pgd_points

    def spec(self, key: str) -> ModelSpec:
        for m in self.models:
            if m.key == key:
                return m
        raise KeyError(key)


ALPHA_CROWN_CPU_POINTS = 10  # --full: α-CROWN on the first 10 digits test points
DIGITS_MODELS = (("linf", "ℓ∞-dist net"), ("hybrid", "ℓ∞-dist + MLP hybrid"), ("ibp", "ReLU CNN (IBP)"),
                 ("crown-ibp", "ReLU CNN (CROWN-IBP)"))
# seconds per model for the whole ε grid (docs/harness.md, "Time budget")
DIGITS_BUDGETS = (("crown", 20.0), ("alpha-crown", 20.0))
FASHION_MODELS = (("linf", "ℓ∞-dist net"), ("hybrid", "ℓ∞-dist + MLP hybrid"), ("ibp", "ReLU CNN (IBP)"),
                  ("crown-ibp", "ReLU CNN (CROWN-IBP)"))
FASHION_BUDGETS = (("crown", 20.0), ("alpha-crown", 20.0))

SUITES: Dict[str, Suite] = {
    "digits": Suite(
        "digits", "digits", (0.05, 0.1, 0.2),
        tuple(ModelSpec(k, f"digits-{k}-fast", label) for k, label in DIGITS_MODELS),
        goal_eps=(0.1, 0.2),
        note="scikit-learn digits (8x8, embedded), CPU-sized presets",
        # The default run fits in ten minutes on 2 CPU cores: CROWN on the ReLU CNNs costs ~0.2 s a point for
        # the grid and α-CROWN ~20 s a point (dense α on auto_LiRPA 0.3), so both run on the leading test
        # points that fit their per-model budget; every other method (and PGD) sees all 360 points.
        budgets=DIGITS_BUDGETS,
        full_models=tuple(ModelSpec(k, f"digits-{k}", label) for k, label in DIGITS_MODELS),
        full_points=(("alpha-crown", ALPHA_CROWN_CPU_POINTS),)),
    "fashion-mnist": Suite(
        "fashion-mnist", "fashion-mnist", (0.05, 0.1, 0.2),
        tuple(ModelSpec(k, f"fashion-mnist-{k}-cpu", label) for k, label in FASHION_MODELS),
        goal_eps=(0.1,),
        note="Fashion-MNIST (28x28, `make data`), CPU-sized presets; margin, interval, IBP and CROWN-IBP on all "
             "10,000 test points",
        # CROWN and α-CROWN on the leading points that fit their per-model budget, PGD-100 on the first 1,000
        # points (the rest of the half hour goes to training); --full: PGD on all points, CROWN on the first
        # 1,000 and α-CROWN on the first 10, no budgets
        budgets=FASHION_BUDGETS, pgd_points=1000,
        full_points=(("crown", 1000), ("alpha-crown", ALPHA_CROWN_CPU_POINTS))),
    "mnist-0.3": Suite(
        "mnist-0.3", "mnist", (0.1, 0.2, 0.3),
        (ModelSpec("linf", "mnist-0.3", "ℓ∞-dist net 5×5120"),
         ModelSpec("hybrid", "mnist-0.3-hybrid", "ℓ∞-dist + MLP hybrid"),
         ModelSpec("ibp", "mnist-0.3-ibp", "ReLU cnn_7layer_bn (IBP)"),
         ModelSpec("crown-ibp", "mnist-0.3-crown-ibp", "ReLU cnn_7layer_bn (CROWN-IBP)")),
        note="the paper's MNIST eps = 0.3 setting (GPU; --data-root)"),
    "cifar10-8/255": Suite(
        "cifar10-8/255", "cifar10", (2 / 255, 4 / 255, 8 / 255),
        (ModelSpec("linf", "cifar10-8/255", "ℓ∞-dist net 6×5120"),
         ModelSpec("hybrid", "cifar10-8/255-hybrid", "ℓ∞-dist + MLP hybrid"),
         ModelSpec("ibp", "cifar10-8/255-ibp", "ReLU cnn_7layer_bn (IBP)"),
         ModelSpec("crown-ibp", "cifar10-8/255-crown-ibp", "ReLU cnn_7layer_bn (CROWN-IBP)")),
        note="the paper's CIFAR-10 eps = 8/255 setting (GPU; --data-root)"),
}


def get_suite(name: str) -> Suite:
    """The suite called ``name``.

    Raises:
        ValueError: an unknown name (the suites are listed).
    """
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from {sorted(SUITES)} (a suite is a data set and its "
                         f"models; training presets are chosen with --models)")
    return SUITES[name]


def select_models(suite: Suite, names: Optional[Sequence[str]], full: bool = False) -> List[ModelSpec]:
    """The suite's models (its ``--full`` ones if ``full``) named by ``names`` (keys like ``linf`` or presets).

    Raises:
        ValueError: an unknown name (keys and presets are listed).
    """
    models = suite.models_for(full)
    if not names:
        return list(models)
    out = []
    presets = set(list_presets())
    for n in names:
        n = n.strip()
        match = [m for m in models if n in (m.key, m.preset)]
        if match:
            out.append(match[0])
        elif n in presets:
            out.append(ModelSpec(n, n, n))
        else:
            raise ValueError(f"unknown model {n!r} for suite {suite.name}: use one of "
                             f"{[m.key for m in models]} or a training preset from {sorted(presets)}")
    keys = [m.key for m in out]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--models names a model twice: {keys}")
    return out


def training_label(config: TrainConfig) -> str:
    """How a model was trained, for the tables."""
    if config.family == "linf_dist":
        return "ℓ∞-dist recipe (paper)"
    if config.family == "hybrid":
        return "hybrid-IBP"
    return {"ibp": "IBP", "crown-ibp": "CROWN-IBP"}.get(config.bound, config.bound)


# Fields counted in epochs: scaled together by --epochs so that short runs keep the recipe's shape.
def parse_overrides(items: Optional[Sequence[str]]) -> Dict[str, dict]:
    """``["epochs=2", "linf.model_kwargs={\"width\": 16}"]`` → ``{"*": {"epochs": 2}, "linf": {...}}``.

    Values are JSON (bare words are taken as strings).  A ``MODEL.`` prefix
    restricts the override to one model key.

    Raises:
        ValueError: malformed item or unknown config field.
    """
    out: Dict[str, dict] = {}
    fields = set(TrainConfig.field_names())
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--set expects [MODEL.]FIELD=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        target, _, fname = name.rpartition(".")
        target = target or "*"
        if fname not in fields:
            raise ValueError(f"--set {item!r}: unknown training config field {fname!r}; fields are {sorted(fields)}")
        try:
            v = json.loads(value)
        except json.JSONDecodeError:
            v = value
        if isinstance(v, list) and fname in ("adam_betas", "lr_milestones"):
            v = tuple(v)
        out.setdefault(target, {})[fname] = v
    return out


def apply_overrides(config: TrainConfig, key: str, overrides: Dict[str, dict]) -> TrainConfig:
    """Apply the ``*`` overrides, then the ones for model ``key``."""
    kw = dict(overrides.get("*", {}))
    kw.update(overrides.get(key, {}))
    return config.replace(**kw) if kw else config


def build_config(spec: ModelSpec, *, epochs: Optional[int] = None, overrides: Optional[Dict[str, dict]] = None,
                 **runtime) -> TrainConfig:
    """The training config of ``spec``: preset → ``--epochs`` scaling → ``--set`` overrides → runtime fields."""
    cfg = get_preset(spec.preset)
    if epochs is not None:
        cfg = scale_epochs(cfg, epochs)
    cfg = apply_overrides(cfg, spec.key, overrides or {})
    runtime = {k: v for k, v in runtime.items() if v is not None}
    if cfg.dataset == "digits":  # the data root is for data sets read from files; digits is embedded
        runtime.pop("data_root", None)
    return cfg.replace(**runtime).validate() if runtime else cfg.validate()


def eps_label_list(eps: Sequence[float]) -> List[float]:
    """Check an ε grid: finite, >= 0, sorted ascending, no duplicates."""
    out = sorted(float(e) for e in eps)
    for e in out:
        if not (math.isfinite(e) and e >= 0):
            raise ValueError(f"every eps must be finite and >= 0, got {e}")
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate eps in {out}")
    if not out:
        raise ValueError("the eps grid is empty")
    return out
