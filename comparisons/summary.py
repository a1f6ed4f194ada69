"""The short text each subcommand prints at the end (the full tables are in the run folder)."""
from __future__ import annotations

from pathlib import Path

from .common import fmt_eps, fmt_gap, fmt_seconds, fmt_share, fmt_shares
from .tables import METHOD_TITLES

__all__ = ["summarize_run", "summarize_mirman", "summarize_theorem"]


def _table_and_files(run_dir: Path) -> list:
    """The first table of ``results.md`` (the main one) and every file the run wrote."""
    run_dir = Path(run_dir)
    out = []
    md = run_dir / "results.md"
    if md.exists():
        text = md.read_text().split("\n")
        start = next((i for i, ln in enumerate(text) if ln.startswith("|")), len(text))
        end = next((i for i in range(start, len(text)) if not text[i].startswith("|")), len(text))
        out += [""] + text[start:end]
    files = sorted(p for p in run_dir.iterdir() if p.is_file() and p.suffix in (".md", ".csv", ".json", ".png"))
    return out + ["", "files:"] + [f"  {p}" for p in files]


def summarize_run(run_dir: Path, res: dict) -> str:
    s = res["settings"]
    lines = [f"comparison {s['suite']}: {s['test_points']} test points, eps = "
             + ", ".join(fmt_eps(e) for e in s["eps"]) + f"  ({fmt_seconds(res['wall_time'])})"]
    for m in res["models"]:
        if m.get("status") != "ok":
            lines.append(f"  {m['key']:<10} training FAILED: {m.get('error')}")
            continue
        ev = m["evaluation"]
        best = []
        for k, rec in ev["methods"].items():
            if rec.get("status") == "ok":
                best.append(f"{METHOD_TITLES[k]} " + fmt_shares([r["certified_accuracy"] for r in rec["results"]],
                                                                rec["n"], 0, sep="/", percent_sign=True))
        errs = [METHOD_TITLES[k] for k, rec in ev["methods"].items() if rec.get("status") == "error"]
        clean = fmt_share(ev["clean_accuracy"], ev["n"], percent_sign=True)
        lines.append(f"  {m['key']:<10} clean {clean}  certified: " + "; ".join(best)
                     + (f"  [errors: {', '.join(errs)}]" if errs else ""))
        check = ev.get("pgd_vs_certified") or {}
        if check.get("checked"):
            pts = max((r["points"] for rows in check["methods"].values() for r in rows), default=0)
            lines.append(f"  {'':<10} PGD broke {check['broken_certified']} certified point(s) (checked on up to "
                         f"{pts} points" + (": a WRONG CERTIFICATE)" if check["broken_certified"] else ")"))
    goal = (res.get("speed_accuracy") or {}).get("goal")
    comps = (res.get("speed_accuracy") or {}).get("comparisons") or []
    n = s["test_points"]  # the comparisons ran on the full test set
    for c in comps:
        linf, base = (fmt_share(c[k], n, percent_sign=True) for k in ("linf_certified", "baseline_certified"))
        lines.append(f"  eps {fmt_eps(c['eps'])}: linf margin {linf} in {fmt_seconds(c['linf_time'])} vs "
                     f"{c['baseline_key']}/{METHOD_TITLES[c['baseline_method']]} {base} in "
                     f"{fmt_seconds(c['baseline_time'])} ({fmt_gap(c['accuracy_gap'], n)}, {c['speedup']:.1f}x)")
    if goal:
        lines.append("  goal: " + {True: "MET", False: "NOT MET", None: "not evaluated"}[goal.get("met")])
    return "\n".join(lines + _table_and_files(run_dir))


def summarize_mirman(run_dir: Path, res: dict) -> str:
    lines = [f"three-point contrast (r = {res['settings']['r']:g}, float64): {len(res['nets'])} nets  "
             f"({fmt_seconds(res['wall_time'])})"]
    for c in res["checks"]:
        lines.append(f"  [{'ok' if c['passed'] else 'FAILED'}] {c['claim']}")
    return "\n".join(lines + _table_and_files(run_dir))


def summarize_theorem(run_dir: Path, res: dict) -> str:
    lines = [f"Theorem 3.2 / A.2 on real data  ({fmt_seconds(res['wall_time'])})"]
    for ds in res["datasets"]:
        lines.append(f"  {ds['dataset']}: n = {ds['n']}, r = {ds['r']:.6g}")
        for net in ds["nets"] + ds["baselines"]:
            for meth, rec in net.get("methods", {}).items():
                if rec.get("status") == "ok":
                    accs = ", ".join(f"{r['fraction']:g}r: "
                                     f"{fmt_share(r['certified_accuracy'], ds['n'], percent_sign=True)}"
                                     for r in rec["results"])
                    lines.append(f"    {net['label']:<28} {METHOD_TITLES.get(meth, meth):<9} {accs} "
                                 f"({fmt_seconds(rec['time'])})")
            if net.get("status") == "error":
                lines.append(f"    {net['label']:<28} FAILED: {net.get('error')}")
    for s in res.get("skipped", []):
        lines.append(f"  skipped {s['dataset']}: {s['reason']}")
    return "\n".join(lines + _table_and_files(run_dir))
