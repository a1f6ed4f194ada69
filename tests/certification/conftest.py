"""Trained digits models of both families, built once per session (seconds each).

The trainers here are deliberately small: these tests check invariants of
certification and attacks on *trained* models, not the training recipes
(linf_plugin.training has its own tests).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linf_plugin.data import dataset_info, load_dataset
from linf_plugin.lirpa import bounded_module
from linf_plugin.models import create_model
from linf_plugin.nn import set_p


def _train_linf(seed: int = 0):
    torch.manual_seed(seed)
    info = dataset_info("digits")
    tr = load_dataset("digits", "train")
    net = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=4, width=96,
                       mean=info.mean, std=info.std)
    scale = torch.nn.Parameter(torch.ones(()))
    opt = torch.optim.Adam([{"params": net.parameters()}, {"params": [scale], "lr": 0.004}], lr=0.02,
                           betas=(0.9, 0.99), eps=1e-10)
    epochs = 24
    theta = 2 * 0.15 / info.std  # hinge threshold in logit units
    for epoch in range(epochs):
        frac = min(1.0, epoch / (epochs - 6))
        p = math.inf if epoch >= epochs - 6 else 8.0 * (1000 / 8.0) ** frac
        set_p(net, p)
        lam = 0.0 if math.isinf(p) else 0.05 * (1 - frac)
        net.train()
        for xb, yb in tr.loader(batch_size=128, shuffle=True):
            logits = net(xb)
            true = logits.gather(1, yb[:, None])
            other = logits.scatter(1, yb[:, None], -math.inf).amax(1, keepdim=True)
            hinge = torch.clamp(1 - (true - other) / theta, min=0).clamp(max=1).mean()
            loss = lam * F.cross_entropy(scale * logits, yb) + hinge
            opt.zero_grad()
            loss.backward()
            opt.step()
    set_p(net, math.inf)
    return net.eval()


def _train_relu_ibp(seed: int = 0, eps_train: float = 0.1):
    from auto_LiRPA import BoundedTensor, PerturbationLpNorm

    from linf_plugin.certification.bound_prop import margin_spec

    torch.manual_seed(seed)
    info = dataset_info("digits")
    tr = load_dataset("digits", "train")
    net = create_model("mlp_3layer", input_shape=(1, 8, 8), num_classes=10, mean=info.mean, std=info.std)
    bounded = bounded_module(net, tr.x[:1])
    opt = torch.optim.Adam(bounded.parameters(), lr=2e-3)
    epochs = 20
    for epoch in range(epochs):
        eps = eps_train * min(1.0, (epoch + 1) / 12)
        for xb, yb in tr.loader(batch_size=128, shuffle=True):
            ptb = PerturbationLpNorm(norm=math.inf, eps=eps, x_L=(xb - eps).clamp(0, 1), x_U=(xb + eps).clamp(0, 1))
            lb, _ = bounded.compute_bounds(x=(BoundedTensor(xb, ptb),), C=margin_spec(yb, 10), method="IBP",
                                           bound_upper=False)
            robust = F.cross_entropy(torch.cat([torch.zeros_like(lb[:, :1]), -lb], 1),
                                     torch.zeros_like(yb))
            loss = 0.5 * F.cross_entropy(bounded(xb), yb) + 0.5 * robust
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def _train_hybrid(seed: int = 0):
    torch.manual_seed(seed)
    info = dataset_info("digits")
    tr = load_dataset("digits", "train")
    net = create_model("linf_dist_hybrid", input_shape=(1, 8, 8), num_classes=10, depth=2, width=64,
                       head_hidden=64, mean=info.mean, std=info.std)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for epoch in range(8):
        set_p(net, 8.0 if epoch < 4 else math.inf)
        net.train()
        for xb, yb in tr.loader(batch_size=128, shuffle=True):
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="session")
def trained_linf():
    return _train_linf()


@pytest.fixture(scope="session")
def trained_relu():
    return _train_relu_ibp()


@pytest.fixture(scope="session")
def trained_hybrid():
    return _train_hybrid()


@pytest.fixture(scope="session")
def digits_test():
    return load_dataset("digits", "test")
