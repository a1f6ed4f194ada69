"""Render a run folder from its ``results.json``: ``results.md``, ``results.csv`` and the PNG plots.

``python -m comparisons report <run_dir>`` calls :func:`render_report`, so
tables and plots can always be rebuilt from the JSON alone.  The JSON is
checked against the schema of its command first (:mod:`comparisons.schema`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from linf_plugin.io import atomic_write_text

from .common import MIN_POINTS, fmt_eps, fmt_gap, fmt_seconds, fmt_share, fmt_shares
from .tables import METHOD_TITLES, STATUS_CELL, md_table, write_csv

__all__ = ["render_report", "md_table", "write_csv", "METHOD_TITLES", "run_rows", "RUN_CSV_FIELDS",
           "method_cell"]


def _num(x, digits=6):
    return None if x is None else round(float(x), digits)


# ------------------------------------------------------------------------------------------------ run
RUN_CSV_FIELDS = ["model", "label", "model_name", "family", "training", "n_params", "train_time_s", "cache_hit",
                  "n", "clean_accuracy", "method", "status", "method_n", "eps", "pgd_accuracy",
                  "certified_accuracy", "cert_time_s", "method_time_s"]


def run_rows(results: dict) -> List[dict]:
    """The long-form rows of ``results.csv``: one per (model, method, ε)."""
    rows = []
    eps_grid = results["settings"]["eps"]
    for m in results["models"]:
        base = {"model": m["key"], "label": m["label"], "model_name": m.get("model_name"), "family": m.get("family"),
                "training": m.get("training"), "n_params": m.get("n_params"),
                "train_time_s": _num(m.get("train", {}).get("time"), 3),
                "cache_hit": m.get("train", {}).get("cache", {}).get("hit")}
        if m.get("status") != "ok":
            rows.append({**base, "method": "training", "status": "error"})
            continue
        ev = m["evaluation"]
        pgd = {r["eps"]: r["accuracy"] for r in ev["pgd"].get("results", [])} if ev.get("pgd") else {}
        base.update(n=ev["n"], clean_accuracy=_num(ev["clean_accuracy"]))
        for meth, rec in ev["methods"].items():
            st = rec.get("status")
            for i, eps in enumerate(eps_grid):
                row = {**base, "method": meth, "status": st, "eps": eps, "pgd_accuracy": _num(pgd.get(eps))}
                if st == "ok":
                    r = rec["results"][i]
                    row.update(method_n=rec["n"], certified_accuracy=_num(r["certified_accuracy"]),
                               cert_time_s=_num(r["time"], 4), method_time_s=_num(rec["time"], 4))
                rows.append(row)
    return rows


def method_cell(rec: dict, n_full: int) -> str:
    """``a / b / c (t)`` certified accuracies in % at the grid's ε and the method's total time.

    On fewer than :data:`~comparisons.common.MIN_POINTS` points the counts
    instead: ``1 / 1 / 0 of 1 pt (t)``.
    """
    st = rec.get("status")
    if st != "ok":
        return STATUS_CELL.get(st, st)
    accs = fmt_shares([r["certified_accuracy"] for r in rec["results"]], rec["n"])
    mark = "†" if rec["n"] != n_full else ""
    return f"{accs} ({fmt_seconds(rec['time'])}){mark}"


def _run_markdown(res: dict, figures: List[dict]) -> str:
    s = res["settings"]
    eps_txt = " / ".join(fmt_eps(e) for e in s["eps"])
    header = ["Model", "Family", "Training", "Params", "Clean", f"PGD-{s['pgd_steps']} (ε = {eps_txt})"]
    header += [METHOD_TITLES[m] for m in METHOD_TITLES] + ["Train time"]
    rows, notes = [], []
    for m in res["models"]:
        if m.get("status") != "ok":
            rows.append([m["label"], m.get("family", "?"), "training failed", "", "", ""]
                        + ["" for _ in METHOD_TITLES] + [""])
            notes.append(f"- **{m['label']}**: training failed: `{m.get('error')}`")
            continue
        ev = m["evaluation"]
        pgd = ev.get("pgd", {})
        pgd_n = pgd.get("n", ev["n"])
        pgd_cell = (fmt_shares([r["accuracy"] for r in pgd["results"]], pgd_n) + ("†" if pgd_n != ev["n"] else "")
                    if pgd.get("status") == "ok" else "error")
        if pgd.get("status") == "ok" and pgd_n != ev["n"]:
            notes.append(f"- † **{m['label']}**, PGD-{s['pgd_steps']}: first {pgd_n} test points only")
        check = ev.get("pgd_vs_certified") or {}
        if check.get("checked") and check["broken_certified"]:
            notes.append(f"- **{m['label']}**: PGD broke {check['broken_certified']} point(s) that a method "
                         "certified: a WRONG CERTIFICATE (see results.json, pgd_vs_certified)")
        cells = [method_cell(ev["methods"][k], ev["n"]) for k in METHOD_TITLES]
        hit = " (cached)" if m["train"]["cache"]["hit"] else ""
        rows.append([m["label"], m["family"], m["training"], f"{m['n_params']:,}",
                     fmt_share(ev["clean_accuracy"], ev["n"]), pgd_cell]
                    + cells + [fmt_seconds(m["train"]["time"]) + hit])
        for k, rec in ev["methods"].items():
            if rec.get("status") == "error":
                notes.append(f"- **{m['label']}**, {METHOD_TITLES[k]}: `{rec['error']}`")
            elif rec.get("status") == "ok" and rec["n"] != ev["n"]:
                b = rec.get("budget")
                why = " (--points)"
                if b:
                    first = "the first point" if b["probe_points"] == 1 else f"the first {b['probe_points']} points"
                    why = f" (time budget {b['seconds']:g} s for the grid: {first} took {fmt_seconds(b['probe_time'])})"
                which = "the first test point" if rec["n"] == 1 else f"first {rec['n']} test points"
                notes.append(f"- † **{m['label']}**, {METHOD_TITLES[k]}: {which} only{why}")
    # runs from before the per-point check have no pgd_vs_certified: claim nothing for them
    checked = any((m.get("evaluation") or {}).get("pgd_vs_certified", {}).get("checked") for m in res["models"])
    out = [f"# Comparison: {s['suite']} ({s['dataset']}, {s['test_points']} test points)", "",
           f"Certified accuracy (%) at ε = {eps_txt} (pixel units) per method, with the method's certification "
           "time for the whole grid in brackets (margin: ONE pass certifies every ε; the other methods: one pass "
           "per ε). `n/a`: the method does not apply to the model; `—`: not requested. "
           f"PGD-{s['pgd_steps']} accuracy is an upper bound on robust accuracy"
           + ("; on every point both saw, no point a method certified was broken by PGD unless a note below says "
              "so" if checked else "") + ". A cell measured on fewer than "
           f"{MIN_POINTS} points shows counts, not percentages: `1 / 1 / 0 of 1 pt` = certified at the first two "
           "ε on the one point tried.", "", md_table(header, rows), ""]
    if notes:
        out += ["Notes:", ""] + notes + [""]
    out += _goal_markdown(res)
    if figures:
        out += ["## Plots", ""] + [f"![{f['file']}]({f['file']})" for f in figures] + [""]
    env = res["environment"]
    out += ["## Run", "", f"- device: {env['device']}" + (f" ({env['gpu']})" if env.get("gpu") else "")
            + f", {env['cpu_threads']} CPU threads; torch {env['torch']}, auto_LiRPA {env['auto_LiRPA']}",
            f"- wall time: {fmt_seconds(res.get('wall_time'))}; created {env['created']}",
            "- models: " + ", ".join(f"{m['key']} = preset `{m['preset']}`" for m in res["models"]), ""]
    return "\n".join(out)


def _goal_markdown(res: dict) -> List[str]:
    sa = res.get("speed_accuracy") or {}
    comps = sa.get("comparisons") or []
    if not comps:
        return ["## ℓ∞-dist margin vs the best IBP / CROWN-IBP baseline", "",
                "Not available (the run has no ℓ∞-dist net with a margin result, or no baseline).", ""]
    header = ["ε", "ℓ∞-dist margin", "margin time", "best baseline (method)", "baseline cert.", "baseline time",
              "gap (points)", "speed-up", "accuracy ≥", "≥ 10× faster"]
    n = res["settings"]["test_points"]  # both sides of a comparison ran on the full test set
    rows = [[fmt_eps(c["eps"]), fmt_share(c["linf_certified"], n), fmt_seconds(c["linf_time"]),
             f"{c['baseline_key']} ({METHOD_TITLES[c['baseline_method']]})", fmt_share(c["baseline_certified"], n),
             fmt_seconds(c["baseline_time"]), fmt_gap(c["accuracy_gap"], n, unit=False), f"{c['speedup']:.1f}×",
             "yes" if c["accuracy_met"] else "no", "yes" if c["speed_met"] else "no"] for c in comps]
    out = ["## ℓ∞-dist margin vs the best IBP / CROWN-IBP baseline", "",
           "At each ε: the baseline model and bound-propagation method (run on the full test set) with the highest "
           "certified accuracy, against the ℓ∞-dist net's margin certificate. Times: one margin pass over the test "
           "set (it certifies every ε) against one certification of that baseline with that method at that ε "
           "(auto_LiRPA BoundedModule construction included).", "", md_table(header, rows), ""]
    goal = sa.get("goal")
    if goal:
        at = [c for c in comps if any(abs(c["eps"] - g) < 1e-12 for g in goal["eps"])]
        eps_txt = ", ".join(fmt_eps(e) for e in goal["eps"])
        if goal.get("met") is None:
            verdict = f"Goal at ε ∈ {{{eps_txt}}}: not evaluated ({goal.get('note', '')})."
        elif goal["met"]:
            verdict = (f"**Goal met** at ε ∈ {{{eps_txt}}}: " + "; ".join(
                f"ε = {fmt_eps(c['eps'])}: {fmt_gap(c['accuracy_gap'], n)}, {c['speedup']:.1f}× faster"
                for c in at) + ".")
        else:
            parts = []
            for c in at:
                bits = []
                if not c["accuracy_met"]:
                    bits.append(f"accuracy short by {fmt_gap(-c['accuracy_gap'], n, sign=False)}")
                if not c["speed_met"]:
                    bits.append(f"only {c['speedup']:.1f}× faster")
                parts.append(f"ε = {fmt_eps(c['eps'])}: " + (", ".join(bits) if bits else "met"))
            verdict = f"**Goal not met** at ε ∈ {{{eps_txt}}}: " + "; ".join(parts) + "."
        out += [verdict, ""]
    return out


def _render_run(run_dir: Path, res: dict) -> List[dict]:
    from . import plots

    figures = [plots.save_figure(plots.run_certified_vs_eps(res), run_dir / "certified_vs_eps.png"),
               plots.save_figure(plots.run_time_vs_accuracy(res), run_dir / "time_vs_accuracy.png")]
    write_csv(run_dir / "results.csv", RUN_CSV_FIELDS, run_rows(res))
    atomic_write_text(run_dir / "results.md", _run_markdown(res, figures))
    return figures


# ------------------------------------------------------------------------------------------------ dispatch
def render_report(run_dir, results: Optional[dict] = None) -> List[dict]:
    """(Re)write ``results.md``, ``results.csv`` and the PNGs of ``run_dir`` from its ``results.json``.

    Args:
        run_dir: a run folder.
        results: the dict (default: read ``run_dir/results.json``).

    Returns:
        ``[{"file", "axes": [{"title", "xlabel", "ylabel"}]}]`` for every figure written.

    Raises:
        FileNotFoundError: no results.json; SchemaError: a results.json that
        does not match its command's schema.
    """
    from .schema import validate_results

    run_dir = Path(run_dir)
    if results is None:
        path = run_dir / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; is {run_dir} a run folder of python -m comparisons?")
        results = json.loads(path.read_text())
    validate_results(results)
    cmd = results["command"]
    if cmd == "run":
        return _render_run(run_dir, results)
    if cmd == "mirman":
        from .mirman_report import render_mirman

        return render_mirman(run_dir, results)
    if cmd == "theorem":
        from .theorem_report import render_theorem

        return render_theorem(run_dir, results)
    raise ValueError(f"unknown command {cmd!r} in results.json")
