"""The harness's own pieces: checkpoint cache, suites and overrides, the schema checker."""
from __future__ import annotations

import json
import math

import pytest

from comparisons.cache import ENTRY_NAME, CheckpointCache, config_key
from comparisons.schema import SchemaError, check
from comparisons.suites import SUITES, get_suite, parse_overrides, scale_epochs, select_models
from linf_plugin.training import Schedule, get_preset


def _tiny_relu_config():
    cfg = scale_epochs(get_preset("digits-ibp"), 2)
    return cfg.replace(model_kwargs={"width": 1, "linear_size": 8}, train_subset=64, batch_size=32, device="cpu",
                       progress=False).validate()


def test_config_key_counts_what_decides_the_weights():
    cfg = _tiny_relu_config()
    assert config_key(cfg) == config_key(cfg.replace())
    assert config_key(cfg) == config_key(cfg.replace(progress=True, eval_every=7, num_threads=1))
    for change in ({"lr": 2e-3}, {"seed": 1}, {"epochs": 3}, {"train_subset": 65}, {"model_kwargs": {"width": 2}}):
        assert config_key(cfg) != config_key(cfg.replace(**change)), change


def test_cache_trains_once_then_reuses(tmp_path):
    cfg = _tiny_relu_config()
    cache = CheckpointCache(tmp_path / "cache")
    assert cache.lookup(cfg) is None
    first = cache.get_or_train(cfg)
    assert not first.cache_hit and first.train_time > 0 and first.path.exists()
    entry = json.loads((first.path.parent / ENTRY_NAME).read_text())
    assert entry["key"] == config_key(cfg) and entry["train_time"] == first.train_time
    second = cache.get_or_train(cfg)
    assert second.cache_hit and second.train_time == first.train_time
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert (a == b).all()


