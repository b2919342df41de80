import json

import pytest
import torch

import vqz
from vqz.config import PRESET_DESCRIPTIONS, QuantConfig, get_preset


def test_presets_named_by_the_design_exist_and_round_trip_through_json():
    names = vqz.presets()
    for required in ("w8a8", "fp8", "w4a8", "w4a4", "w4a4-svd", "nvfp4-svd", "w4a16"):
        assert required in names
    for name in names:
        cfg = get_preset(name)
        assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert name in PRESET_DESCRIPTIONS


def test_svd_presets_are_what_the_design_says():
    svd = get_preset("w4a4-svd")
    assert (svd.rank, svd.smooth, svd.weight.format, svd.weight.group_size) == (32, True, "int4", 64)
    assert svd.act.dynamic and svd.act.group_size == 64
    nv = get_preset("nvfp4-svd")
    assert nv.weight.format == "nvfp4" and nv.weight.group_size == 16 and nv.rank == 32


def test_rules_round_trip():
    cfg = QuantConfig(rules=[vqz.LayerRule("*proj*", types=("Linear",), rank=8,
                                           act=vqz.QuantSpec("int8", "token", dynamic=True))],
                      exclude=["head"])
    again = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.rules[0].act.dynamic


def test_config_errors():
    with pytest.raises(ValueError, match="newer"):
        QuantConfig(version=99)
    with pytest.raises(ValueError, match="token"):
        vqz.QuantSpec("int8", "token")  # token scales must be dynamic
    with pytest.raises(ValueError, match="block"):
        vqz.QuantSpec("nvfp4", "group", 32)
    with pytest.raises(ValueError, match="asymmetric"):
        vqz.QuantSpec("e4m3", "tensor", symmetric=False)
    with pytest.raises(ValueError, match="no field"):
        QuantConfig.from_dict({"wieght": None})
    with pytest.raises(ValueError, match="fixed block size"):
        get_preset("nvfp4-svd").with_overrides(group_size=64)


def test_rule_smoothing_reaches_only_the_layers_it_selects():
    from vqz.patch import plan_layers

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    cfg = QuantConfig(rules=[vqz.LayerRule("1", smooth=True)])
    assert [p.smooth for p in plan_layers(model, cfg).layers] == [False, True]
    cfg = QuantConfig(smooth=True, rules=[vqz.LayerRule("0", smooth=False)])
    assert [p.smooth for p in plan_layers(model, cfg).layers] == [False, True]
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
