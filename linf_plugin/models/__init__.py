"""Every architecture, built by name from one registry, and safe checkpoints.

``create_model(name, input_shape=None, num_classes=None, **kwargs)`` (None =
the name's own default, ``model_defaults(name)``),
``list_models(filter="", family=None)``, ``register_model``, ``model_entrypoint``
(the entrypoint, as timm's) and ``model_info`` (the registry's record);
ℓ∞-dist nets (``LinfDistNet``), hybrids (``LinfDistHybrid``), ReLU baselines
(``ReluNet``), the constructive nets of Theorems 3.2 / A.2, and
``save_checkpoint`` / ``load_checkpoint``.
"""
from . import linf_dist as _linf_dist  # noqa: F401  (registers the models)
from . import relu as _relu  # noqa: F401
from . import base as _base
from .base import BOUND_PROPAGATION_METHODS, CertifiableModel
from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, Checkpoint, CheckpointError, capture_rng_state,
                         load_checkpoint, restore_rng_state, save_checkpoint)
from .constructive import construction_constants, theorem32_net, theoremA2_net, theoremA2_width
from .linf_dist import LinfDistHybrid, LinfDistNet
from .registry import (FAMILIES, GENERIC_DEFAULTS, UnknownModelError, create_model, is_model, list_models,
                       model_defaults, model_entrypoint, model_family, model_info, register_model)
from .relu import ReluNet

__all__ = ["create_model", "list_models", "register_model", "model_family", "model_entrypoint", "model_info",
           "is_model", "model_defaults", "GENERIC_DEFAULTS", "FAMILIES", "UnknownModelError", "CertifiableModel",
           "BOUND_PROPAGATION_METHODS",
           "LinfDistNet", "LinfDistHybrid", "ReluNet", "theorem32_net", "theoremA2_net", "theoremA2_width",
           "construction_constants", "save_checkpoint", "load_checkpoint", "Checkpoint", "CheckpointError",
           "capture_rng_state", "restore_rng_state", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]


def __getattr__(name: str):
    if name == "CERTIFICATES":  # deprecated: linf_plugin.names.METHODS
        return _base.__getattr__(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
