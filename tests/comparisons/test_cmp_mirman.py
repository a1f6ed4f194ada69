"""The three-point contrast: exactly the claims of the issue, on the radii the run measured.

Everything is float64; bisection tolerances are the ones recorded with each
radius, and "strictly below r" means below by more than that tolerance.  A
measurement that contradicts the theorem fails here: it is reported, never
tuned away.
"""
from __future__ import annotations

import copy

import pytest
import torch

from comparisons.mirman import evaluate_checks, true_radius_1d
from comparisons.mirman_nets import SmallReluNet, abs_net, tuned_net
from comparisons.mirman_report import figure1, radii_scatter
from comparisons.plots import figure_labels
from comparisons.schema import validate_results
from linf_plugin.certification import certify
from linf_plugin.certification.bound_prop import BoundPropCertifier
from linf_plugin.data import three_point_set
from linf_plugin.models import theorem32_net

from .comparisons_helpers import check_png, md_tables, read_csv

R = 1.0


def rows(res, **kw):
    out = [x for x in res["rows"] if x.get("status") == "ok" and all(x.get(k) == v for k, v in kw.items())]
    assert out, f"no rows with {kw}"
    return out


def test_schema_csv_and_markdown_agree(tiny_mirman):
    out, res = tiny_mirman
    validate_results(res)
    assert res["settings"]["dtype"] == "float64"
    csv_rows = read_csv(out / "results.csv")
    ok = [x for x in res["rows"] if x["status"] == "ok"]
    assert len(csv_rows) == 3 * len(ok) + sum(x["status"] != "ok" for x in res["rows"])
    by = {(c["setting"], c["net"], c["method"], c["point"]): c for c in csv_rows}
    points = ("A(−2rs)", "B(0)", "A(+2rs)")
    for x in ok:
        for i, p in enumerate(points):
            c = by[(x["setting"], x["net"], x["method"], p)]
            assert float(c["radius"]) == x["radius"][i]  # written with repr precision
            assert float(c["tolerance"]) == x["tolerance"]
            assert c["reaches_r"] == str(x["reaches_r"])
    every = md_tables((out / "results.md").read_text())[1]
    header, body = every[0], every[1:]
    assert len(body) == len(res["rows"])
    for line, x in zip(body, res["rows"]):
        cell = dict(zip(header, line))
        assert (cell["Setting"], cell["Net"]) == (x["setting"], x["net"])
        if x["status"] == "ok":
            assert cell["reaches r"] == ("yes" if x["reaches_r"] else "no")
            assert float(cell["min"].rstrip("r")) == pytest.approx(x["min_radius"] / R, rel=1e-5)


def test_linf_side_touching_theorem_net_has_radius_r_everywhere(tiny_mirman):
    _, res = tiny_mirman
    for row in rows(res, net="theorem32", method="margin", separation=1.0):
        tol = row["tolerance"]
        assert 0 <= tol <= 1e-9 * R  # the certificate's own floating-point allowance
        for v in row["radius"]:
            assert R - tol <= v <= R  # r: the largest radius any classifier can have at all three points
        assert all(row["certified_at"]["0.999r"])
        assert not all(row["certified_at"]["r"])  # ε = r itself is beyond the supremum when the boxes touch
    for dim in (1, 2):  # the same through the library directly
        data = three_point_set(R, dim, 1.0)
        net = theorem32_net(data.x, data.y)
        assert next(net.parameters()).dtype == torch.float64
        assert certify(net, data, 0.999 * R, "margin").certified.all()


def test_linf_side_strictly_separated_certifies_r(tiny_mirman):
    _, res = tiny_mirman
    for row in rows(res, net="theorem32", method="margin", separation=1.25):
        assert all(row["certified_at"]["r"])
        assert row["min_radius"] > R
    data = three_point_set(R, 1, 1.25)
    assert certify(theorem32_net(data.x, data.y), data, R, "margin").certified.all()


def test_relu_side_every_net_falls_short_of_r_under_ibp(tiny_mirman):
    """Mirman et al.: no ReLU net gets IBP radius r at all three touching points."""
    _, res = tiny_mirman
    for dim in (1, 2):
        ibp = rows(res, family="relu", method="ibp", separation=1.0, dim=dim)
        groups = {x["group"] for x in ibp}
        assert groups == {"hand-built", "ibp trained", "crown-ibp trained"}
        assert len(ibp) == 2 + 2 * 2  # relu_abs, relu_tuned, 2 sizes x 2 training bounds
        for row in ibp:
            assert row["min_radius"] + row["tolerance"] < R, (row["net"], row["radius"], row["tolerance"])
            assert row["tolerance"] <= 2 * R / 2 ** 30


def test_constructed_truly_robust_net(tiny_mirman):
    """f = ReLU(x) + ReLU(−x) − r: true radius r at every point, IBP radius r/2 at the middle one."""
    _, res = tiny_mirman
    (row,) = rows(res, net="relu_abs", method="ibp", separation=1.0, dim=1)
    grid = R / res["settings"]["grid_per_r"]
    assert row["true_radius"] == pytest.approx([R, R, R], abs=grid)
    assert abs(row["radius"][1] - R / 2) <= row["tolerance"] + 1e-12
    # oracle: IBP bounds f on [−ε, ε] by [−r, 2ε − r]; the library's IBP must give exactly that
    net = abs_net(R)
    cert = BoundPropCertifier(net, torch.zeros(1, 1, dtype=torch.float64), 2)
    eps = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64)
    x = torch.zeros(4, 1, dtype=torch.float64)
    lower_f = cert.lower_margins(x, torch.zeros(4, dtype=torch.long), -eps[:, None], eps[:, None], "ibp")[:, 0]
    upper_f = -cert.lower_margins(x, torch.ones(4, dtype=torch.long), -eps[:, None], eps[:, None], "ibp")[:, 0]
    assert torch.allclose(lower_f, torch.full_like(eps, -R))
    assert torch.allclose(upper_f, 2 * eps - R)


