import pytest

from fedlens.server.strategies import STRATEGIES, build_strategy
from fedlens.shared.config import STRATEGIES as CONFIG_STRATEGIES
from fedlens.shared.config import FedConfig


def test_every_configurable_strategy_builds():
    assert set(STRATEGIES) == set(CONFIG_STRATEGIES)
    for name in CONFIG_STRATEGIES:
        strategy = build_strategy(FedConfig.from_mapping({"strategy": name, "num-sites": 4, "min-sites": 3}))
        assert strategy.min_train_nodes == 3 and strategy.fraction_train == 1.0


def test_site_evaluation_is_skipped_when_sites_keep_no_images():
    strategy = build_strategy(FedConfig.from_mapping({"site-eval-fraction": 0.0}))
    assert strategy.fraction_evaluate == 0.0 and strategy.min_evaluate_nodes == 0


@pytest.mark.parametrize("name, attr, value", [("fedprox", "proximal_mu", 0.3), ("fedtrimmedavg", "beta", 0.3)])
def test_strategy_parameters_come_from_the_config(name, attr, value):
    key = {"proximal_mu": "proximal-mu", "beta": "trim-beta"}[attr]
    assert getattr(build_strategy(FedConfig.from_mapping({"strategy": name, key: value})), attr) == value


def test_server_learning_rate_defaults_per_strategy():
    avgm = build_strategy(FedConfig.from_mapping({"strategy": "fedavgm", "server-momentum": 0.7}))
    assert avgm.server_learning_rate == 1.0 and avgm.server_momentum == 0.7
    assert build_strategy(FedConfig.from_mapping({"strategy": "fedadam"})).eta == 0.01
    assert build_strategy(FedConfig.from_mapping({"strategy": "fedadam", "server-lr": 0.1})).eta == 0.1
