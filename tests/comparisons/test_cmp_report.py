"""The report renderer: counts instead of percentages under MIN_POINTS, and the committed results re-render as committed."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from comparisons.common import MIN_POINTS, fmt_gap, fmt_share, fmt_shares
from comparisons.report import method_cell, render_report

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted(p.parent.name for p in (ROOT / "docs" / "results").glob("*/results.json"))


def test_a_handful_of_points_shows_counts_never_a_percentage():
    assert fmt_shares([1.0, 1.0, 0.0], 1) == "1 / 1 / 0 of 1 pt"
    assert fmt_shares([2 / 3, 1 / 3], 3) == "2 / 1 of 3 pts"
    assert fmt_shares([0.5, 0.25], MIN_POINTS) == "50.0 / 25.0"
    assert fmt_share(0.5, MIN_POINTS - 2, percent_sign=True) == "9 of 18 pts"
    assert fmt_share(0.5, 100, percent_sign=True) == "50.0%"
    assert fmt_gap(-0.1, 10, sign=False) == "-1 of 10 pts" and fmt_gap(0.012, 500) == "+1.2 points"
    rec = {"status": "ok", "n": 1, "time": 25.16,
           "results": [{"certified_accuracy": a} for a in (1.0, 1.0, 0.0)]}
    assert method_cell(rec, 360) == "1 / 1 / 0 of 1 pt (25.16 s)†"


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_results_load_and_render_as_committed(tmp_path, name, monkeypatch):
    """Every committed results.json passes the schema, and its tables are what the renderer writes today
    (re-render them with ``python -m comparisons report <dir>`` after changing the renderer)."""
    from comparisons import plots

    for fig in ("run_certified_vs_eps", "run_time_vs_accuracy", "theorem_certified"):  # the tables, not the PNGs
        monkeypatch.setattr(plots, fig, lambda results: None)
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: {"file": Path(path).name, "axes": []})
    src = ROOT / "docs" / "results" / name
    shutil.copy(src / "results.json", tmp_path / "results.json")
    render_report(tmp_path)  # validates the schema first
    assert (tmp_path / "results.md").read_text() == (src / "results.md").read_text()
    assert (tmp_path / "results.csv").read_text() == (src / "results.csv").read_text()