def test_no_claim_that_ibp_is_always_looser(tiny_mirman):
    """IBP is exact at a single point (the outer points of relu_abs); the theorem is about all three at once."""
    _, res = tiny_mirman
    (row,) = rows(res, net="relu_abs", method="ibp", separation=1.0, dim=1)
    for i in (0, 2):
        assert abs(row["radius"][i] - row["true_radius"][i]) <= row["tolerance"] + R / res["settings"]["grid_per_r"]
    assert row["min_radius"] + row["tolerance"] < R


def test_crown_succeeds_where_ibp_fails_on_the_constructed_net(tiny_mirman):
    """Measured (not a theorem): CROWN's triangle relaxation bounds f on the middle box by ε − r, so radius r."""
    _, res = tiny_mirman
    for dim in (1, 2):
        (crown,) = rows(res, net="relu_abs", method="crown", separation=1.0, dim=dim)
        (ibp,) = rows(res, net="relu_abs", method="ibp", separation=1.0, dim=dim)
        assert crown["reaches_r"] and not ibp["reaches_r"]
    obs = [c for c in res["checks"] if c["kind"] == "observed"]
    assert obs and "relu_abs" in obs[0]["detail"]


def test_tuned_net_is_ibp_certified_at_r_once_strictly_separated(tiny_mirman):
    """Baader et al.'s side: with strict separation a net built for ε = r passes IBP at all three points."""
    _, res = tiny_mirman
    for row in rows(res, net="relu_tuned", method="ibp", separation=1.25):
        assert row["min_radius"] >= R
    for row in rows(res, net="relu_tuned", method="ibp", separation=1.0):
        assert row["min_radius"] + row["tolerance"] < R


def test_the_run_reports_every_theorem_check_passing(tiny_mirman):
    _, res = tiny_mirman
    theorem = [c for c in res["checks"] if c["kind"] == "theorem"]
    assert len(theorem) == 2 * 2 + 2 + 1  # theorem net per setting, ReLU per touching setting, relu_abs in 1-D
    assert all(c["passed"] for c in theorem), [c for c in theorem if not c["passed"]]


def test_a_contradicting_measurement_fails_the_check(tiny_mirman):
    _, res = tiny_mirman
    bad = copy.deepcopy(res)
    for row in bad["rows"]:
        if row.get("status") == "ok" and row["group"] == "ibp trained" and row["method"] == "ibp":
            row.update(radius=[R, R, R], min_radius=R, below_r=False, reaches_r=True)
            break
    failed = [c for c in evaluate_checks(bad) if not c["passed"]]
    assert len(failed) == 1 and "every ReLU net" in failed[0]["claim"]


def test_true_radius_dense_search():
    net = tuned_net(0.5, 1.0)
    spacing = 1.0 / 1024
    for x0, label in ((-2.0, 0), (0.0, 1), (2.0, 0)):
        radius, capped = true_radius_1d(net, x0, label, 2.0, spacing)
        assert radius == pytest.approx(1.0, abs=1e-12) and not capped
    far = SmallReluNet(1, ()).double()  # a linear classifier: a single boundary
    with torch.no_grad():
        far.body[0].weight.copy_(torch.tensor([[1.0], [-1.0]], dtype=torch.float64))
        far.body[0].bias.copy_(torch.tensor([0.3, -0.3], dtype=torch.float64))
    radius, capped = true_radius_1d(far, 2.0, 0, 5.0, spacing)
    assert radius == pytest.approx(2.3, abs=1e-12) and not capped
    radius, capped = true_radius_1d(far, 2.0, 0, 1.0, spacing)
    assert capped and radius == 1.0


def test_figures(tiny_mirman):
    out, res = tiny_mirman
    check_png(out / "mirman_figure1.png")
    check_png(out / "mirman_radii.png")
    labels = figure_labels(figure1(res))
    assert len(labels) == 4  # two hand-built nets: f with the boxes (top), the middle box's bounds against ε
    assert all(a["xlabel"] == "x" and a["ylabel"] == "f(x)" for a in labels[:2])
    assert all(a["xlabel"] == "ε" and a["ylabel"] == "upper bound of f on the middle box" for a in labels[2:])
    assert {fd["net"] for fd in res["figure_data"]} == {"relu_abs", "relu_tuned"}
    fd = next(f for f in res["figure_data"] if f["net"].startswith("relu_abs"))
    for e, ub, tub in zip(fd["eps"], fd["ibp"]["upper"], fd["true_range"]["upper"]):
        assert ub == pytest.approx(2 * e - R, abs=1e-12) and tub == pytest.approx(e - R, abs=1e-3)
    labels = figure_labels(radii_scatter(res))
    assert all(a["xlabel"] == "min IBP radius / r" and a["ylabel"] == "min CROWN radius / r" for a in labels)
    assert len(labels) == 4
