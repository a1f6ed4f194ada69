"""Multi-process training with torch DDP (launched by ``torchrun``), and batch statistics over the GLOBAL batch.

``torchrun --nproc-per-node N -m linf_plugin.training ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables;
:func:`~linf_plugin.distributed.init_distributed` joins the group (gloo on
CPU, nccl on CUDA; shared with sharded certification) and picks the
device.  Rank 0 alone writes logs and checkpoints.

DDP averages gradients over ranks, so the loss of each rank must be the mean
over its local batch, and every statistic computed over the batch must be
computed over the GLOBAL batch for N ranks to match one process that sees
the whole batch (what ``SyncBatchNorm`` does for batch norm):

* :class:`SyncMeanShiftNorm` replaces :class:`~linf_plugin.nn.MeanShiftNorm`
  (:func:`convert_sync_mean_shift`): the batch mean is all-reduced with a
  differentiable all-reduce, whose backward all-reduces the gradients, so
  each rank's parameter gradient gets the other ranks' contributions through
  the shared mean, and the DDP average equals the single-process gradient.
* :func:`sync_bound_batchnorm` does the same for the batch-norm nodes of an
  auto_LiRPA ``BoundedModule`` (torch's ``SyncBatchNorm`` neither runs on
  CPU nor is what auto_LiRPA traces; the bound nodes compute their own batch
  statistics, which the IBP / CROWN bounds then use).
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn

from ..nn import MeanShiftNorm

__all__ = ["SyncMeanShiftNorm", "convert_sync_mean_shift", "sync_bound_batchnorm", "global_mean", "all_reduce_sum"]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (in place; a no-op without DDP).  Not differentiable."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is again a sum over ranks.

    Rank r's loss L_r depends on the sum S through every rank's input, so
    d(Σ_r L_r)/dx_q = Σ_r dL_r/dS · dS/dx_q: the incoming gradients are summed.
    """

    @staticmethod
    def forward(ctx, t):
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _diff_all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(t)


def global_mean(x: torch.Tensor, dims) -> torch.Tensor:
    """Mean of ``x`` over ``dims`` and over every rank's batch, differentiable (equal-size or not).

    Without DDP this is ``x.mean(dims)``.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x.mean(dims)
    n = 1
    for d in dims:
        n *= x.shape[d]
    count = all_reduce_sum(torch.tensor([float(n)], device=x.device, dtype=x.dtype))
    return _diff_all_reduce_sum(x.sum(dims)) / count


class SyncMeanShiftNorm(MeanShiftNorm):
    """:class:`MeanShiftNorm` whose training-mode mean is over the global batch of all DDP ranks.

    Identical to the parent without DDP or in eval mode.  The running mean is
    updated with the global mean, so every rank keeps the same buffer.
    """

    # read by the margin and interval certificates, which trust only the
    # library's own forwards: in eval mode this one is MeanShiftNorm.forward
    eval_forward_is_parents = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"SyncMeanShiftNorm({self.num_features}) expects input of shape (B, "
                             f"{self.num_features}), got {tuple(x.shape)}")
        mean = global_mean(x, [0])
        with torch.no_grad():
            self.running_mean.mul_(1.0 - self.momentum).add_(mean.detach().to(self.running_mean.dtype),
                                                             alpha=self.momentum)
        return x - mean


def convert_sync_mean_shift(module: nn.Module) -> nn.Module:
    """Replace every :class:`MeanShiftNorm` inside ``module`` by a :class:`SyncMeanShiftNorm` (same state).

    Returns:
        ``module`` (changed in place; a bare ``MeanShiftNorm`` is returned converted).
    """
    def convert(m: nn.Module) -> nn.Module:
        if isinstance(m, MeanShiftNorm) and not isinstance(m, SyncMeanShiftNorm):
            new = SyncMeanShiftNorm(m.num_features, m.momentum, device=m.running_mean.device,
                                    dtype=m.running_mean.dtype)
            new.running_mean.copy_(m.running_mean)
            new.train(m.training)
            return new
        return m

    for name, child in list(module.named_children()):
        new = convert(child)
        if new is not child:
            setattr(module, name, new)
        else:
            convert_sync_mean_shift(child)
    return convert(module)


def _sync_bn_forward(self, x, w, b, m, v):
    """Training-mode forward of an auto_LiRPA batch-norm node with statistics over all ranks."""
    if not self.training:
        return type(self).forward(self, x, w, b, m, v)
    dims = [0] + list(range(2, x.ndim))
    mean = global_mean(x, dims)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    var = global_mean((x - mean.view(shape)) ** 2, dims)
    self.current_mean, self.current_var = mean, var
    if hasattr(self, "_check_unused_mean_or_var"):
        self._check_unused_mean_or_var()
    if getattr(self, "use_affine", True) is False:
        w, b = torch.ones_like(w), torch.zeros_like(b)
    with torch.no_grad():
        n = x.numel() / x.shape[1]
        n_all = all_reduce_sum(torch.tensor([n], dtype=x.dtype, device=x.device)).item()
        unbiased = var.detach() * (n_all / max(n_all - 1.0, 1.0))
        m.mul_(1.0 - self.momentum).add_(mean.detach(), alpha=self.momentum)
        v.mul_(1.0 - self.momentum).add_(unbiased, alpha=self.momentum)
    scale = w / torch.sqrt(self.current_var + self.eps)
    return scale.view(shape) * (x - self.current_mean.view(shape)) + b.view(shape)


def sync_bound_batchnorm(bounded_module) -> int:
    """Make every batch-norm node of an auto_LiRPA ``BoundedModule`` use global batch statistics.

    Outside DDP the nodes behave as before (the patched forward falls back to
    the class's own when the group has one rank or the node is in eval mode).

    Returns:
        The number of nodes patched.
    """
    from auto_LiRPA.operators import BoundBatchNormalization

    count = 0
    for node in bounded_module.modules():
        if isinstance(node, BoundBatchNormalization):
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                node.forward = types.MethodType(_sync_bn_forward, node)
                count += 1
    return count
