"""Small test nets built from ``LpDistFunction`` directly (no nn/models dependency).

``LinfNet``: normalise -> flatten -> [LpDist -> mean shift] x (depth-1) ->
LpDist + bias -> negate.  ``HybridNet``: the same l_p-dist features, then
Linear -> tanh/ReLU -> Linear.  Both are in eval form: the mean shift is a
constant buffer.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from linf_plugin.ops import LpDistFunction


class LpDist(nn.Module):
    def __init__(self, d_in, d_out, p=math.inf, bias=False, shift=False, gen=None, dtype=torch.float32):
        super().__init__()
        self.p = float(p)
        self.weight = nn.Parameter(torch.randn(d_out, d_in, generator=gen, dtype=dtype))
        self.bias = nn.Parameter(0.3 * torch.randn(d_out, generator=gen, dtype=dtype)) if bias else None
        if shift:
            self.register_buffer("running_mean", torch.randn(d_out, generator=gen, dtype=dtype))
        else:
            self.running_mean = None

    def forward(self, x):
        y = LpDistFunction.apply(x, self.weight, self.p, "reference")
        if self.running_mean is not None:
            y = y - self.running_mean
        if self.bias is not None:
            y = y + self.bias
        return y


class LinfNet(nn.Module):
    def __init__(self, d_in, widths, n_out, p=math.inf, seed=0, dtype=torch.float32, mean=0.1, std=0.5):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.mean, self.std = mean, std
        dims = [d_in, *widths]
        self.layers = nn.ModuleList([LpDist(a, b, p, shift=True, gen=gen, dtype=dtype) for a, b in zip(dims, dims[1:])])
        self.layers.append(LpDist(dims[-1], n_out, p, bias=True, gen=gen, dtype=dtype))

    def forward(self, x):
        x = ((x - self.mean) / self.std).flatten(1)
        for layer in self.layers:
            x = layer(x)
        return -x


class HybridNet(nn.Module):
    def __init__(self, d_in, widths, hidden, n_out, p=math.inf, act="relu", seed=0, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        dims = [d_in, *widths]
        self.features = nn.ModuleList([LpDist(a, b, p, shift=True, gen=gen, dtype=dtype)
                                       for a, b in zip(dims, dims[1:])])
        self.fc1 = nn.Linear(dims[-1], hidden).to(dtype)
        self.act = nn.ReLU() if act == "relu" else nn.Tanh()
        self.fc2 = nn.Linear(hidden, n_out).to(dtype)
        with torch.no_grad():
            for m in (self.fc1, self.fc2):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=dtype) / math.sqrt(m.in_features))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen, dtype=dtype))

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.features:
            x = layer(x)
        return self.fc2(self.act(self.fc1(x)))
