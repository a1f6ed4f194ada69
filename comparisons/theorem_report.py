"""Render a ``python -m comparisons theorem`` run folder: ``results.md``, ``results.csv`` and the plot."""
from __future__ import annotations

from pathlib import Path

from linf_plugin.io import atomic_write_text

from .common import fmt_seconds, fmt_shares
from .tables import METHOD_TITLES, md_table, write_csv

__all__ = ["render_theorem", "theorem_rows", "THEOREM_CSV_FIELDS"]


THEOREM_CSV_FIELDS = ["dataset", "n", "r", "net", "kind", "status", "n_params", "widths", "method", "fraction", "eps",
                      "certified_accuracy", "time_s"]


def theorem_rows(results: dict) -> list:
    rows = []
    for ds in results["datasets"]:
        for net in ds["nets"] + ds["baselines"]:
            base = {"dataset": ds["dataset"], "n": ds["n"], "r": ds["r"], "net": net["label"], "kind": net["kind"],
                    "status": net["status"], "n_params": net.get("n_params"),
                    "widths": " ".join(map(str, net.get("widths", [])))}
            if net["status"] != "ok":
                rows.append(base)
                continue
            for meth, rec in net["methods"].items():
                if rec.get("status") != "ok":
                    rows.append({**base, "method": meth, "status": rec.get("status")})
                    continue
                for x in rec["results"]:
                    rows.append({**base, "method": meth, "fraction": x["fraction"], "eps": x["eps"],
                                 "certified_accuracy": x["certified_accuracy"], "time_s": round(x["time"], 4)})
    return rows


def _markdown(results: dict, figures: list) -> str:
    fr = results["settings"]["fractions"]
    fr_txt = " / ".join(f"{f:g}r" for f in fr)
    lines = ["# Theorem 3.2 / A.2 nets on r-separated real data", "",
             "r = half the smallest ℓ∞ distance between two points with different labels. The constructed nets "
             "are margin-certified (one pass; time excludes a one-time warm-up on the first batch, which compiles the kernels); the "
             f"baselines are certified on the same points at the same ε = {fr_txt}, one certify call per ε.", ""]
    for ds in results["datasets"]:
        lines += [f"## {ds['dataset']}: {ds['n']} points ({ds['split']} split), r = {ds['r']:.6g}", ""]
        if ds["status"] != "ok":
            lines += [f"Not r-separated ({ds['status']}).", ""]
            continue
        rows = []
        for net in ds["nets"] + ds["baselines"]:
            if net["status"] != "ok":
                rows.append([net["label"], "", "", "", net.get("error") or net.get("reason", net["status"]), ""])
                continue
            widths = " × ".join(map(str, net.get("widths", []))) or "—"
            for meth, rec in net["methods"].items():
                if rec.get("status") != "ok":
                    rows.append([net["label"], f"{net['n_params']:,}", widths, METHOD_TITLES.get(meth, meth),
                                 rec.get("error", rec.get("status")), ""])
                    continue
                cell = fmt_shares([x["certified_accuracy"] for x in rec["results"]], ds["n"])
                rows.append([net["label"], f"{net['n_params']:,}", widths, METHOD_TITLES.get(meth, meth), cell,
                             fmt_seconds(rec["time"])])
        lines += [md_table(["Net", "Params", "Widths", "Method", f"certified % at ε = {fr_txt}", "time"], rows), ""]
    for sk in results.get("skipped", []):
        lines += [f"- skipped {sk['dataset']}: {sk['reason']}"]
    if figures:
        lines += ["", "## Plot", ""] + [f"![{f['file']}]({f['file']})" for f in figures]
    lines += ["", f"Wall time {fmt_seconds(results['wall_time'])}; device {results['environment']['device']}.", ""]
    return "\n".join(lines)


def render_theorem(run_dir, results: dict) -> list:
    from . import plots

    run_dir = Path(run_dir)
    figures = [plots.save_figure(plots.theorem_certified(results), run_dir / "certified_vs_eps.png")]
    write_csv(run_dir / "results.csv", THEOREM_CSV_FIELDS, theorem_rows(results))
    atomic_write_text(run_dir / "results.md", _markdown(results, figures))
    return figures
