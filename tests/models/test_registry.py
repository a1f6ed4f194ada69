"""Every registered model builds, runs forward and backward, and describes itself (timm style)."""
from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

from linf_plugin.data import dataset_info, three_point_set
from linf_plugin.models import (FAMILIES, GENERIC_DEFAULTS, LinfDistHybrid, LinfDistNet, UnknownModelError,
                                create_model, list_models, model_defaults, model_entrypoint, model_family, model_info,
                                register_model)
from linf_plugin.names import METHODS
from linf_plugin.nn import InputNormalize, LpDistLinear, MeanShiftNorm, set_p

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
BIG = set(list_models("*5120*"))  # the paper's presets: ~5e7-1.2e8 parameters
CNNS = set(list_models("cnn_*"))


def _params(name, shape_key):
    marks = [pytest.mark.slow] if name in BIG else []
    return pytest.param(name, shape_key, marks=marks, id=f"{name}-{shape_key}")


@pytest.mark.parametrize("name,shape_key", [_params(n, s) for n in list_models() for s in SHAPES])
def test_forward_backward_on_every_input_shape(name, shape_key):
    torch.manual_seed(0)
    info = dataset_info(shape_key)
    model = create_model(name, info.input_shape, info.num_classes, mean=info.mean, std=info.std)
    x = torch.rand(2, *info.input_shape)
    out = model(x)
    assert out.shape == (2, info.num_classes) and torch.isfinite(out).all()
    out.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", sorted(BIG))
def test_big_presets_forward_on_their_data_set(name):
    shape = SHAPES["mnist"] if name == "linf_dist_mlp_5x5120" else SHAPES["cifar10"]
    model = create_model(name, shape, 10).eval()
    with torch.no_grad():
        out = model(torch.rand(1, *shape))
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    widths = [m.out_features for m in model.modules() if isinstance(m, LpDistLinear)]
    assert widths[:-1] == [5120] * (len(widths) - 1) or model.family == "hybrid"


# A named variant's own data set; every other name uses the digits defaults.
VARIANT_DATA = {"linf_dist_mlp_5x5120": "mnist", "linf_dist_mlp_6x5120": "cifar10",
                "linf_dist_hybrid_5x5120": "cifar10", "linf_dist_mlp_5x128": "digits",
                "linf_dist_hybrid_4x128": "digits"}


@pytest.mark.parametrize("name", list_models())
def test_named_variants_carry_their_own_defaults(name):
    """``create_model(name)`` builds for the variant's data set (timm's pretrained-config
    style): no 64-input CIFAR net; explicit arguments still override."""
    expected = SHAPES[VARIANT_DATA.get(name, "digits")]
    assert model_defaults(name) == {"input_shape": expected, "num_classes": 10}
    if name not in VARIANT_DATA:
        assert model_defaults(name) == GENERIC_DEFAULTS
    with torch.device("meta" if name in BIG else "cpu"):  # meta: no 10^8 weights to initialise
        model = create_model(name)
    assert model.input_shape == expected and model.num_classes == 10
    assert model.model_config["input_shape"] == list(expected) and model.model_config["num_classes"] == 10
    first = next(m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, LpDistLinear)))
    assert first.weight.shape[1] == (expected[0] if isinstance(first, torch.nn.Conv2d) else math.prod(expected))
    if name not in BIG:
        small = create_model(name, (1, 28, 28), num_classes=3)
        assert small.input_shape == (1, 28, 28) and small(torch.rand(2, 1, 28, 28)).shape == (2, 3)
        assert create_model(**small.model_config).model_config == small.model_config


def test_registered_defaults_are_checked():
    with pytest.raises(ValueError, match="input_shape"):
        register_model(lambda input_shape, num_classes: None, family="relu", name="bad_defaults", input_shape=(2, 2))
    with pytest.raises(ValueError, match="num_classes"):
        register_model(lambda input_shape, num_classes: None, family="relu", name="bad_defaults", num_classes=0)
    with pytest.raises(UnknownModelError):
        model_defaults("linf_dist_mlp_6x512")


@pytest.mark.parametrize("name", [n for n in list_models() if n not in CNNS and n not in BIG])
def test_vector_inputs_from_the_three_point_set(name):
    data = three_point_set(r=1.0, dim=3)
    model = create_model(name, data.input_shape, data.num_classes)
    out = model(data.x.float())
    assert out.shape == (3, 2)
    out.sum().backward()


@pytest.mark.parametrize("name", sorted(CNNS))
def test_cnns_refuse_vector_inputs(name):
    with pytest.raises(ValueError, match="image inputs"):
        create_model(name, (5,), 2)


