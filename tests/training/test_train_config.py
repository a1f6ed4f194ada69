"""Config, presets and CLI parsing: names, choices, overrides, round trips."""
from __future__ import annotations

import math

import pytest

from linf_plugin.training import ConfigError, PresetError, TrainConfig, get_preset, list_presets, sanitize_name
from linf_plugin.training.__main__ import build_parser, config_from_args, main


def test_every_preset_validates_and_names_its_family():
    names = list_presets()
    for required in ("mnist-0.1", "mnist-0.3", "cifar10-2/255", "cifar10-8/255", "cifar10-16/255", "digits-linf",
                     "digits-hybrid", "digits-ibp", "digits-crown-ibp", "mnist-0.3-crown-ibp", "cifar10-8/255-ibp"):
        assert required in names
    for name in names:
        cfg = get_preset(name).validate()
        assert cfg.name == name and cfg.family in ("linf_dist", "hybrid", "relu")
    assert set(list_presets("hybrid")) >= {"digits-hybrid", "mnist-0.3-hybrid"}
    assert all(get_preset(n).validate().family == "relu" for n in list_presets("relu"))


def test_unknown_preset_model_dataset_list_the_choices():
    with pytest.raises(PresetError, match="digits-linf"):
        get_preset("digits-linff")
    with pytest.raises(ConfigError, match="linf_dist_mlp_5x128"):
        TrainConfig(model="resnet9000").validate()
    with pytest.raises(ConfigError, match="cifar10"):
        TrainConfig(dataset="imagenet").validate()
    with pytest.raises(ConfigError, match="fields are"):
        get_preset("digits-linf", learning_rate=0.1)
    with pytest.raises(ConfigError, match="ibp"):
        get_preset("digits-ibp", bound="crown").validate()
    with pytest.raises(ConfigError, match="theta"):
        get_preset("digits-linf", theta=None).validate()


def test_sanitize_name_keeps_slashes_out_of_paths():
    assert sanitize_name("cifar10-8/255") == "cifar10-8_255"
    assert sanitize_name("../../etc/passwd") == "etc_passwd"
    assert "/" not in sanitize_name("a/b\\c d")
    assert get_preset("cifar10-16/255").run_name == "cifar10-16_255"


def test_config_dict_round_trip_and_differences():
    cfg = get_preset("cifar10-8/255")
    d = cfg.to_dict()
    assert d["adam_betas"] == [0.9, 0.99]
    back = TrainConfig.from_dict(d)
    assert back == cfg
    inf_cfg = cfg.replace(p_end=math.inf)
    assert TrainConfig.from_dict(inf_cfg.to_dict()).p_end == math.inf
    diff = cfg.differences(cfg.replace(lr=0.1, device="cpu", progress=False))
    assert diff == {"lr": (0.03, 0.1)}


def test_cli_overrides_field_by_field():
    args = build_parser().parse_args(["--preset", "cifar10-8/255", "--epochs", "7", "--lr-milestones", "3,5",
                                      "--model-kwargs", '{"width": 64}', "--resume", "--grad-clip", "none",
                                      "--p-end", "inf", "--hflip", "false"])
    cfg = config_from_args(args)
    assert cfg.name == "cifar10-8/255" and cfg.epochs == 7 and cfg.lr_milestones == (3, 5)
    assert cfg.model_kwargs == {"width": 64} and cfg.resume is True and cfg.grad_clip is None
    assert math.isinf(cfg.p_end) and cfg.hflip is False
    assert cfg.out_dir == "runs/cifar10-8_255"
    assert cfg.theta == pytest.approx(48 / 255)  # untouched fields keep the preset's values


def test_cli_errors_list_choices(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--preset", "nope", "--out", "/tmp/never-written"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "digits-linf" in err
    with pytest.raises(SystemExit):
        main(["--model", "nope", "--out", "/tmp/never-written"])
    assert "linf_dist_mlp_5x128" in capsys.readouterr().err
    assert main(["--list-presets"]) == 0
    assert "cifar10-8/255" in capsys.readouterr().out
