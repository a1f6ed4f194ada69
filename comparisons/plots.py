"""Figures, drawn from the results dicts only (matplotlib, Agg backend, no display needed).

Every function returns a ``matplotlib.figure.Figure``; :func:`save_figure`
writes it as PNG and returns the axes' labels, so callers (and tests) can
check what was drawn without parsing pixels.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from linf_plugin.io import atomic_write_bytes  # noqa: E402
from linf_plugin.names import Method  # noqa: E402

from .common import MIN_POINTS, fmt_eps, fmt_points  # noqa: E402

__all__ = ["run_certified_vs_eps", "run_time_vs_accuracy", "theorem_certified", "save_figure", "figure_labels",
           "METHOD_STYLE", "EPS_LABEL", "CERT_LABEL", "TIME_LABEL"]

EPS_LABEL = "ε (ℓ∞ radius, pixel units)"
CERT_LABEL = "certified accuracy (%)"
TIME_LABEL = "certification time (s, log scale)"

METHOD_STYLE = {Method.MARGIN: ("tab:red", "Lipschitz margin"), Method.INTERVAL: ("tab:orange", "interval"),
                Method.IBP: ("tab:blue", "IBP"), Method.CROWN_IBP: ("tab:purple", "CROWN-IBP"),
                Method.CROWN: ("tab:green", "CROWN"), Method.ALPHA_CROWN: ("tab:olive", "α-CROWN")}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def figure_labels(fig) -> List[dict]:
    """``[{"title", "xlabel", "ylabel"}]`` for every visible axes of ``fig``."""
    return [{"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel()}
            for ax in fig.get_axes() if ax.get_visible() and ax.axison]


def save_figure(fig, path: Path, dpi: int = 110) -> dict:
    """Write ``fig`` as PNG (atomically) and close it; returns ``{"file", "axes": labels}``."""
    import io

    labels = figure_labels(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return {"file": Path(path).name, "axes": labels}


def _grid(n: int, max_cols: int = 4):
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    return rows, cols


def run_certified_vs_eps(results: dict):
    """One panel per model: certified accuracy against ε for each method, PGD-100 dashed (an upper bound).

    The margin curve is dense (one radius pass); bound-propagation methods are
    points at the grid's ε joined by lines (dense too with ``--bisect``).  A
    method run on fewer than ``MIN_POINTS`` points is left out (its legend
    entry says so): a percentage of a handful of points is no result.
    """
    models = [m for m in results["models"] if m.get("status") == "ok"]
    n = max(1, len(models))
    rows, cols = _grid(n)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    eps_grid = results["settings"]["eps"]
    for ax in axes.flat[max(1, len(models)):]:
        ax.set_visible(False)
    if not models:
        _empty(axes.flat[0], EPS_LABEL, CERT_LABEL)
    for ax, m in zip(axes.flat, models):
        ev = m["evaluation"]
        for meth, rec in ev["methods"].items():
            if rec.get("status") != "ok":
                continue
            color, name = METHOD_STYLE.get(meth, ("k", meth))
            if rec["n"] < MIN_POINTS:
                ax.plot([], [], color=color, ls=":", label=f"{name}: {fmt_points(rec['n'])} only, not drawn")
                continue
            if rec.get("curve"):
                c = rec["curve"]
                ax.plot(c["eps"], [100 * a for a in c["certified_accuracy"]], color=color, lw=1.8, label=name)
            else:
                ax.plot([r["eps"] for r in rec["results"]], [100 * r["certified_accuracy"] for r in rec["results"]],
                        color=color, marker="o", ms=4, lw=1.2, label=name)
        pgd = ev.get("pgd", {})
        if pgd.get("status") == "ok":
            ax.plot([r["eps"] for r in pgd["results"]], [100 * r["accuracy"] for r in pgd["results"]], "k--",
                    marker="x", lw=1, label=f"PGD-{pgd['steps']} (upper bound)")
        ax.set_title(f"{m['label']}\n({m['training']}, clean {100 * ev['clean_accuracy']:.1f}%)", fontsize=9)
        ax.set_xlabel(EPS_LABEL)
        ax.set_ylabel(CERT_LABEL)
        ax.set_ylim(-2, 102)
        ax.set_xlim(0, max(eps_grid) * 1.25 if max(eps_grid) > 0 else 1)
        for e in eps_grid:
            ax.axvline(e, color="0.85", lw=0.6, zorder=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Certified accuracy against ε ({results['settings']['suite']}, "
                 f"{results['settings']['test_points']} test points)", fontsize=11)
    fig.tight_layout()
    return fig


def _empty(ax, xlabel: str, ylabel: str) -> None:
    ax.text(0.5, 0.5, "no model finished training", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("no results")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def run_time_vs_accuracy(results: dict):
    """One panel per ε: each (model, method) as a point, certification time (log) against certified accuracy."""
    models = [m for m in results["models"] if m.get("status") == "ok"]
    eps_grid = results["settings"]["eps"]
    fig, axes = plt.subplots(1, len(eps_grid), figsize=(4.4 * len(eps_grid), 3.8), squeeze=False, sharey=True)
    for i, (ax, eps) in enumerate(zip(axes.flat, eps_grid)):
        if not models:
            _empty(ax, TIME_LABEL, CERT_LABEL)
            continue
        for k, m in enumerate(models):
            for meth, rec in m["evaluation"]["methods"].items():
                if rec.get("status") != "ok" or rec["n"] < MIN_POINTS:  # a handful of points: not drawn
                    continue
                r = rec["results"][i]
                color, name = METHOD_STYLE.get(meth, ("k", meth))
                ax.scatter(max(r["time"], 1e-4), 100 * r["certified_accuracy"], color=color,
                           marker=MARKERS[k % len(MARKERS)], s=36, edgecolor="k", linewidth=0.4,
                           label=f"{m['key']}: {name}")
        ax.set_xscale("log")
        ax.set_title(f"ε = {fmt_eps(eps)}", fontsize=10)
        ax.set_xlabel(TIME_LABEL)
        ax.set_ylabel(CERT_LABEL)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Certification time against certified accuracy (one point per model and method; methods run on "
                 f"fewer than {MIN_POINTS} points left out)", fontsize=11)
    fig.tight_layout()
    return fig


def theorem_certified(results: dict):
    """Certified accuracy against ε / r for the constructed nets and the baselines, one panel per data set."""
    sets = results["datasets"]
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(5.0 * max(1, len(sets)), 3.8), squeeze=False,
                             sharey=True)
    for ax, ds in zip(axes.flat, sets):
        k = 0
        for net in ds.get("nets", []) + ds.get("baselines", []):
            for meth, rec in net.get("methods", {}).items():
                if rec.get("status") != "ok" or ds["n"] < MIN_POINTS:  # a handful of points: not drawn
                    continue
                fr = [r["fraction"] for r in rec["results"]]
                acc = [100 * r["certified_accuracy"] for r in rec["results"]]
                color = METHOD_STYLE.get(meth, ("k", meth))[0]
                ax.plot(fr, acc, marker=MARKERS[k % len(MARKERS)], color=color, lw=1.2,
                        label=f"{net['label']}: {METHOD_STYLE.get(meth, ('k', meth))[1]}")
            k += 1
        ax.set_title(f"{ds['dataset']} ({ds['n']} points, r = {ds['r']:.5g})", fontsize=10)
        ax.set_xlabel("ε / r")
        ax.set_ylabel(CERT_LABEL)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Theorem 3.2 / A.2 nets against trained baselines on the same points", fontsize=11)
    fig.tight_layout()
    return fig
