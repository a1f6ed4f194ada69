"""The networks of the three-point experiment: hand-built ReLU nets, small trained ones, ℓ∞-dist nets.

Two classes, A = 0 and B = 1.  The hand-built ReLU nets compute a scalar
``f`` and output the logits ``(f(x), 0)``: class A where ``f > 0``, B where
``f < 0`` (a tie ``f = 0`` goes to A, torch's ``argmax`` picks the first
index).  The margin the certificates bound is then ``f`` itself for A and
``−f`` for B, so IBP's interval of the margin is exactly IBP's interval of
``f`` (the constant logit adds no looseness).

* :func:`abs_net` — ``f = ReLU(x_a) + ReLU(−x_a) − b``: the decision boundary
  is ``|x_a| = b`` (``b = r·separation``, the midpoint), so the true robust
  radius is ``b`` at all three points, while IBP on the middle box
  ``[−ε, ε]`` gives ``f ∈ [−b, 2ε − b]``: certified only for ``ε < b/2``.
* :func:`tuned_net` — ``f = ReLU(x_a − ε0) + ReLU(−x_a − ε0) − (b − ε0)``: the
  same decision boundary, flat on ``[−ε0, ε0]``, so IBP certifies the middle
  box up to ``(b + ε0)/2`` (Baader et al.'s point: a net built for one ε).

Trained nets: :class:`SmallReluNet` (Linear/ReLU MLP on vectors) trained
with IBP or CROWN-IBP, and a small ``linf_dist_mlp`` trained with the
paper's mixture loss and p schedule — both with :func:`train_on_points`, a
short full-batch loop over the library's own objectives and schedules
(:mod:`linf_plugin.training` trains registered data sets only, and the three
points are not one).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from linf_plugin.names import BOUND_PROPAGATION_METHODS
from linf_plugin.training import Schedule, TrainConfig
from linf_plugin.training.objectives import make_objective

__all__ = ["SmallReluNet", "abs_net", "tuned_net", "train_on_points", "relu_train_config", "linf_train_config",
           "small_linf_net"]


class SmallReluNet(nn.Module):
    """A Linear/ReLU MLP on vectors ``(B, dim)`` with the attributes ``linf_plugin.certification`` reads.

    There is no input normalisation layer: the three-point data needs none,
    and auto_LiRPA 0.3 cannot run CROWN through the constant subtraction of
    ``InputNormalize`` on vector inputs (an IndexError in its broadcasting),
    so a registry ``ReluNet`` on ``(d,)`` inputs gets IBP only there.

    Args:
        dim: input dimension.
        hidden: widths of the hidden layers (may be empty: a linear classifier).
        num_classes: outputs.
        name: ``model_name`` shown in the results.
    """

    family = "relu"
    certificates = BOUND_PROPAGATION_METHODS
    lipschitz_linf = None

    def __init__(self, dim: int, hidden: Sequence[int], num_classes: int = 2, name: Optional[str] = None):
        super().__init__()
        layers, prev = [], dim
        for h in hidden:
            layers += [nn.Linear(prev, int(h)), nn.ReLU()]
            prev = int(h)
        layers.append(nn.Linear(prev, num_classes))
        self.body = nn.Sequential(*layers)
        self.input_shape = (dim,)
        self.num_classes = num_classes
        self.hidden = tuple(int(h) for h in hidden)
        self.model_name = name or f"relu_mlp_{'x'.join(map(str, self.hidden)) or 'linear'}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _two_relu_net(dim: int, axis: int, shift: float, offset: float, dtype, name: str) -> SmallReluNet:
    """Logits ``(ReLU(x_a − shift) + ReLU(−x_a − shift) − offset, 0)``."""
    net = SmallReluNet(dim, (2,), 2, name=name).to(dtype)
    first, last = net.body[0], net.body[2]
    with torch.no_grad():
        first.weight.zero_()
        first.weight[0, axis], first.weight[1, axis] = 1.0, -1.0
        first.bias.fill_(-shift)
        last.weight.zero_()
        last.weight[0, :] = 1.0
        last.bias.copy_(torch.tensor([-offset, 0.0], dtype=dtype))
    return net.eval()


def abs_net(boundary: float, dim: int = 1, axis: int = 0, dtype=torch.float64) -> SmallReluNet:
    """``f = ReLU(x_a) + ReLU(−x_a) − boundary``: truly robust up to ``boundary`` at 0 and ±2·boundary.

    Args:
        boundary: ``b``, where ``|x_a| = b`` separates B (inside) from A.
        dim, axis: input dimension and the coordinate the net reads.
        dtype: float64 for the exact comparisons.
    """
    return _two_relu_net(dim, axis, 0.0, boundary, dtype, "relu_abs (hand-built)")


def tuned_net(eps0: float, boundary: float, dim: int = 1, axis: int = 0, dtype=torch.float64) -> SmallReluNet:
    """``f = ReLU(x_a − ε0) + ReLU(−x_a − ε0) − (boundary − ε0)``: IBP-certifiable at the middle up to ``(b + ε0)/2``.

    Args:
        eps0: the ε the net is tuned for (``0 <= eps0 <= boundary``).
        boundary: ``b`` as in :func:`abs_net`.
    """
    if not 0 <= eps0 <= boundary:
        raise ValueError(f"need 0 <= eps0 <= boundary, got eps0={eps0}, boundary={boundary}")
    return _two_relu_net(dim, axis, eps0, boundary - eps0, dtype, f"relu_tuned (hand-built, eps0={eps0:g})")


def relu_train_config(bound: str, eps: float, steps: int = 300, lr: float = 0.01, seed: int = 0) -> TrainConfig:
    """Full-batch IBP / CROWN-IBP on the three points: ε ramps linearly 0 → ``eps`` over the first half.

    One "epoch" is one step (the batch is the whole set).
    """
    return TrainConfig(name=f"three-point-{bound}", model="mlp_3layer", dataset="digits", family="relu", bound=bound,
                       eps=eps, eps_train=eps, eps_ramp="linear", eps_ramp_start=steps // 10,
                       eps_ramp_epochs=steps // 2, epochs=steps, batch_size=3, lr=lr, adam_betas=(0.9, 0.999),
                       adam_eps=1e-8, lr_schedule="cosine", p_start=None, seed=seed)


def linf_train_config(theta: float, eps: float, steps: int = 400, seed: int = 0) -> TrainConfig:
    """The paper's recipe in miniature: p 8 → 1000 over the middle 3/4, then p = ∞; λ 0.05 → 0.002."""
    return TrainConfig(name="three-point-linf", model="linf_dist_mlp", dataset="digits", family="linf_dist", eps=eps,
                       theta=theta, lam0=0.05, lam_end=2e-3, p_start=8.0, p_end=1000.0, p_ramp_start=steps // 8,
                       p_ramp_epochs=(3 * steps) // 4, epochs=steps, batch_size=3, lr=0.02, adam_betas=(0.9, 0.99),
                       adam_eps=1e-10, lr_schedule="cosine", seed=seed)


