from pathlib import Path

import pytest

from fedlens.shared.config import FedConfig, config_keys, load_config, parse_overrides
from fedlens.shared.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path):
    cfg = FedConfig()
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_unknown_key_is_rejected_with_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        FedConfig.from_mapping({"num-sites": 3, "learning-rate": 0.1})
    assert "learning-rate" in str(err.value)
    assert "num-rounds" in str(err.value)  # the message lists valid keys


def test_snake_case_keys_are_not_accepted():
    with pytest.raises(ConfigError):
        FedConfig.from_mapping({"num_sites": 3})


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("alpha", 0.0, "alpha"),
        ("alpha", -1.0, "alpha"),
        ("fraction-train", 0.0, "fraction-train"),
        ("fraction-train", 1.5, "fraction-train"),
        ("test-fraction", 1.0, "test-fraction"),
        ("num-sites", 0, "num-sites"),
        ("batch-size", 0, "batch-size"),
        ("policy", "last-0", "policy"),
        ("policy", "most", "policy"),
        ("augment", "flip,rotate", "rotate"),
        ("partition", "random", "partition"),
        ("strategy", "fedfoo", "strategy"),
        ("image-size", 8, "image-size"),
        ("dropout", 1.0, "dropout"),
        ("server-momentum", 1.0, "server-momentum"),
        ("server-lr", -0.1, "server-lr"),
        ("ema-decay", 1.0, "ema-decay"),
        ("ema-decay", -0.5, "ema-decay"),
        ("local-steps", -1, "local-steps"),
    ],
)
def test_out_of_range_values_are_rejected(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        FedConfig.from_mapping({key: value})


def test_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match="num-sites"):
        FedConfig.from_mapping({"num-sites": "ten"})
    with pytest.raises(ConfigError, match="pretrained"):
        FedConfig.from_mapping({"pretrained": 1})


def test_int_is_accepted_for_float_keys():
    assert FedConfig.from_mapping({"alpha": 1}).alpha == 1.0


def test_min_sites_cannot_exceed_num_sites():
    with pytest.raises(ConfigError, match="min-sites"):
        FedConfig.from_mapping({"num-sites": 2, "min-sites": 3})


def test_folder_dataset_needs_a_path():
    with pytest.raises(ConfigError, match="data-path"):
        FedConfig.from_mapping({"dataset": "folder"})


def test_overrides_use_toml_values_and_bare_strings():
    values = parse_overrides(["num-rounds=3", "alpha=0.1", "pretrained=false", "policy=last-2", 'data-path="/x y"'])
    assert values == {"num-rounds": 3, "alpha": 0.1, "pretrained": False, "policy": "last-2", "data-path": "/x y"}
    with pytest.raises(ConfigError):
        parse_overrides(["num-rounds"])


def test_config_file_layers_under_overrides(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text("num-rounds = 7\nalpha = 0.3\n")
    cfg = load_config(path, {"alpha": 2.0})
    assert (cfg.num_rounds, cfg.alpha) == (7, 2.0)


def test_nested_tables_and_bad_toml_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nbackbone = 'x'\n")
    with pytest.raises(ConfigError, match="flat"):
        load_config(bad)
    bad.write_text("num-rounds = \n")
    with pytest.raises(ConfigError, match="TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_every_experiment_overlay_is_valid():
    overlays = sorted((ROOT / "simulations" / "experiments").glob("*.toml"))
    assert overlays, "no experiment overlays found"
    for path in overlays:
        assert isinstance(load_config(path), FedConfig), path


def test_config_keys_are_kebab_case():
    assert all("_" not in k for k in config_keys())
