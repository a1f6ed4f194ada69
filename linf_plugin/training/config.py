"""The training configuration: one dataclass that every preset fills and the CLI overrides field by field."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Optional, Tuple

from ..names import FAMILIES

__all__ = ["TrainConfig", "FAMILIES", "BOUNDS", "ConfigError", "sanitize_name", "RUNTIME_FIELDS", "DEPRECATED_FIELDS"]

BOUNDS = ("ibp", "crown-ibp")
FEATURE_BOUNDS = ("lipschitz", "interval")

#: Fields kept one release for compatibility: {field: what to use instead}.
DEPRECATED_FIELDS = {"stop_after_epoch": "train(config, callbacks=[...]) with an on_epoch_end hook"}

# Fields that only change how a run is executed, not what it computes: a
# resumed run may change them freely.
RUNTIME_FIELDS = frozenset({"device", "num_threads", "progress", "out_dir", "resume", "stop_after_epoch",
                            "eval_every", "eval_batch_size", "eval_subset", "data_root", "ddp_backend",
                            "log_every", "name"})


class ConfigError(ValueError):
    """A training configuration is invalid; the message names the field and the choices."""


def sanitize_name(name: str) -> str:
    """A file-system-safe version of a preset or run name (``cifar10-8/255`` → ``cifar10-8_255``)."""
    out = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(name)).strip("._")
    return out or "run"


@dataclass
class TrainConfig:
    """Everything one training run needs; presets fill it, the CLI overrides any field.

    ε, θ and every radius are in PIXEL units (models normalise inside).

    What to train:
        name: run / preset name (free text; sanitised before use in paths).
        model: registry name (``linf_plugin.models.list_models()``).
        model_kwargs: extra keyword arguments of ``create_model``.
        dataset: ``digits`` | ``fashion-mnist`` | ``mnist`` | ``cifar10``; ``data_root`` its folder
            (files only: digits is embedded).
        train_subset, test_subset: use only the first n samples (tests, quick runs).
        family: ``linf_dist`` | ``hybrid`` | ``relu``; None = the model's family.
        eps: the ε at which certified accuracy is evaluated.

    Optimisation (both families):
        epochs, batch_size (GLOBAL batch; split across DDP ranks), lr,
        adam_betas, adam_eps, weight_decay, grad_clip (max grad norm or None),
        lr_schedule (``cosine`` | ``step`` | ``constant``), lr_cosine_start
        (epochs at constant lr before the cosine), lr_milestones / lr_gamma
        (``step``).

    ℓ∞-dist family (mixture loss, Zhang et al. 2022):
        theta: hinge threshold θ (pixel units; the paper's Table 3 value,
            θ = 2·ε_train); lam0, lam_end: λ0 → λend; scale_lr_factor: the
            temperature's lr relative to ``lr`` (1/5).
        p_start, p_end, p_ramp_start (e1 epochs), p_ramp_epochs (e2 epochs):
            the ℓp relaxation; p = ∞ afterwards (e3 = epochs − e1 − e2).
            ``p_start=None`` keeps p = ∞ throughout.

    Bound-based families (ReLU baselines via auto_LiRPA; hybrids):
        bound: ``ibp`` | ``crown-ibp``; eps_train: the largest training ε;
        eps_ramp (``smoothed`` | ``linear``), eps_ramp_start (warm-up epochs at
        ε = 0), eps_ramp_epochs, eps_ramp_mid, eps_ramp_beta;
        natural_weight_start / _end: weight of the natural CE (the rest is
        robust CE), interpolated over the ε ramp.
        feature_bounds (hybrids): ``lipschitz`` (features ± ε/std, the 2021
            paper) or ``interval`` (exact interval propagation, sound at any p).
        head_lr_scale (hybrids): scale the head weights' lr by 1/sqrt(fan_in),
            which reproduces the authors' parametrisation under Adam.

    Data augmentation: crop_padding (random crop after edge padding; 0 = off), hflip.

    Running: seed, device (``auto`` | ``cpu`` | ``cuda`` | ``cuda:1``),
    num_threads (CPU threads; None = torch's default), deterministic,
    eval_every (epochs; 0 = at the end only), eval_batch_size, eval_subset,
    log_every (steps between progress-bar updates), progress (None = when
    stderr is a TTY), out_dir, resume, ddp_backend (None = nccl on CUDA,
    gloo on CPU).

    Deprecated: stop_after_epoch (the process killed itself with SIGKILL
    right after that epoch's checkpoint; it still does, with a
    ``DeprecationWarning``, for one release): pass ``train(config,
    callbacks=[...])`` an ``on_epoch_end`` hook instead.
    """

    name: str = "custom"
    model: str = "linf_dist_mlp_5x128"
    model_kwargs: dict = field(default_factory=dict)
    dataset: str = "digits"
    data_root: Optional[str] = None
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    family: Optional[str] = None
    eps: float = 0.1

    epochs: int = 10
    batch_size: int = 512
    lr: float = 0.03
    adam_betas: Tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-10
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None
    lr_schedule: str = "cosine"
    lr_cosine_start: int = 0
    lr_milestones: Tuple[int, ...] = ()
    lr_gamma: float = 0.1

    theta: Optional[float] = None
    lam0: float = 0.05
    lam_end: float = 2e-4
    scale_lr_factor: float = 0.2
    p_start: Optional[float] = 8.0
    p_end: float = 1000.0
    p_ramp_start: int = 0
    p_ramp_epochs: int = 0

    bound: str = "ibp"
    eps_train: float = 0.0
    eps_ramp: str = "smoothed"
    eps_ramp_start: int = 0
    eps_ramp_epochs: int = 0
    eps_ramp_mid: float = 0.25
    eps_ramp_beta: float = 4.0
    natural_weight_start: float = 0.0
    natural_weight_end: float = 0.0
    feature_bounds: str = "lipschitz"
    head_lr_scale: bool = False

    crop_padding: int = 0
    hflip: bool = False

    seed: int = 0
    device: str = "auto"
    num_threads: Optional[int] = None
    deterministic: bool = True
    eval_every: int = 1
    eval_batch_size: int = 1024
    eval_subset: Optional[int] = None
    log_every: int = 10
    progress: Optional[bool] = None
    out_dir: Optional[str] = None
    resume: bool = False
    stop_after_epoch: Optional[int] = None
    ddp_backend: Optional[str] = None

    # ------------------------------------------------------------------ helpers
    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` applied (unknown names raise :class:`ConfigError` listing the fields)."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; fields are {self.field_names()}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict:
        """JSON-able dict (tuples become lists, ∞ becomes the string ``"inf"``)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Enum):  # a Family: plain str, so checkpoints stay weights_only-loadable
                v = v.value
            if isinstance(v, tuple):
                v = list(v)
            if isinstance(v, float) and math.isinf(v):
                v = "inf"
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; fields are {cls.field_names()}")
        kw = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if v == "inf":
                v = math.inf
            if f.name in ("adam_betas", "lr_milestones") and v is not None:
                v = tuple(v)
            kw[f.name] = v
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def differences(self, other: "TrainConfig", ignore=RUNTIME_FIELDS) -> dict:
        """``{field: (self value, other value)}`` for fields that differ (runtime fields ignored)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in ignore and a[k] != b[k]}

    @property
    def run_name(self) -> str:
        """File-system-safe run name."""
        return sanitize_name(self.name)

    # --------------------------------------------------------------- validation
    def validate(self) -> "TrainConfig":
        """Check names and ranges; fill ``family`` from the model.  Returns ``self``.

        Raises:
            ConfigError: naming the field, the bad value and the choices.
        """
        from ..data import list_datasets
        from ..models import list_models, model_family

        if self.dataset not in list_datasets():
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose from {list_datasets()}")
        if self.dataset == "digits" and self.data_root is not None:
            raise ConfigError("data_root is for data sets read from files (fashion-mnist, mnist, cifar10); "
                              "digits is embedded: drop data_root (--data-root)")
        if self.model not in list_models():
            raise ConfigError(f"unknown model {self.model!r}; choose from {list_models()}")
        fam = model_family(self.model)
        if self.family is None:
            self.family = fam
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown family {self.family!r}; choose from {[f.value for f in FAMILIES]}")
        if self.family != fam:
            raise ConfigError(f"model {self.model!r} belongs to family {fam!r}, but the config says "
                              f"{self.family!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"model_kwargs must be a dict, got {self.model_kwargs!r}")

        def positive_int(name, allow_zero=False):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                raise ConfigError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} int, got {v!r}")

        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            positive_int(name)
        for name in ("p_ramp_start", "p_ramp_epochs", "eps_ramp_start", "eps_ramp_epochs", "crop_padding",
                     "eval_every", "lr_cosine_start", "seed"):
            positive_int(name, allow_zero=True)
        for name in ("train_subset", "test_subset", "eval_subset", "num_threads"):
            if getattr(self, name) is not None:
                positive_int(name)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be positive and finite, got {self.lr!r}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ConfigError(f"eps must be a finite number >= 0 (pixel units), got {self.eps!r}")
        if self.lr_schedule not in ("cosine", "step", "constant"):
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}; choose from ['cosine', 'step', 'constant']")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be positive or None, got {self.grad_clip!r}")
        if len(tuple(self.adam_betas)) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if self.p_start is not None:
            if not (1 <= self.p_start <= self.p_end):
                raise ConfigError(f"need 1 <= p_start <= p_end, got p_start={self.p_start}, p_end={self.p_end}")
        if self.family == "linf_dist":
            if self.theta is None or not (math.isfinite(self.theta) and self.theta > 0):
                raise ConfigError(f"the ℓ∞-dist mixture loss needs a positive hinge threshold theta (pixel "
                                  f"units, θ = 2·ε_train), got {self.theta!r}")
            if self.lam0 < 0 or self.lam_end < 0 or (self.lam0 > 0) != (self.lam_end > 0):
                raise ConfigError(f"lam0 and lam_end must both be positive (or both 0), got {self.lam0}, "
                                  f"{self.lam_end}")
            if not self.scale_lr_factor >= 0:
                raise ConfigError(f"scale_lr_factor must be >= 0, got {self.scale_lr_factor}")
        else:
            if self.bound not in BOUNDS:
                raise ConfigError(f"unknown bound {self.bound!r}; choose from {list(BOUNDS)}")
            if self.family == "hybrid" and self.bound != "ibp":
                raise ConfigError("hybrids train with interval bounds only (bound='ibp')")
            if not (math.isfinite(self.eps_train) and self.eps_train >= 0):
                raise ConfigError(f"eps_train must be a finite number >= 0, got {self.eps_train!r}")
            if self.eps_ramp not in ("smoothed", "linear"):
                raise ConfigError(f"unknown eps_ramp {self.eps_ramp!r}; choose from ['smoothed', 'linear']")
            if not (self.eps_ramp_beta >= 2 and 0 <= self.eps_ramp_mid <= 1):
                raise ConfigError(f"eps_ramp_beta must be >= 2 and eps_ramp_mid in [0, 1], got "
                                  f"{self.eps_ramp_beta}, {self.eps_ramp_mid}")
            for name in ("natural_weight_start", "natural_weight_end"):
                if not 0 <= getattr(self, name) <= 1:
                    raise ConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
            if self.feature_bounds not in FEATURE_BOUNDS:
                raise ConfigError(f"unknown feature_bounds {self.feature_bounds!r}; choose from "
                                  f"{list(FEATURE_BOUNDS)}")
        if self.stop_after_epoch is not None and not (0 < self.stop_after_epoch <= self.epochs):
            raise ConfigError(f"stop_after_epoch must lie in [1, epochs={self.epochs}], got {self.stop_after_epoch}")
        if self.ddp_backend not in (None, "gloo", "nccl", "mpi"):
            raise ConfigError(f"unknown ddp_backend {self.ddp_backend!r}; choose from [None, 'gloo', 'nccl', 'mpi']")
        return self