def small_linf_net(dim: int, depth: int = 3, width: int = 16, dtype=torch.float64, seed: int = 0):
    """A registry ``linf_dist_mlp`` for ``(dim,)`` inputs, two classes, identity normalisation.

    Random (not identity) initialisation: with one input coordinate the
    identity init gives every hidden neuron the same weight, and identical
    neurons receive identical gradients forever.
    """
    from linf_plugin.models import create_model

    torch.manual_seed(seed)
    return create_model("linf_dist_mlp", input_shape=(dim,), num_classes=2, depth=depth, width=width,
                        identity_init=False).to(dtype)


def train_on_points(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> list:
    """Train ``model`` on the whole batch ``(x, y)`` for ``config.epochs`` steps with the library's objective.

    The objective (:func:`linf_plugin.training.objectives.make_objective`: the
    mixture loss for ℓ∞-dist nets, auto_LiRPA IBP / CROWN-IBP bounds for ReLU
    nets) and every schedule (:class:`linf_plugin.training.Schedule`: p, λ, ε,
    lr, CROWN-IBP factor) are the library's; this loop only steps Adam.

    Args:
        model: float64 model (left in eval mode, ℓp layers at the schedule's final p).
        x, y: ``(n, dim)`` points and ``(n,)`` labels.
        config: a :class:`TrainConfig` (``family``, ``bound``, schedule fields).

    Returns:
        ``[{"step", "loss", "p", "eps"}]`` every 50 steps and at the end.

    Raises:
        FloatingPointError: a non-finite loss (names the step).
    """
    from linf_plugin.nn import set_p

    torch.manual_seed(config.seed)
    objective = make_objective(config, model, (-math.inf, math.inf), x)
    special = {id(p) for _, ps in objective.extra_param_groups() for p in ps}  # the temperature
    main = [p for p in objective.parameters() if p.requires_grad and id(p) not in special]
    groups = [{"params": main, "lr_factor": 1.0}]
    if special:
        groups.append({"params": [p for p in objective.parameters() if id(p) in special],
                       "lr_factor": config.scale_lr_factor})
    opt = torch.optim.Adam(groups, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps)
    schedule = Schedule(config, steps_per_epoch=1)
    has_lp = config.family != "relu"
    history = []
    objective.train()
    model.train()
    for step in range(config.epochs):
        state = schedule.at(step)
        if has_lp:
            set_p(model, state.p)
        for g in opt.param_groups:
            g["lr"] = state.lr * g["lr_factor"]
        loss, _ = objective(x, y, state)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step} (p={state.p}, eps={state.eps})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == config.epochs - 1:
            history.append({"step": step, "loss": float(loss.detach()), "p": state.p, "eps": state.eps})
    if hasattr(objective, "sync_model"):
        objective.sync_model()
    if has_lp:
        set_p(model, schedule.at(config.epochs - 1).p)
    return history
