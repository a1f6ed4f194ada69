"""benchmarks/headroom.py end to end on the digits hybrid (trained into a fresh cache, seconds): the
certified counts it reports are the library's, no certified point is one an attack broke, and the
headroom is what the counts say."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "headroom.py"


def _module():
    spec = importlib.util.spec_from_file_location("headroom_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_headroom_counts_what_certify_and_the_attacks_say(tmp_path):
    from comparisons.cache import CheckpointCache
    from comparisons.suites import build_config, get_suite, select_models
    from linf_plugin.certification import certify
    from linf_plugin.data import load_dataset

    out = tmp_path / "h.json"
    _module().main(["--models", "hybrid", "--eps", "0.05", "0.2", "--methods", "ibp,crown", "--steps", "5",
                    "--restarts", "1", "--seeds", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    res = json.loads(out.read_text())
    rows = res["models"]["hybrid"]["rows"]
    assert [r["eps"] for r in rows] == [0.05, 0.2] and res["n"] == 360

    spec = select_models(get_suite("digits"), ["hybrid"])[0]
    model = CheckpointCache(tmp_path / "cache").lookup(build_config(spec, progress=False)).model
    test = load_dataset("digits", "test")
    for r in rows:
        assert set(r["certified"]) == {"ibp", "crown"} and r["reference"] == "ibp"
        ibp = certify(model, test, r["eps"], "ibp")
        assert r["certified"]["ibp"] == int(ibp.certified.sum())
        # every certified point survived every attack, so the unbroken points include them
        assert r["unbroken"] >= max(r["certified"].values())
        assert r["headroom"] == r["unbroken"] - max(r["certified"].values())
        assert r["over_ibp_max"] == r["unbroken"] - r["certified"]["ibp"]
        assert r["missed"]["ibp"] == 0 and r["attack_runs"] == 2
    assert rows[0]["certified"]["ibp"] > rows[1]["certified"]["ibp"] > 0  # real, non-vacuous counts


def test_headroom_refuses_an_empty_ensemble(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        _module().main(["--seeds", "0", "--out", str(tmp_path / "h.json")])
    assert e.value.code == 2 and "--seeds must be at least 1" in capsys.readouterr().err
