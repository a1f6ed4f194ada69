"""Two small digits models, trained for a few seconds, for the sharded-certification tests."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from linf_plugin.data import dataset_info, load_dataset
from linf_plugin.models import create_model, save_checkpoint
from linf_plugin.nn import set_p


def tiny_models() -> dict:
    """``{"relu": mlp_3layer, "linf": 3x32 l_inf-dist MLP}``, briefly trained with cross-entropy, in eval mode."""
    info, train = dataset_info("digits"), load_dataset("digits", "train")
    torch.manual_seed(0)
    relu = create_model("mlp_3layer", input_shape=(1, 8, 8), num_classes=10, mean=info.mean, std=info.std)
    linf = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=3, width=32, mean=info.mean,
                        std=info.std)
    for model, epochs, lr, scale in ((relu, 5, 3e-3, 1.0), (linf, 4, 0.02, 4.0)):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for epoch in range(epochs):
            if model is linf:
                set_p(linf, 8.0 if epoch < 2 else math.inf)
            model.train()
            for xb, yb in train.loader(batch_size=128, shuffle=True):
                loss = F.cross_entropy(model(xb) * scale, yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
    set_p(linf, math.inf)
    return {"relu": relu.eval(), "linf": linf.eval()}


def save_tiny_models(folder: Path) -> dict:
    """:func:`tiny_models` saved as checkpoints in ``folder``: ``{name: (path, model)}``."""
    out = {}
    for name, model in tiny_models().items():
        path = Path(folder) / f"{name}.pt"
        save_checkpoint(model, path)
        out[name] = (path, model)
    return out
