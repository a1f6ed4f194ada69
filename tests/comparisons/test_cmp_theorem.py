"""``python -m comparisons theorem`` on a digits subset and a tiny MNIST in the real file format."""
from __future__ import annotations

import pytest

from comparisons.cli import main
from comparisons.plots import figure_labels, theorem_certified
from comparisons.schema import validate_results
from linf_plugin.data import linf_separation, load_dataset
from linf_plugin.models import theoremA2_width

from .comparisons_helpers import check_png, load, md_tables, pct, read_csv, write_tiny_mnist

FRACTIONS = [0.5, 0.9, 0.999]
BASELINE_SETS = ["--set", 'ibp.model_kwargs={"width": 1, "linear_size": 16}',
                 "--set", 'crown-ibp.model_kwargs={"width": 1, "linear_size": 16}', "--set", "batch_size=64"]


@pytest.fixture(scope="module")
def tiny_theorem(tmp_path_factory):
    root = tmp_path_factory.mktemp("theorem")
    write_tiny_mnist(root / "data", n_train=30, n_test=5)
    out = root / "t"
    args = ["theorem", "--digits-points", "120", "--mnist-points", "25", "--epochs", "1", "--train-subset", "100",
            "--data-root", str(root / "data"), "--cache-dir", str(root / "cache"), "--out", str(out),
            "--no-progress", "--device", "cpu", *BASELINE_SETS]
    assert main(args) == 0
    return out, load(out)


def test_schema_csv_and_markdown_agree(tiny_theorem):
    out, res = tiny_theorem
    validate_results(res)
    assert [d["dataset"] for d in res["datasets"]] == ["digits", "mnist"]
    csv_rows = read_csv(out / "results.csv")
    tables = md_tables((out / "results.md").read_text())
    assert len(tables) == 2
    for ds, table in zip(res["datasets"], tables):
        header, body = table[0], table[1:]
        col = next(h for h in header if h.startswith("certified %"))
        ok_rows = [(net, meth, rec) for net in ds["nets"] + ds["baselines"] if net["status"] == "ok"
                   for meth, rec in net["methods"].items() if rec["status"] == "ok"]
        md_ok = [dict(zip(header, b)) for b in body if dict(zip(header, b))["time"]]
        assert len(md_ok) == len(ok_rows)
        for cell, (net, meth, rec) in zip(md_ok, ok_rows):
            assert cell["Net"] == net["label"]
            assert [float(v) for v in cell[col].split(" / ")] == [pct(x["certified_accuracy"]) for x in rec["results"]]
            for x in rec["results"]:
                (c,) = [c for c in csv_rows if c["dataset"] == ds["dataset"] and c["net"] == net["label"]
                        and c["method"] == meth and float(c["fraction"]) == x["fraction"]]
                assert float(c["certified_accuracy"]) == x["certified_accuracy"]
                assert float(c["eps"]) == x["eps"]


def test_constructed_nets_certify_every_point_below_r(tiny_theorem):
    _, res = tiny_theorem
    for ds in res["datasets"]:
        assert len(ds["nets"]) == 2
        for net in ds["nets"]:
            assert net["status"] == "ok", net
            rec = net["methods"]["margin"]
            assert [x["fraction"] for x in rec["results"]] == FRACTIONS
            assert all(x["certified_accuracy"] == 1.0 for x in rec["results"]), (ds["dataset"], net["label"])
            assert rec["min_radius_over_r"] >= 1 - 1e-4  # r, less the float32 certificate's rounding allowance
            assert rec["clean_accuracy"] == 1.0


def test_separation_and_sizes_match_the_library(tiny_theorem):
    _, res = tiny_theorem
    digits = load_dataset("digits", "all").subset(120)
    ds = res["datasets"][0]
    assert ds["n"] == 120 and ds["r"] == linf_separation(digits.x, digits.y)
    t32, a2 = ds["nets"]
    assert t32["widths"] == [120, 10]
    assert a2["widths"] == [theoremA2_width(120, 64, 10, 3)] * 2 + [10]
    assert t32["n_params"] == 120 * 64 + 10 * 120 + 10  # hidden weights are the points; output layer with bias


def test_baselines_are_certified_on_the_same_points_at_the_same_eps(tiny_theorem):
    _, res = tiny_theorem
    digits = res["datasets"][0]
    # the ReLU baselines of `run` (its default suite: the fast presets), so both share the checkpoint cache
    assert [b["preset"] for b in digits["baselines"]] == ["digits-ibp-fast", "digits-crown-ibp-fast"]
    for b in digits["baselines"]:
        assert b["status"] == "ok"
        assert set(b["methods"]) == {"ibp", "crown-ibp", "crown"}
        for rec in b["methods"].values():
            assert rec["status"] == "ok"
            assert [x["eps"] for x in rec["results"]] == pytest.approx([f * digits["r"] for f in FRACTIONS])
    mnist = res["datasets"][1]  # no GPU and nothing cached: the MNIST baselines are skipped with the reason
    assert all(b["status"] == "skipped" and "GPU" in b["reason"] for b in mnist["baselines"])


def test_plot(tiny_theorem):
    out, res = tiny_theorem
    check_png(out / "certified_vs_eps.png")
    labels = figure_labels(theorem_certified(res))
    assert [a["xlabel"] for a in labels] == ["ε / r", "ε / r"]
    assert all(a["ylabel"] == "certified accuracy (%)" for a in labels)


def test_missing_mnist_is_skipped_with_the_reason(tmp_path):
    out = tmp_path / "t"
    assert main(["theorem", "--datasets", "mnist", "--data-root", str(tmp_path / "nothing"), "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    res = load(out)
    validate_results(res)
    assert res["datasets"] == [] and res["skipped"][0]["dataset"] == "mnist"
    assert "skipped mnist" in (out / "results.md").read_text()
