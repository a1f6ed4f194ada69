"""The fashion-mnist suite: its command line on bad input, the --preset alias, and a tiny end-to-end run on
generated IDX files (so CI exercises the whole path without the real data)."""
from __future__ import annotations

import argparse

import pytest

import linf_plugin.data.mnist as mnist_module
from comparisons.cli import main
from comparisons.schema import validate_results
from linf_plugin.data import DATA_ROOT_ENV

from ..data.idx_files import write_idx_set
from .comparisons_helpers import load, md_tables, read_csv

TINY_FASHION = ['linf.model_kwargs={"depth": 3, "width": 16}',
                'hybrid.model_kwargs={"depth": 2, "width": 16, "head_hidden": 16}',
                'ibp.model_kwargs={"width": 1, "linear_size": 16}',
                'crown-ibp.model_kwargs={"width": 1, "linear_size": 16}', "batch_size=32"]


@pytest.fixture
def no_fashion(tmp_path, monkeypatch):
    """No Fashion-MNIST anywhere: no root, no $LINF_DATA_ROOT, no Debian folder."""
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    monkeypatch.setattr(mnist_module, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "not-installed")
    return tmp_path


def test_bad_suite_arguments_are_refused_with_a_message(tmp_path, capsys, no_fashion):
    with pytest.raises(SystemExit):
        main(["run", "--suite", "imagenet"])
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err
    for args, msg in [(["--eps", "-0.1"], "every eps must be finite and >= 0"),
                      (["--eps", "0.1,0.1"], "duplicate eps"),
                      (["--pgd-points", "0"], "--pgd-points 0: need n >= 1"),
                      (["--suite", "digits", "--data-root", str(tmp_path)], "digits is embedded"),
                      (["--suite", "fashion-mnist", "--models", "resnet"], "unknown model 'resnet' for suite "
                                                                             "fashion-mnist"),
                      (["--suite", "fashion-mnist"], "make data")]:
        assert main(["run", *args, "--no-progress", "--out", str(tmp_path / "x")]) == 2, args
        assert msg in capsys.readouterr().err, args
    with pytest.raises(SystemExit):
        main(["run", "--eps", "abc"])


def test_missing_data_names_the_folders_and_the_install_command(tmp_path, capsys, no_fashion):
    assert main(["run", "--suite", "fashion-mnist", "--data-root", str(tmp_path / "mine"), "--no-progress",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "mine" / "FashionMNIST" / "raw") in err and str(tmp_path / "not-installed") in err
    assert "apt-get install dataset-fashion-mnist" in err


def test_preset_is_a_deprecated_alias_of_suite(tmp_path, capsys):
    with pytest.warns(FutureWarning, match="use --suite NAME"):
        # parsed and mapped to the suite, then refused for the bad method (nothing is trained)
        assert main(["run", "--preset", "digits", "--methods", "bogus", "--out", str(tmp_path / "a")]) == 2
    assert "unknown certification method" in capsys.readouterr().err
    with pytest.warns(FutureWarning):
        assert main(["run", "--preset", "digits", "--suite", "fashion-mnist", "--out", str(tmp_path / "b")]) == 2
    assert "disagree" in capsys.readouterr().err
    from comparisons.run import RunSettings

    with pytest.warns(FutureWarning, match="suite="):
        assert RunSettings(preset="fashion-mnist").suite == "fashion-mnist"


def test_help_texts_agree_on_suite_and_preset():
    # the parsers' own help (what `--help` prints), in-process: two interpreters cost seconds each
    from comparisons.cli import build_parser as run_parser
    from linf_plugin.training.__main__ import build_parser as train_parser

    sub = next(a for a in run_parser()._actions if isinstance(a, argparse._SubParsersAction))
    run_help = " ".join(sub.choices["run"].format_help().split())
    train_help = " ".join(train_parser().format_help().split())
    assert "--suite" in run_help and "fashion-mnist" in run_help
    assert "--preset" not in run_help.replace("takes as --preset", "")  # the alias is hidden
    # both define the two words the same way
    assert "A suite (--suite) is a data set, an eps grid and the models compared on it" in run_help
    assert "training preset (a recipe: model, loss, schedules)" in run_help
    assert "training preset (a recipe: model, loss, schedules)" in train_help
    assert "--suite" in train_help and "a data set and its models" in train_help


@pytest.fixture(scope="module")
def tiny_fashion(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    write_idx_set(root / "data" / "FashionMNIST" / "raw", n_train=96, n_test=40, compress=True, learnable=True)
    out = root / "run"
    args = ["run", "--suite", "fashion-mnist", "--data-root", str(root / "data"), "--epochs", "1",
            "--test-subset", "40", "--pgd-points", "16", "--pgd-steps", "3", "--points", "crown=8",
            # α-CROWN on the 28x28 CNNs takes tens of seconds a point here; the digits runs test it
            "--methods", "margin,interval,ibp,crown-ibp,crown", "--batch-size", "64", "--no-progress",
            "--cache-dir", str(root / "cache"), "--out", str(out), "--device", "cpu"]
    for item in TINY_FASHION:
        args += ["--set", item]
    assert main(args) == 0
    return out, load(out)


def test_tiny_fashion_run_end_to_end(tiny_fashion):
    out, res = tiny_fashion
    validate_results(res)
    s = res["settings"]
    assert (s["suite"], s["dataset"], s["test_points"], s["pgd_points"]) == ("fashion-mnist", "fashion-mnist", 40, 16)
    assert [m["key"] for m in res["models"]] == ["linf", "hybrid", "ibp", "crown-ibp"]
    assert all(m["status"] == "ok" for m in res["models"]), [m.get("error") for m in res["models"]]
    for m in res["models"]:
        ev = m["evaluation"]
        assert m["train"]["config"]["dataset"] == "fashion-mnist"
        assert ev["n"] == 40 and ev["pgd"]["n"] == 16
        for meth in ("interval", "ibp", "crown-ibp") + (("margin",) if m["family"] == "linf_dist" else ()):
            if ev["methods"][meth]["status"] == "ok":
                assert ev["methods"][meth]["n"] == 40, (m["key"], meth)
        if ev["methods"]["crown"]["status"] == "ok":
            assert ev["methods"]["crown"]["n"] == 8
        check = ev["pgd_vs_certified"]
        assert check["checked"] and check["broken_certified"] == 0
        assert all(r["points"] == min(16, ev["methods"][meth]["n"]) for meth, rows in check["methods"].items()
                   for r in rows)
    assert res["models"][0]["evaluation"]["methods"]["margin"]["status"] == "ok"
    table = md_tables((out / "results.md").read_text())[0]
    assert all(row[5].endswith("†") for row in table[1:])  # PGD on the first 16 points only, marked
    assert "PGD-3: first 16 test points only" in (out / "results.md").read_text()
    assert {r["model"] for r in read_csv(out / "results.csv")} == {"linf", "hybrid", "ibp", "crown-ibp"}
