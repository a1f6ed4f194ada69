"""``python -m comparisons run`` end to end on tiny models: schema, CSV / Markdown agreement, plots, cache."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from comparisons import plots
from comparisons.cache import CheckpointCache, config_key
from comparisons.cli import main
from comparisons.common import MIN_POINTS
from comparisons.report import METHOD_TITLES
from comparisons.schema import SchemaError, validate_results
from comparisons.suites import build_config, get_suite, parse_overrides
from linf_plugin.certification import METHODS

from .comparisons_helpers import TINY_MODELS, check_png, load, md_tables, pct, read_csv, table_dicts, tiny_run_args

ROOT = Path(__file__).resolve().parents[2]


def _ok_models(res):
    return [m for m in res["models"] if m["status"] == "ok"]


def test_results_follow_the_schema(tiny_run):
    _, _, res = tiny_run
    validate_results(res)
    assert [m["key"] for m in res["models"]] == ["linf", "ibp", "crown-ibp"]
    assert res["settings"]["eps"] == [0.05, 0.1, 0.2]
    assert res["settings"]["test_points"] == 24
    broken = copy.deepcopy(res)
    del broken["models"][0]["evaluation"]["methods"]["margin"]
    with pytest.raises(SchemaError, match=r"models\[0\]"):
        validate_results(broken)
    broken = copy.deepcopy(res)
    broken["models"][1]["evaluation"]["methods"]["ibp"]["results"][0]["certified_accuracy"] = "high"
    with pytest.raises(SchemaError):
        validate_results(broken)


def test_every_method_is_tried_where_it_applies(tiny_run):
    _, _, res = tiny_run
    linf, ibp, crown_ibp = res["models"]
    assert linf["family"] == "linf_dist" and linf["training"].startswith("ℓ∞-dist")
    assert ibp["training"] == "IBP" and crown_ibp["training"] == "CROWN-IBP"
    assert linf["evaluation"]["methods"]["margin"]["status"] == "ok"
    assert linf["evaluation"]["methods"]["margin"]["one_pass"] is True
    assert linf["evaluation"]["methods"]["interval"]["status"] == "ok"
    for m in (ibp, crown_ibp):
        ev = m["evaluation"]["methods"]
        assert ev["margin"]["status"] == "n/a" and ev["interval"]["status"] == "n/a"
        for meth in ("ibp", "crown-ibp", "crown", "alpha-crown"):
            assert ev[meth]["status"] == "ok", ev[meth]
            assert len(ev[meth]["results"]) == 3 and ev[meth]["one_pass"] is False


def test_certified_never_exceeds_pgd_or_clean(tiny_run):
    """A certificate is a promise: a PGD counterexample inside the ball contradicts it."""
    _, _, res = tiny_run
    for m in _ok_models(res):
        ev = m["evaluation"]
        pgd = {r["eps"]: r["accuracy"] for r in ev["pgd"]["results"]}
        for meth, rec in ev["methods"].items():
            if rec["status"] != "ok":
                continue
            for r in rec["results"]:
                assert r["certified_accuracy"] <= pgd[r["eps"]] + 1e-12, (m["key"], meth, r)
                assert pgd[r["eps"]] <= ev["clean_accuracy"] + 1e-12
        margin = ev["methods"]["margin"]
        if margin["status"] == "ok":  # the dense curve is non-increasing and agrees with the grid values
            c = margin["curve"]["certified_accuracy"]
            assert all(a >= b for a, b in zip(c, c[1:]))
            assert c[0] <= ev["clean_accuracy"] + 1e-12


def test_csv_agrees_with_json(tiny_run):
    run_dir, _, res = tiny_run
    rows = read_csv(run_dir / "results.csv")
    assert len(rows) == 3 * len(METHODS) * 3
    by = {(r["model"], r["method"], float(r["eps"])): r for r in rows}
    for m in res["models"]:
        ev = m["evaluation"]
        pgd = {r["eps"]: r["accuracy"] for r in ev["pgd"]["results"]}
        for meth, rec in ev["methods"].items():
            for i, eps in enumerate(res["settings"]["eps"]):
                row = by[(m["key"], meth, eps)]
                assert row["status"] == rec["status"]
                assert row["family"] == m["family"] and row["training"] == m["training"]
                assert float(row["clean_accuracy"]) == pytest.approx(ev["clean_accuracy"], abs=1e-6)
                assert float(row["pgd_accuracy"]) == pytest.approx(pgd[eps], abs=1e-6)
                assert float(row["train_time_s"]) == pytest.approx(m["train"]["time"], abs=1e-3)
                if rec["status"] == "ok":
                    assert float(row["certified_accuracy"]) == pytest.approx(
                        rec["results"][i]["certified_accuracy"], abs=1e-6)
                    assert float(row["cert_time_s"]) == pytest.approx(rec["results"][i]["time"], abs=1e-4)
                else:
                    assert row["certified_accuracy"] == ""


def _parse_cell(cell: str):
    """``"12.5 / 8.3 / 0.0 (0.123 s)"`` → ([12.5, 8.3, 0.0], "0.123 s", None);
    ``"1 / 1 / 0 of 3 pts (2.1 s)†"`` (fewer than MIN_POINTS points) → ([1, 1, 0], "2.1 s", 3)."""
    accs, _, rest = cell.partition(" (")
    accs, _, of = accs.partition(" of ")
    n = int(of.split()[0]) if of else None
    return [float(a) for a in accs.split(" / ")], rest.rstrip(")†").rstrip(")"), n


def test_markdown_agrees_with_json(tiny_run):
    run_dir, _, res = tiny_run
    text = (run_dir / "results.md").read_text()
    main_table = table_dicts(md_tables(text)[0])
    # α-CROWN ran on 10 points (--points alpha-crown=10): its cells must be counts
    assert any(r["n"] < MIN_POINTS for m in _ok_models(res) for r in m["evaluation"]["methods"].values()
               if r["status"] == "ok")
    assert [r["Model"] for r in main_table] == [m["label"] for m in res["models"]]
    for row, m in zip(main_table, res["models"]):
        ev = m["evaluation"]
        assert row["Family"] == m["family"] and row["Training"] == m["training"]
        assert float(row["Clean"]) == pct(ev["clean_accuracy"])
        pgd_col = next(k for k in row if k.startswith("PGD-"))
        assert [float(v) for v in row[pgd_col].split(" / ")] == [pct(r["accuracy"]) for r in ev["pgd"]["results"]]
        for meth, title in METHOD_TITLES.items():
            rec = ev["methods"][meth]
            if rec["status"] == "ok":
                accs, _, n = _parse_cell(row[title])
                if rec["n"] >= MIN_POINTS:
                    assert n is None and accs == [pct(r["certified_accuracy"]) for r in rec["results"]], meth
                else:  # a handful of points: the counts, never a percentage
                    assert n == rec["n"] and accs == [round(r["certified_accuracy"] * n) for r in rec["results"]]
            else:
                assert row[title] == {"n/a": "n/a", "not run": "—", "error": "error"}[rec["status"]]
    goal = table_dicts(md_tables(text)[1])
    comps = res["speed_accuracy"]["comparisons"]
    assert len(goal) == len(comps)
    for row, c in zip(goal, comps):
        assert float(row["ℓ∞-dist margin"]) == pct(c["linf_certified"])
        assert float(row["baseline cert."]) == pct(c["baseline_certified"])
        assert row["accuracy ≥"] == ("yes" if c["accuracy_met"] else "no")
    assert ("Goal met" in text) == bool(res["speed_accuracy"]["goal"]["met"])


def test_speed_accuracy_picks_the_best_baseline(tiny_run):
    _, _, res = tiny_run
    comps = res["speed_accuracy"]["comparisons"]
    assert [c["eps"] for c in comps] == res["settings"]["eps"]
    linf = res["models"][0]["evaluation"]["methods"]["margin"]
    for i, c in enumerate(comps):
        best = max(rec["results"][i]["certified_accuracy"] for m in res["models"][1:]
                   for rec in m["evaluation"]["methods"].values() if rec["status"] == "ok")
        assert c["baseline_certified"] == best
        assert c["linf_certified"] == linf["results"][i]["certified_accuracy"]
        assert c["speedup"] == pytest.approx(c["baseline_time"] / c["linf_time"])
        assert c["accuracy_met"] == (c["linf_certified"] >= c["baseline_certified"])
        assert c["speed_met"] == (c["speedup"] >= 10)


def test_plots_are_pngs_with_the_expected_axes(tiny_run):
    run_dir, _, res = tiny_run
    for name in ("certified_vs_eps.png", "time_vs_accuracy.png"):
        check_png(run_dir / name)
    fig = plots.run_certified_vs_eps(res)
    labels = plots.figure_labels(fig)
    assert len(labels) == 3
    assert all(a["xlabel"] == plots.EPS_LABEL and a["ylabel"] == plots.CERT_LABEL for a in labels)
    assert [a["title"].splitlines()[0] for a in labels] == [m["label"] for m in res["models"]]
    ax = fig.get_axes()[0]  # the ℓ∞-dist panel: margin (dense), interval, PGD
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "Lipschitz margin" in legend and any(t.startswith("PGD-") for t in legend)
    fig = plots.run_time_vs_accuracy(res)
    labels = plots.figure_labels(fig)
    assert [a["title"] for a in labels] == ["ε = 0.05", "ε = 0.1", "ε = 0.2"]
    assert all(a["xlabel"] == plots.TIME_LABEL and a["ylabel"] == plots.CERT_LABEL for a in labels)
    assert fig.get_axes()[0].get_xscale() == "log"


def test_report_rerenders_from_json(tiny_run, tmp_path):
    run_dir, _, res = tiny_run
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    shutil.copy(run_dir / "results.json", copy_dir / "results.json")
    assert main(["report", str(copy_dir)]) == 0
    assert (copy_dir / "results.md").read_text() == (run_dir / "results.md").read_text()
    assert (copy_dir / "results.csv").read_text() == (run_dir / "results.csv").read_text()
    check_png(copy_dir / "certified_vs_eps.png")
    assert main(["report", str(tmp_path / "missing")]) == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text(json.dumps({"command": "run", "models": []}))
    assert main(["report", str(bad)]) == 2


def test_the_cache_holds_the_trained_checkpoints(tiny_run):
    run_dir, cache_dir, res = tiny_run
    suite = get_suite("digits")
    cache = CheckpointCache(cache_dir)
    for m in res["models"]:
        cfg = build_config(suite.spec(m["key"]), epochs=2, overrides=parse_overrides(TINY_MODELS), device="cpu",
                           train_subset=120, seed=0, progress=False)
        assert m["train"]["cache"]["key"] == config_key(cfg)
        hit = cache.lookup(cfg)
        assert hit is not None and hit.cache_hit
        assert hit.train_time == pytest.approx(m["train"]["time"])
        assert hit.model.model_name == m["model_name"]
        assert cache.lookup(cfg.replace(lr=cfg.lr * 2)) is None  # another recipe: not this entry
        assert cache.lookup(cfg.replace(progress=True, device="cpu")) is not None  # runtime fields do not count


def test_a_failed_training_is_recorded_and_the_run_goes_on(tmp_path):
    out = tmp_path / "run"
    args = tiny_run_args(out, tmp_path / "cache", models="ibp", extra=["--set", "ibp.lr=-1", "--methods", "ibp"])
    assert main(args) == 0
    res = load(out)
    validate_results(res)
    (m,) = res["models"]
    assert m["status"] == "error" and m["stage"] == "training" and "lr" in m["error"]
    text = (out / "results.md").read_text()
    assert "training failed" in text
    check_png(out / "certified_vs_eps.png", min_size=(50, 50))


def test_an_internal_error_is_no_usage_error(tmp_path, monkeypatch):
    """Only the project's own user-facing errors exit with code 2; a bug (a KeyError, a plain ValueError)
    raises with its traceback."""
    import comparisons.schema as schema

    def bug(*a, **k):
        raise KeyError("internal")

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("{}")
    monkeypatch.setattr(schema, "validate_results", bug)
    with pytest.raises(KeyError, match="internal"):
        main(["report", str(run_dir)])


def test_bad_arguments_are_refused_with_a_message(tmp_path, capsys):
    assert main(["run", "--methods", "bogus", "--out", str(tmp_path / "a")]) == 2
    assert "unknown certification method" in capsys.readouterr().err
    assert main(["run", "--models", "nosuch", "--out", str(tmp_path / "b")]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["run", "--set", "nofield=1", "--out", str(tmp_path / "c")]) == 2
    assert "unknown training config field" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--preset", "imagenet"])


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "comparisons", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0
    for cmd in ("run", "mirman", "theorem", "report"):
        assert cmd in out.stdout