@pytest.mark.parametrize("name", [n for n in list_models() if n not in BIG])
def test_model_describes_itself_and_config_rebuilds_it(name):
    model = create_model(name, (1, 8, 8), 10, mean=(0.3,), std=0.4)
    assert model.model_name == name and model.family == model_family(name) in FAMILIES
    assert model.input_shape == (1, 8, 8) and model.num_classes == 10
    cfg = model.model_config
    assert json.loads(json.dumps(cfg)) == cfg
    again = create_model(**cfg)
    assert type(again) is type(model)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert set(model.certificates) <= set(METHODS)
    assert model.lipschitz_linf is None  # train mode: mean shift uses batch statistics
    assert {"ibp", "crown-ibp", "crown", "alpha-crown"} <= set(model.certificates)


def test_lipschitz_constant_and_certificates_follow_mode_and_p():
    std = dataset_info("cifar10").std
    net = create_model("linf_dist_mlp", (3, 32, 32), 10, depth=3, width=32, mean=(0.49, 0.48, 0.45), std=std)
    assert net.lipschitz_linf is None and "margin" not in net.certificates and "interval" in net.certificates
    net.eval()
    assert net.lipschitz_linf == pytest.approx(1 / std)
    assert net.certificates[:2] == ("margin", "interval")
    set_p(net, 8)
    assert net.lipschitz_linf is None and "margin" not in net.certificates and "interval" in net.certificates
    set_p(net, math.inf)
    net.layers[0].mean_shift.train()  # one sub-module left in batch mode
    assert net.lipschitz_linf is None
    for name in ("linf_dist_hybrid", "mlp_3layer", "cnn_4layer"):
        other = create_model(name, (1, 8, 8), 10).eval()
        assert other.lipschitz_linf is None
        assert "margin" not in other.certificates and "interval" not in other.certificates


def test_linf_dist_net_follows_the_paper():
    torch.manual_seed(0)
    net = create_model("linf_dist_mlp", (1, 8, 8), 10, depth=4, width=80, mean=(0.3,), std=0.4)
    assert isinstance(net, LinfDistNet) and net.depth == 4 and net.negate_output
    hidden, last = net.layers[:-1], net.layers[-1]
    assert all(isinstance(m.mean_shift, MeanShiftNorm) and m.bias is None for m in hidden)
    assert last.mean_shift is None and last.bias is not None
    assert [m.out_features for m in net.layers] == [80, 80, 80, 10]
    # identity init where in <= out (64 -> 80, 80 -> 80), not on the last layer (80 -> 10)
    rows = torch.arange(80)
    assert torch.all(net.layers[0].weight[rows, rows % 64] == -10.0)
    assert torch.all(net.layers[1].weight[rows, rows] == -10.0)
    assert not torch.any(last.weight == -10.0)
    # logits = -(last layer output) of the normalised, flattened input
    net.eval()
    x = torch.rand(3, 1, 8, 8)
    z = ((x - 0.3) / 0.4).flatten(1)
    for m in net.layers:
        z = m(z)
    torch.testing.assert_close(net(x), -z)


def test_hybrid_follows_the_2021_paper():
    model = create_model("linf_dist_hybrid_4x128", (1, 8, 8), 10)
    assert isinstance(model, LinfDistHybrid) and model.family == "hybrid"
    assert all(m.mean_shift is not None and m.bias is None for m in model.features)
    assert [m.out_features for m in model.features] == [128] * 4
    lin1, act, lin2 = model.head
    assert isinstance(lin1, torch.nn.Linear) and isinstance(act, torch.nn.Tanh) and isinstance(lin2, torch.nn.Linear)
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (128, 128, 10)
    relu_head = create_model("linf_dist_hybrid", (1, 8, 8), 10, activation="relu")
    assert isinstance(relu_head.head[1], torch.nn.ReLU)
    with pytest.raises(ValueError, match="activation"):
        create_model("linf_dist_hybrid", (1, 8, 8), 10, activation="gelu")


@pytest.mark.parametrize("name,shape,fc_in", [
    ("mlp_3layer", (1, 28, 28), 784), ("cnn_4layer", (1, 28, 28), 16 * 7 * 7), ("cnn_4layer", (3, 32, 32), 16 * 8 * 8),
    ("cnn_7layer", (3, 32, 32), 128 * 16 * 16), ("cnn_7layer_bn", (1, 28, 28), 128 * 14 * 14),
    ("cnn_4layer", (1, 8, 8), 16 * 2 * 2)])
def test_relu_baselines_match_auto_lirpa_sizes(name, shape, fc_in):
    """Flatten sizes are auto_LiRPA's formulas (in_dim // 4 or // 2) on square inputs."""
    model = create_model(name, shape, 10)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears[0].in_features == fc_in
    assert linears[-1].out_features == 10
    if name.startswith("cnn_7layer"):
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert [c.out_channels for c in convs] == [64, 64, 128, 128, 128]
        assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 1]
        assert (sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 5) == name.endswith("_bn")
        assert linears[0].out_features == 512


