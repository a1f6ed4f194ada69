"""Training of both families: ℓ∞-dist nets (the 2022 paper's recipe) and IBP / CROWN-IBP baselines.

``train(config) -> TrainResult`` trains any registry model with its family's
recipe (ℓ∞-dist: mixture loss with the ℓp relaxation; hybrids: robust CE
on interval bounds; ReLU nets: auto_LiRPA IBP / CROWN-IBP), with
checkpoints after every epoch, exact resume, progress bars, JSON-lines logs,
periodic certified evaluation, DDP under ``torchrun`` and callbacks
(``train(config, callbacks=[...])``, :mod:`linf_plugin.training.callbacks`).
``get_preset(name)`` / ``list_presets()`` give the paper's and the baselines'
recipes; ``python -m linf_plugin.training --preset digits-linf --out runs/x``
is the CLI.
"""
from .callbacks import Callback
from .config import FAMILIES, RUNTIME_FIELDS, ConfigError, TrainConfig, sanitize_name
from .losses import MixtureLoss, bound_loss, clipped_hinge, margin_spec, robust_cross_entropy
from .presets import EPOCH_FIELDS, PresetError, get_preset, list_presets, register_preset, scale_epochs
from .schedules import Schedule, ScheduleState
from .trainer import TrainingDivergedError, TrainResult, train

__all__ = ["train", "Callback", "TrainConfig", "TrainResult", "TrainingDivergedError", "ConfigError", "PresetError",
           "get_preset", "list_presets", "register_preset", "Schedule", "ScheduleState", "MixtureLoss",
           "clipped_hinge", "bound_loss", "robust_cross_entropy", "margin_spec", "sanitize_name", "FAMILIES",
           "RUNTIME_FIELDS", "scale_epochs", "EPOCH_FIELDS"]
