from pathlib import Path

import pytest

from fedlens.shared.config import (
    NON_PRIVATE_SETTINGS,
    FedConfig,
    config_help,
    config_keys,
    load_config,
    parse_attack_sites,
    parse_overrides,
)
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
        ("ray-address", "auto", "HOST:PORT"),
        ("ray-address", "10.0.0.5", "HOST:PORT"),
        ("site-cpus", 0.0, "site-cpus"),
        ("site-gpus", 1.5, "site-gpus"),
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
        ("max-update-norm", -1.0, "max-update-norm"),
        ("max-site-examples", 0, "max-site-examples"),
        ("divergence-factor", 1.0, "divergence-factor"),
        ("attack", "flood", "attack"),
        ("attack", "nan", "needs `attack-sites`"),
        ("attack-sites", "1", "attack-sites"),
        ("attack-sites", "1=flood", "attack-sites"),
        ("attack-sites", "10=nan", "partition id"),
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


def test_a_ray_cluster_address_is_host_and_port():
    for address in ("127.0.0.1:6379", "head.cluster.local:6379", "[::1]:6379", ""):
        assert FedConfig.from_mapping({"ray-address": address}).ray_address == address


def test_dp_false_alone_takes_the_non_private_settings():
    cfg = load_config(None, parse_overrides(["dp=false"]))
    assert {k: cfg.to_dict()[k] for k in NON_PRIVATE_SETTINGS} == NON_PRIVATE_SETTINGS
    private = FedConfig()
    assert any(private.to_dict()[k] != v for k, v in NON_PRIVATE_SETTINGS.items())  # the defaults are the DP-tuned ones


def test_settings_the_user_gives_win_over_the_non_private_ones(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("dp = false\nlr = 0.01\n")
    cfg = load_config(path, {"batch-size": 32})
    assert (cfg.lr, cfg.batch_size, cfg.optimizer) == (0.01, 32, NON_PRIVATE_SETTINGS["optimizer"])
    # On a resolved config (base=), nothing is swapped behind the caller's back.
    assert FedConfig.from_mapping({"dp": False}, base=FedConfig()).lr == FedConfig().lr


def test_a_preset_is_a_starting_point_the_file_and_overrides_can_change(tmp_path):
    # `fedlens centralized` trains without DP-SGD and starts from dp = false.
    baseline = load_config(None, {}, preset={"dp": False})
    assert baseline.dp is False and baseline.optimizer == NON_PRIVATE_SETTINGS["optimizer"]
    path = tmp_path / "c.toml"
    path.write_text("dp = true\n")
    assert load_config(path, {}, preset={"dp": False}) == FedConfig()


def test_config_keys_say_which_settings_only_make_sense_with_dp():
    lines = {line.split()[0]: line for line in config_help().splitlines()}
    assert "DP only" in lines["target-epsilon"] and "DP only" in lines["max-grad-norm"]
    assert "with dp = false and not set: 0.001" in lines["lr"]
    assert "DP" not in lines["num-sites"]


def test_attack_sites_name_partition_ids_with_an_optional_kind_each():
    assert parse_attack_sites("0, 3", attack="sign-flip") == {0: "sign-flip", 3: "sign-flip"}
    assert parse_attack_sites("1=nan,2=huge-count,3", attack="scale") == {1: "nan", 2: "huge-count", 3: "scale"}
    assert parse_attack_sites("", attack="scale") == {}
    assert FedConfig.from_mapping(parse_overrides(["attack=nan", "attack-sites=3"])).attack_sites == "3"  # bare nan: a word, not a float
    with pytest.raises(ConfigError, match="twice"):
        parse_attack_sites("1,1=nan", attack="scale")