def test_normalisation_rules():
    with pytest.raises(ValueError, match="ONE scalar std"):
        create_model("linf_dist_mlp", (3, 32, 32), 10, std=(0.2, 0.3, 0.4))
    with pytest.raises(ValueError, match="ONE scalar std"):
        create_model("linf_dist_hybrid", (3, 32, 32), 10, std=(0.2, 0.3, 0.4))
    relu = create_model("cnn_4layer", (3, 32, 32), 10, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    assert isinstance(relu.normalize, InputNormalize) and relu.normalize.scalar_std is None
    default = create_model("linf_dist_mlp", (1, 8, 8), 10)
    assert default.normalize.is_identity


def test_registry_errors_and_listing():
    assert "linf_dist_mlp_5x5120" in list_models("linf_dist_mlp_*")
    assert set(list_models(family="relu")) == {"mlp_3layer", "cnn_4layer", "cnn_7layer", "cnn_7layer_bn"}
    assert {"theorem32_net", "theoremA2_net"} <= set(list_models(family="linf_dist"))
    assert list_models(["cnn_7*", "mlp_*"]) == ["cnn_7layer", "cnn_7layer_bn", "mlp_3layer"]
    with pytest.raises(UnknownModelError, match="Did you mean 'linf_dist_mlp'"):
        create_model("linf_dist_mpl")
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda input_shape, num_classes: None, family="relu", name="mlp_3layer")
    with pytest.raises(ValueError, match="family"):
        register_model(lambda **kw: None, family="convex", name="new_one")
    with pytest.raises(ValueError, match="family"):
        list_models(family="resnet")
    with pytest.raises(TypeError, match="does not accept"):
        create_model("mlp_3layer", (1, 8, 8), 10, depth=3)
    with pytest.raises(ValueError, match="input_shape"):
        create_model("mlp_3layer", (8, 8), 10)
    with pytest.raises(TypeError, match="JSON-able"):
        create_model("mlp_3layer", (1, 8, 8), 10, mean=torch.tensor(0.1))
    model = create_model("mlp_3layer", (1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(B, 1, 8, 8\)"):
        model(torch.rand(2, 1, 28, 28))


def test_create_model_takes_the_model_kwargs_themselves_as_timm():
    params = inspect.signature(create_model).parameters
    assert [p.kind for p in params.values()][-1] is inspect.Parameter.VAR_KEYWORD and "kwargs" in params
    assert not any(p.name == "kwargs" and p.kind is not inspect.Parameter.VAR_KEYWORD for p in params.values())
    model = create_model("linf_dist_mlp", (1, 8, 8), 10, depth=2, width=8)
    # the config is flat: create_model(**config) passes the model's own keyword arguments
    assert model.model_config == {"name": "linf_dist_mlp", "input_shape": [1, 8, 8], "num_classes": 10, "depth": 2,
                                  "width": 8}
    with pytest.warns(DeprecationWarning, match=r"create_model\(name, \*\*kwargs\)"):
        old = create_model("linf_dist_mlp", (1, 8, 8), 10, kwargs={"depth": 2, "width": 8})
    assert old.model_config == model.model_config


def test_model_entrypoint_is_the_entrypoint_and_model_info_the_record():
    fn = model_entrypoint("mlp_3layer")
    assert callable(fn) and fn.__name__ == "mlp_3layer"
    bare = fn(input_shape=(1, 8, 8), num_classes=4)
    assert isinstance(bare, torch.nn.Module) and bare(torch.rand(2, 1, 8, 8)).shape == (2, 4)
    info = model_info("mlp_3layer")
    assert info.family == "relu" == model_family("mlp_3layer") and info.fn is fn.__wrapped__
    with pytest.warns(DeprecationWarning, match="model_info"):
        assert fn.family == "relu"  # the previous release's ModelEntry field, for one release
    with pytest.raises(UnknownModelError, match="Did you mean"):
        model_entrypoint("mlp_3layr")


def test_names_are_defined_once():
    from linf_plugin import certification, names, training
    from linf_plugin.certification import bound_prop
    from linf_plugin.models import BOUND_PROPAGATION_METHODS, base

    assert certification.METHODS is names.METHODS and training.FAMILIES is FAMILIES is names.FAMILIES
    assert BOUND_PROPAGATION_METHODS is names.BOUND_PROPAGATION_METHODS
    assert set(bound_prop.LIRPA_METHODS) == set(BOUND_PROPAGATION_METHODS)
    assert names.Method.CROWN == "crown" and f"{names.Method.CROWN_IBP}" == "crown-ibp"
    assert json.dumps([names.Method.ALPHA_CROWN, names.Family.RELU]) == '["alpha-crown", "relu"]'
    with pytest.warns(DeprecationWarning, match="CERTIFICATES"):
        assert base.CERTIFICATES is names.METHODS
