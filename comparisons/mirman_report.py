"""Tables and figures of the three-point experiment, rendered from its ``results.json``."""
from __future__ import annotations

from pathlib import Path
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from linf_plugin.io import atomic_write_text  # noqa: E402

from .plots import METHOD_STYLE, save_figure  # noqa: E402
from .tables import METHOD_TITLES, md_table, write_csv  # noqa: E402

__all__ = ["render_mirman", "mirman_rows", "MIRMAN_CSV_FIELDS", "figure1", "radii_scatter", "fmt_r",
           "FIG_EPS_FRACTION"]

POINTS = ("A(−2rs)", "B(0)", "A(+2rs)")
MIRMAN_CSV_FIELDS = ["setting", "dim", "separation", "net", "group", "family", "training", "method", "status",
                     "point", "radius", "capped", "tolerance", "true_radius", "min_radius", "reaches_r", "below_r"]
FIG_EPS_FRACTION = 0.75
GROUP_COLORS = {"hand-built": "tab:gray", "ibp trained": "tab:blue", "crown-ibp trained": "tab:purple"}


def fmt_r(v, r: float) -> str:
    """A radius as a multiple of r, 6 significant digits (``n/a`` for None)."""
    if v is None:
        return "n/a"
    return f"{v / r:.6g}r"


def mirman_rows(results: dict) -> List[dict]:
    """Long-form CSV rows: one per (net, method, point)."""
    out = []
    for row in results["rows"]:
        base = {k: row.get(k) for k in ("setting", "dim", "separation", "net", "group", "family", "training",
                                        "method", "status")}
        if row.get("status") != "ok":
            out.append(base)
            continue
        for i, name in enumerate(POINTS):
            out.append({**base, "point": name, "radius": row["radius"][i], "capped": row["capped"][i],
                        "tolerance": row["tolerance"],
                        "true_radius": row["true_radius"][i] if row.get("true_radius") else None,
                        "min_radius": row["min_radius"], "reaches_r": row["reaches_r"], "below_r": row["below_r"]})
    return out


