"""Tiny configurations, and parsing the rendered files back so tests can compare them with results.json."""
from __future__ import annotations

import csv
import json
import struct
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

# small models and batches so that every subcommand runs end to end in seconds
TINY_MODELS = ['linf.model_kwargs={"depth": 3, "width": 16}',
               'hybrid.model_kwargs={"depth": 2, "width": 16, "head_hidden": 16}',
               'ibp.model_kwargs={"width": 1, "linear_size": 16}',
               'crown-ibp.model_kwargs={"width": 1, "linear_size": 16}',
               "batch_size=64"]


def tiny_run_args(out: Path, cache: Path, models="linf,ibp,crown-ibp", extra=()) -> list:
    args = ["run", "--models", models, "--epochs", "2", "--train-subset", "120", "--test-subset", "24",
            "--pgd-steps", "3", "--alpha-iterations", "2", "--batch-size", "64", "--no-progress",
            "--out", str(out), "--cache-dir", str(cache), "--device", "cpu",
            # α-CROWN on 10 points, not under the default budget's probe; the budget itself is tested in
            # test_cmp_units.py
            "--points", "alpha-crown=10"]
    for item in TINY_MODELS:
        args += ["--set", item]
    return args + list(extra)


def load(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def read_csv(path: Path) -> List[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def md_tables(text: str) -> List[List[List[str]]]:
    """Every Markdown table of ``text`` as a list of rows (header first, separator dropped), cells stripped."""
    tables, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(set(c) <= {"-"} and c for c in cells):
                continue
            cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def table_dicts(table: List[List[str]]) -> List[Dict[str, str]]:
    header = table[0]
    return [dict(zip(header, row)) for row in table[1:]]


def check_png(path: Path, min_size=(200, 150)) -> None:
    """A real PNG that PIL decodes, of a plausible size."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], im.size


def pct(x: float) -> float:
    """The value the tables print for an accuracy (percent, one decimal)."""
    return round(100 * x, 1)


def write_tiny_mnist(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Random 28x28 images in MNIST's real IDX format under ``root/MNIST/raw`` (what ``load_mnist`` reads)."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