def test_cache_resumes_an_unfinished_entry_and_retrains_a_corrupt_one(tmp_path):
    cfg = _tiny_relu_config()
    cache = CheckpointCache(tmp_path / "cache")
    first = cache.get_or_train(cfg)
    folder = first.path.parent
    (folder / ENTRY_NAME).unlink()  # as if the process died after its last checkpoint
    assert cache.lookup(cfg) is None
    resumed = cache.get_or_train(cfg)
    assert not resumed.cache_hit and json.loads((folder / ENTRY_NAME).read_text())["resumed"] is True
    for a, b in zip(first.model.state_dict().values(), resumed.model.state_dict().values()):
        assert (a == b).all()  # every epoch was already done: nothing retrained
    data = bytearray(first.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.path.write_bytes(bytes(data))
    assert cache.lookup(cfg) is None  # a flipped byte is caught by the checkpoint digest
    again = cache.get_or_train(cfg)
    assert not again.cache_hit and cache.lookup(cfg) is not None


class _CountingBar:
    def __init__(self, total):
        self.total, self.n, self.closed = total, 0, False

    def update(self, k=1):
        self.n += k

    def close(self):
        self.closed = True


def test_the_training_bar_counts_every_epoch_resumed_ones_included(tmp_path):
    """The bar is ticked by a trainer callback (not by parsing log lines): a resumed entry counts the epochs
    its checkpoint already holds."""
    from types import SimpleNamespace

    import comparisons.run as run

    cfg = _tiny_relu_config()
    cache = CheckpointCache(tmp_path / "cache")
    spec = SimpleNamespace(key="ibp", preset=cfg.name)
    bars = []

    def stage_bar(desc, total):
        bars.append(_CountingBar(total))
        return bars[-1]

    first = run._train_or_load(cfg, spec, cache, "cpu", stage_bar)
    assert bars[-1].n == bars[-1].total == cfg.epochs and bars[-1].closed
    (first.path.parent / ENTRY_NAME).unlink()  # as if the process died after its last checkpoint
    run._train_or_load(cfg, spec, cache, "cpu", stage_bar)
    assert len(bars) == 2 and bars[-1].n == cfg.epochs  # every epoch was done before the resume


def test_disabled_cache_trains_into_the_scratch_folder(tmp_path):
    cfg = _tiny_relu_config()
    cache = CheckpointCache(tmp_path / "cache", enabled=False, scratch=tmp_path / "run")
    got = cache.get_or_train(cfg)
    assert not got.cache_hit and str(got.path).startswith(str(tmp_path / "run"))
    assert not (tmp_path / "cache").exists()
    assert cache.get_or_train(cfg).cache_hit is False


@pytest.mark.parametrize("preset", ["digits-linf", "digits-hybrid", "digits-ibp", "mnist-0.3", "cifar10-8/255",
                                    "mnist-0.3-hybrid", "cifar10-8/255-crown-ibp"])
@pytest.mark.parametrize("epochs", [1, 2, 5, 17])
def test_scaled_recipes_keep_their_shape(preset, epochs):
    cfg = scale_epochs(get_preset(preset), epochs).validate()
    assert cfg.epochs == epochs
    steps = 3
    state = Schedule(cfg, steps).at(epochs * steps - 1)
    if cfg.p_start is not None and cfg.family != "relu":
        assert math.isinf(state.p)  # margin certification needs p = inf at the end
    if cfg.family != "linf_dist" and cfg.eps_train > 0:
        assert state.eps == pytest.approx(cfg.eps_train)  # the eps ramp ends within the run
    assert all(1 <= m <= epochs for m in cfg.lr_milestones)


def test_overrides_and_model_selection():
    got = parse_overrides(["epochs=3", 'linf.model_kwargs={"width": 8}', "device=cpu", "adam_betas=[0.9, 0.99]"])
    assert got == {"*": {"epochs": 3, "device": "cpu", "adam_betas": (0.9, 0.99)}, "linf": {"model_kwargs": {"width": 8}}}
    with pytest.raises(ValueError, match="unknown training config field"):
        parse_overrides(["epoch=3"])
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_overrides(["epochs"])
    suite = get_suite("digits")
    assert [m.key for m in select_models(suite, None)] == ["linf", "hybrid", "ibp", "crown-ibp"]
    assert [m.preset for m in select_models(suite, ["ibp", "digits-linf"])] == ["digits-ibp-fast", "digits-linf"]
    assert select_models(suite, ["mnist-0.3-ibp"])[0].preset == "mnist-0.3-ibp"
    with pytest.raises(ValueError, match="unknown model"):
        select_models(suite, ["resnet"])
    with pytest.raises(ValueError, match="twice"):
        select_models(suite, ["ibp", "digits-ibp-fast"])
    with pytest.raises(ValueError, match=r"unknown suite 'imagenet'; choose from \['cifar10-8/255', 'digits', "
                                         r"'fashion-mnist', 'mnist-0.3'\]"):
        get_suite("imagenet")
    for suite in SUITES.values():  # every suite names real presets
        for spec in suite.models + suite.full_models:
            get_preset(spec.preset).validate()


def test_schema_checker():
    spec = {"a": "int", "b?": "float?", "c": ["str"], "d": ("x", "y"), "e": {"f": "bool"}}
    check({"a": 1, "c": [], "d": "x", "e": {"f": True}, "extra": 0}, spec)
    check({"a": 1, "b": None, "c": ["s"], "d": "y", "e": {"f": False}}, spec)
    for bad, where in (({"a": 1.5, "c": [], "d": "x", "e": {"f": True}}, "$.a"),
                       ({"a": True, "c": [], "d": "x", "e": {"f": True}}, "$.a"),
                       ({"a": 1, "c": [3], "d": "x", "e": {"f": True}}, r"\$.c\[0\]"),
                       ({"a": 1, "c": [], "d": "z", "e": {"f": True}}, "$.d"),
                       ({"a": 1, "c": [], "d": "x", "e": {}}, "$.e"),
                       ({"c": [], "d": "x", "e": {"f": True}}, "missing key 'a'")):
        with pytest.raises(SchemaError, match=where.replace("$", r"\$") if "\\" not in where else where):
            check(bad, spec)


def test_budgeted_points_fit_the_budget():
    from comparisons.run import budgeted_points

    assert budgeted_points(probe_time=2.0, probe_n=16, total=360, budget=20.0) == 160  # 0.125 s a point
    assert budgeted_points(probe_time=2.0, probe_n=16, total=100, budget=20.0) == 100  # all fit
    assert budgeted_points(probe_time=30.0, probe_n=1, total=360, budget=20.0) == 1  # never below the probe
    assert budgeted_points(probe_time=5.0, probe_n=16, total=10, budget=1.0) == 10  # the probe was everything


def test_next_probe_grows_while_it_pays():
    from comparisons.run import PROBE_GROWTH, next_probe

    # α-CROWN on the digits hybrid: one point 0.23 s for the grid; 5 s buy 21 points at that rate
    assert next_probe(0.23, 1, 360, 5.0, 256) == PROBE_GROWTH
    assert next_probe(0.8, 16, 360, 5.0, 256) == 64
    assert next_probe(0.8, 16, 360, 5.0, 32) == 32  # never past the requested batch size
    assert next_probe(2.0, 64, 100, 1e9, 256) == 100  # never past the data
    assert next_probe(8.7, 1, 360, 5.0, 256) == 0  # α-CROWN on a ReLU CNN: not even 2 points in 5 s
    assert next_probe(1.7, 16, 360, 5.0, 256) == 47  # what 5 s buy at the last rate
    assert next_probe(1.7, 32, 360, 2.5, 256) == 0  # 47 points: less than twice the last probe
    assert next_probe(1.0, 360, 360, 5.0, 512) == 0  # the probe had every point


def _cost_model(monkeypatch, seconds_per_batch):
    """``_timed_method`` replaced by a cost model: the planner's decisions only, no certification."""
    import comparisons.run as run

    calls = []

    def fake(model, data, method, eps_grid, eps_max, *, batch_size, bar, saving, **kw):
        n = len(data)
        full, rest = divmod(n, batch_size)
        t = len(eps_grid) * (full * seconds_per_batch(batch_size) + (seconds_per_batch(rest) if rest else 0))
        calls.append((n, batch_size))
        return {"status": "ok", "one_pass": False, "n": n, "time": t, "results": [], "curve": None,
                "extra": {}}

    monkeypatch.setattr(run, "_timed_method", fake)
    return calls


def test_a_budget_buys_points_at_the_batch_size_that_pays(monkeypatch):
    """α-CROWN on an l_p-dist net costs a fixed 0.07 s a batch and 0.008 s a point at each ε: the one-point
    probe alone sees 0.23 s a point (87 points in 20 s), batches of 64 fit all 360 points."""
    from comparisons.jobs import Saving
    from comparisons.run import _budgeted_method
    from linf_plugin.data import load_dataset

    data = load_dataset("digits", "test")
    _cost_model(monkeypatch, lambda b: 0.07 + 0.008 * b)
    rec = _budgeted_method(None, data, "alpha-crown", [0.05, 0.1, 0.2], 0.2, 20.0, batch_size=256, saving=Saving())
    sizes = [p[0] for p in rec["budget"]["probes"]]
    assert sizes[0] == 1 and sizes == sorted(sizes) and len(sizes) > 2
    assert rec["n"] == 360 and rec["budget"]["points"] == 360
    assert rec["time"] <= 20.0  # the run the budget bought fits it
    assert sum(p[1] for p in rec["budget"]["probes"]) <= 20.0 / 2


def test_a_budget_stops_growing_batches_that_cost_more_a_point(monkeypatch):
    """CROWN on a ReLU CNN slows down a point in large batches: the planner keeps the smaller batch."""
    from comparisons.jobs import Saving
    from comparisons.run import _budgeted_method
    from linf_plugin.data import load_dataset

    data = load_dataset("digits", "test")
    calls = _cost_model(monkeypatch, lambda b: 0.01 * b + 0.0004 * b * b)
    rec = _budgeted_method(None, data, "crown", [0.05, 0.1, 0.2], 0.2, 20.0, batch_size=256, saving=Saving())
    assert rec["budget"]["probe_points"] == 16 and len(rec["budget"]["probes"]) == 2
    assert calls[-1][1] == 16  # the final run in batches of the best probe's size
    assert rec["time"] <= 20.0 + 1e-9


def test_a_budgeted_method_runs_the_points_that_fit_and_says_so():
    """CROWN under a budget: the leading points only, the same flags as certifying them directly."""
    import torch

    from comparisons.run import _certify_method
    from linf_plugin.certification import certify
    from linf_plugin.data import load_dataset
    from linf_plugin.models import create_model

    torch.manual_seed(0)
    model = create_model("mlp_3layer", input_shape=(1, 8, 8), num_classes=10).eval()
    data = load_dataset("digits", "test").subset(48)
    grid = [0.0, 0.01]
    kw = dict(batch_size=64, device=torch.device("cpu"), alpha_iterations=2, bisect=False, bisect_steps=4,
              bar=__import__("tqdm").tqdm(disable=True))
    tight = _certify_method(model, data, "crown", grid, budget=1e-9, **kw)
    assert tight["n"] == 16 and tight["budget"]["points"] == 16 and tight["budget"]["of"] == 48
    loose = _certify_method(model, data, "crown", grid, budget=1e9, **kw)
    # a second, larger probe (all 48 points in one batch) ran; the better rate of the two set the batch
    assert loose["n"] == 48 and [p[0] for p in loose["budget"]["probes"]] == [16, 48]
    assert loose["budget"]["probe_points"] in (16, 48)
    for rec in (tight, loose):
        for r in rec["results"]:
            direct = certify(model, data.subset(rec["n"]), r["eps"], "crown", batch_size=64)
            assert abs(r["certified_accuracy"] - direct.certified_accuracy) < 1e-12


def test_full_and_default_suites_and_their_options():
    from comparisons.cli import build_parser
    from comparisons.mirman import FULL_SETTINGS, MirmanSettings, settings_from_args
    from comparisons.suites import get_suite, select_models

    suite = get_suite("digits")
    assert [m.preset for m in select_models(suite, None)] == [
        "digits-linf-fast", "digits-hybrid-fast", "digits-ibp-fast", "digits-crown-ibp-fast"]
    assert [m.preset for m in select_models(suite, ["linf"], full=True)] == ["digits-linf"]
    assert suite.budgets_for(False) == {"crown": 20.0, "alpha-crown": 20.0} and suite.budgets_for(True) == {}
    assert suite.points_for(True) == {"alpha-crown": 10}
    args = build_parser().parse_args(["run", "--full", "--budget", "crown=5"])
    assert args.full and args.budgets == ["crown=5"]
    quick = settings_from_args(build_parser().parse_args(["mirman"]))
    full = settings_from_args(build_parser().parse_args(["mirman", "--full", "--seeds", "4"]))
    assert (quick.sizes, quick.seeds, quick.bisect_steps) == (MirmanSettings().sizes, [0], 24)
    assert full.sizes == FULL_SETTINGS["sizes"] and full.seeds == [4] and full.bisect_steps == 30


def test_the_margin_warm_up_runs_the_batch_the_timed_pass_runs(monkeypatch):
    """The margin pass is timed as ONE batch of the whole set; its untimed warm-up must run that same batch
    (not the first ``batch_size`` points), or the timed call is the first at its size."""
    import torch

    import comparisons.run as run
    from linf_plugin.data import load_dataset
    from linf_plugin.models import create_model

    calls = []
    real_certify, real_curve = run.certify, run.certified_accuracy_curve
    monkeypatch.setattr(run, "certify", lambda m, d, *a, **k: calls.append(("warm", len(d), k["batch_size"]))
                        or real_certify(m, d, *a, **k))
    monkeypatch.setattr(run, "certified_accuracy_curve", lambda m, d, *a, **k: calls.append(
        ("timed", len(d), k["batch_size"])) or real_curve(m, d, *a, **k))
    model = create_model("linf_dist_mlp", input_shape=(1, 8, 8), num_classes=10, depth=2, width=16).eval()
    data = load_dataset("digits", "test").subset(100)
    rec = run._certify_method(model, data, "margin", [0.0, 0.1], batch_size=32, device=torch.device("cpu"),
                              alpha_iterations=2, bisect=False, bisect_steps=4,
                              bar=__import__("tqdm").tqdm(disable=True))
    assert rec["n"] == 100 and calls == [("warm", 100, 100), ("timed", 100, 100)]