def _summary(results: dict) -> List[List[str]]:
    r = results["settings"]["r"]
    groups = {}
    for row in results["rows"]:
        if row.get("status") != "ok":
            continue
        groups.setdefault((row["setting"], row["group"], row["method"]), []).append(row)
    out = []
    for (setting, group, method), rows in groups.items():
        mins = sorted(x["min_radius"] for x in rows)
        med = mins[len(mins) // 2] if len(mins) % 2 else (mins[len(mins) // 2 - 1] + mins[len(mins) // 2]) / 2
        out.append([setting, group, METHOD_TITLES.get(method, method), str(len(rows)), fmt_r(mins[0], r),
                    fmt_r(med, r), fmt_r(mins[-1], r), f"{sum(x['reaches_r'] for x in rows)}/{len(rows)}"])
    return out


def _markdown(results: dict, figures: list) -> str:
    s = results["settings"]
    r = s["r"]
    lines = [f"# Three-point contrast (Mirman et al. 2021), r = {r:g}, float64", "",
             "Points A, B, A at −2r·s, 0, +2r·s (s = 1: the radius-r boxes touch; s > 1: strictly separated), "
             "in 1-D and embedded on one axis of d-dimensional space. Radius of a point for a method = the "
             "supremum of the ε at which that method certifies it. margin: one float-safe margin pass (radius = "
             "margin / 2 for a 1-Lipschitz ℓ∞-dist net; tolerance = how far the float-safe radius sits below the "
             "plain float64 margin / 2). interval / IBP / CROWN: bisection on "
             f"[0, 2r·s] with {s['bisect_steps']} halvings (α-CROWN: {s['alpha_bisect_steps']}); the radius lies "
             "in [value, value + tolerance). \"reaches r\": value + tolerance ≥ r at all three points. True "
             f"radius (1-D only): dense search with spacing r/{s['grid_per_r']}, refined by bisection.", "",
             "## Checks", ""]
    for c in results["checks"]:
        mark = "✅" if c["passed"] else "❌"
        lines.append(f"- {mark} ({c['kind']}) {c['claim']} — {c['detail']}")
    lines += ["", "## Smallest radius over the three points, per group of nets", "",
              md_table(["Setting", "Nets", "Method", "#", "min", "median", "max", "reach r at all 3"],
                       _summary(results)), "", "## Every net", ""]
    header = ["Setting", "Net", "Training", "Method", *[f"radius {p}" for p in POINTS], "min", "tolerance",
              "reaches r", *[f"true {p}" for p in POINTS]]
    rows = []
    for row in results["rows"]:
        if row.get("status") != "ok":
            rows.append([row["setting"], row["net"], row["training"], row["method"], "error", "", "", "", "", "",
                         "", "", ""])
            continue
        true = row.get("true_radius") or [None] * 3
        rows.append([row["setting"], row["net"], row["training"], METHOD_TITLES.get(row["method"], row["method"]),
                     *[fmt_r(v, r) + ("+" if c else "") for v, c in zip(row["radius"], row["capped"])],
                     fmt_r(row["min_radius"], r), f"{row['tolerance'] / r:.3g}r",
                     "yes" if row["reaches_r"] else "no", *[fmt_r(v, r) for v in true]])
    lines += [md_table(header, rows), "", "A `+` marks a radius capped at the bisection range 2r·s.", ""]
    lines += ["## Nets", "", md_table(["Setting", "Net", "Training", "Params", "Description"],
                                      [[n["setting"], n["net"], n["training"], str(n["n_params"]), n["description"]]
                                       for n in results["nets"]]), ""]
    if figures:
        lines += ["## Plots", ""] + [f"![{f['file']}]({f['file']})" for f in figures] + [""]
    lines += [f"Wall time {results['wall_time']:.1f} s; torch {results['environment']['torch']}, auto_LiRPA "
              f"{results['environment']['auto_LiRPA']}.", ""]
    return "\n".join(lines)


def figure1(results: dict):
    """Mirman et al.'s Figure 1, for each hand-built net: f with the three boxes, and bounds on the middle box.

    Top row: f(x) (1-D, touching) with the boxes around the three points at an
    ε halfway between the IBP radius of the middle point and r; on the middle box the IBP interval of f (hatched), CROWN's
    (outlined) and the true range (solid).  Bottom row: the bounds of f over
    the middle box against ε; B is certified while the upper bound is < 0.
    """
    data = results["figure_data"]
    n = max(1, len(data))
    fig, axes = plt.subplots(2, n, figsize=(5.2 * n, 7.0), squeeze=False)
    for k, fd in enumerate(data):
        ax, ax2 = axes[0, k], axes[1, k]
        r = fd["r"]
        # show the boxes at an ε where IBP already fails on the middle box but the net is still robust
        fail = next((e for e, u in zip(fd["eps"], fd["ibp"]["upper"]) if u >= 0), None)
        target = (fail + r) / 2 if fail is not None and fail < r else FIG_EPS_FRACTION * r
        i = min(range(len(fd["eps"])), key=lambda j: abs(fd["eps"][j] - target))
        eps = fd["eps"][i]
        ax.plot(fd["x"], fd["f"], "k", lw=1.6, label="f(x) = logit_A − logit_B")
        ax.axhline(0, color="0.5", lw=0.8)
        for p, lab in zip(fd["points"], ("A", "B", "A")):
            color = "tab:red" if lab == "A" else "tab:blue"
            ax.axvspan(p - eps, p + eps, color=color, alpha=0.12)
            ax.plot([p], [0], "o", color=color)
            ax.annotate(lab, (p, 0), textcoords="offset points", xytext=(4, 6), color=color)
        lo, hi = fd["ibp"]["lower"][i], fd["ibp"]["upper"][i]
        ax.add_patch(Rectangle((-eps, lo), 2 * eps, hi - lo, fill=False, hatch="//", edgecolor="tab:blue",
                               label=f"IBP bounds on [−ε, ε]: [{lo:.3g}, {hi:.3g}]"))
        clo, chi = fd["crown"]["lower"][i], fd["crown"]["upper"][i]
        ax.add_patch(Rectangle((-0.8 * eps, clo), 1.6 * eps, chi - clo, fill=False, lw=1.5,
                               edgecolor="tab:green", label=f"CROWN bounds: [{clo:.3g}, {chi:.3g}]"))
        tlo, thi = fd["true_range"]["lower"][i], fd["true_range"]["upper"][i]
        ax.add_patch(Rectangle((-0.6 * eps, tlo), 1.2 * eps, thi - tlo, color="tab:orange", alpha=0.6,
                               label=f"true range: [{tlo:.3g}, {thi:.3g}]"))
        ax.set_title(f"{fd['net']}: {fd.get('description', '')}\nboxes of radius ε = {eps / r:g}r around the points",
                     fontsize=8)
        ax.set_xlabel("x")
        ax.set_ylabel("f(x)")
        ax.legend(fontsize=7, loc="upper center")
        ax2.plot(fd["eps"], fd["ibp"]["upper"], color=METHOD_STYLE["ibp"][0], lw=1.6, label="IBP upper bound")
        ax2.plot(fd["eps"], fd["crown"]["upper"], color=METHOD_STYLE["crown"][0], lw=1.6, ls="--",
                 label="CROWN upper bound")
        ax2.plot(fd["eps"], fd["true_range"]["upper"], color="tab:orange", lw=2.2, alpha=0.7, label="true max of f")
        ax2.axhline(0, color="0.5", lw=0.8)
        ax2.axvline(r / 2, color="0.7", ls=":", lw=1)
        ax2.axvline(r, color="0.4", ls=":", lw=1)
        ax2.set_title("middle point B: max of f over [−ε, ε] (certified while < 0)", fontsize=9)
        ax2.set_xlabel("ε")
        ax2.set_ylabel("upper bound of f on the middle box")
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
    if not data:
        axes[0, 0].set_visible(False)
        axes[1, 0].set_visible(False)
    fig.suptitle("Interval analysis on the three-point set (touching, 1-D)", fontsize=11)
    fig.tight_layout()
    return fig


def radii_scatter(results: dict):
    """Per net: the smallest IBP radius over the three points against CROWN's (multiples of r), per setting."""
    r = results["settings"]["r"]
    by = {}
    for row in results["rows"]:
        if row.get("status") == "ok" and row["family"] == "relu":
            d = by.setdefault(row["setting"], {}).setdefault(row["net"], {"group": row["group"]})
            d[row["method"]] = row["min_radius"] / r
    settings = list(by)
    n = max(1, len(settings))
    fig, axes = plt.subplots(1, n, figsize=(4.0 * n, 3.8), squeeze=False)
    for ax, setting in zip(axes.flat, settings):
        pts = [(d["ibp"], d["crown"], d["group"]) for d in by[setting].values() if "ibp" in d and "crown" in d]
        for x, y, group in pts:
            color = GROUP_COLORS.get(group, "k")
            ax.scatter(x, y, s=22, color=color, edgecolor="k", linewidth=0.3)
        top = max([1.1] + [max(x, y) * 1.05 for x, y, _ in pts])
        ax.plot([0, top], [0, top], color="0.7", lw=0.8)
        ax.axvline(1, color="0.3", ls=":", lw=1)
        ax.axhline(1, color="0.3", ls=":", lw=1)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel("min IBP radius / r")
        ax.set_ylabel("min CROWN radius / r")
        ax.grid(alpha=0.3)
    if not settings:
        axes[0, 0].set_visible(False)
    fig.suptitle("ReLU nets: smallest certified radius over the three points (grey: hand-built, blue: IBP-trained, "
                 "purple: CROWN-IBP-trained)", fontsize=9)
    fig.tight_layout()
    return fig


def render_mirman(run_dir: Path, results: dict) -> list:
    run_dir = Path(run_dir)
    figures = [save_figure(figure1(results), run_dir / "mirman_figure1.png"),
               save_figure(radii_scatter(results), run_dir / "mirman_radii.png")]
    write_csv(run_dir / "results.csv", MIRMAN_CSV_FIELDS, mirman_rows(results))
    atomic_write_text(run_dir / "results.md", _markdown(results, figures))
    return figures

