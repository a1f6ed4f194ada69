"""Multi-process training with torch DDP (launched by ``torchrun``), and batch statistics over the GLOBAL batch.

``torchrun --nproc-per-node N -m linf_plugin.training ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables;
:func:`init_distributed` joins the group (gloo on CPU, nccl on CUDA) and
picks the device.  Rank 0 alone writes logs and checkpoints.

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

import os
import types
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..nn import MeanShiftNorm

__all__ = ["DistContext", "init_distributed", "shutdown_distributed", "SyncMeanShiftNorm",
           "convert_sync_mean_shift", "sync_bound_batchnorm", "global_mean", "all_reduce_sum", "resolve_device"]


@dataclass
class DistContext:
    """Where this process runs.

    Attributes:
        world_size, rank, local_rank: the DDP layout (1, 0, 0 without DDP).
        device: this process's device.
        backend: the process-group backend, or None without DDP.
        owns_group: this context initialised the process group (and tears it down).
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; anything else as given."""
    if device in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but CUDA is not available; use device='cpu'")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str = "auto", backend: Optional[str] = None) -> DistContext:
    """Join the DDP group when launched by ``torchrun`` (``WORLD_SIZE > 1``); else a one-process context.

    Args:
        device: ``auto`` | ``cpu`` | ``cuda`` (each rank takes ``cuda:LOCAL_RANK``).
        backend: ``gloo`` | ``nccl`` | ``mpi``; None = nccl on CUDA, gloo on CPU.

    Returns:
        A :class:`DistContext`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        # torch._dynamo imported while a process group exists (DDP's constructor imports it) keeps
        # that group alive past destroy_process_group (seen with torch 2.14): its gloo threads then
        # run on into interpreter exit, where a rank now and then aborts ("terminate called without
        # an active exception") after its work is done.  Imported before the group, it holds nothing.
        import torch._dynamo  # noqa: F401

        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend)
        owns = True
    return DistContext(world_size=dist.get_world_size(), rank=dist.get_rank(), local_rank=local_rank, device=dev,
                       backend=dist.get_backend(), owns_group=owns)


def shutdown_distributed(ctx: DistContext) -> None:
    """Destroy the process group if ``ctx`` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


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
