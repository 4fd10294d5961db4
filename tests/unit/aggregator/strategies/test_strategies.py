"""Strategies against hand computations; accumulation into group sums and its refusals."""

import numpy as np
import pytest

from aggregator.accumulate import Coefficients, PlaintextAccumulator
from aggregator.strategies import (STRATEGIES, FedAdam, FedAvg, FedAvgM, FedProx, LocalOnly, SiloReport,
                                   build_strategy)
from fcmoe.config import (STRATEGY_CONFIGS, FcMoeStrategyConfig, FedAvgConfig, LocalTrainingConfig,
                          parse_config)
from fcmoe.errors import ConfigError, ProtocolError


def _sums(strategy, updates):
    """updates: list of (num_examples, delta) for unit 'u': FedAvg-style plan, then accumulate alpha*delta."""
    reports = {f"s{i}": SiloReport(n, 1.0, {"u": 1.0}) for i, (n, _) in enumerate(updates)}
    plan = strategy.coefficients(1, ["u"], reports)
    acc = PlaintextAccumulator({"u": 2}, plan)
    for i, (_, d) in enumerate(updates):
        acc.add(f"s{i}", {"u": plan.alpha[f"s{i}"]["u"] * np.asarray(d, np.float32)})
    return acc.result()


def test_fedavg_is_sample_weighted_mean():
    x = {"u": np.array([1.0, -1.0], np.float32)}
    s = FedAvg(server_lr=1.0)
    # hand: (1*[1,0] + 3*[0,2]) / 4 = [0.25, 1.5]; x + 1.0 * mean
    np.testing.assert_allclose(s.aggregate(1, x, _sums(s, [(1, [1.0, 0.0]), (3, [0.0, 2.0])]))["u"],
                               [1.25, 0.5], rtol=1e-6)
    s = FedAvg(server_lr=0.5)
    np.testing.assert_allclose(s.aggregate(1, x, _sums(s, [(1, [1.0, 0.0]), (3, [0.0, 2.0])]))["u"],
                               [1.125, -0.25], rtol=1e-6)


def test_dropout_after_planning_renormalises_over_contributors():
    s = FedAvg()
    reports = {"a": SiloReport(1, 1.0, {"u": 1.0}), "b": SiloReport(3, 1.0, {"u": 1.0})}
    plan = s.coefficients(1, ["u"], reports)
    acc = PlaintextAccumulator({"u": 1}, plan)
    acc.add("a", {"u": np.array([2.0], np.float32)})  # b never uploads
    out = s.aggregate(1, {"u": np.zeros(1, np.float32)}, acc.result())
    np.testing.assert_allclose(out["u"], [2.0])  # a's delta alone, not diluted by b's missing weight


def test_fedavgm_momentum_by_hand():
    s = FedAvgM(server_lr=1.0, momentum=0.5)
    x = {"u": np.zeros(2, np.float32)}
    x = s.aggregate(1, x, _sums(s, [(1, [1.0, 2.0])]))  # v = [1,2]; x = [1,2]
    np.testing.assert_allclose(x["u"], [1.0, 2.0])
    x = s.aggregate(2, x, _sums(s, [(2, [1.0, 0.0])]))  # v = 0.5*[1,2] + [1,0] = [1.5,1]; x = [2.5,3]
    np.testing.assert_allclose(x["u"], [2.5, 3.0])


def test_fedadam_by_hand():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    s = FedAdam(lr, b1, b2, tau)
    x = {"u": np.array([0.0, 1.0], np.float32)}
    d1 = np.array([0.2, -0.4])
    x1 = s.aggregate(1, x, _sums(s, [(1, d1)]))
    m1 = (1 - b1) * d1
    v1 = b2 * tau**2 + (1 - b2) * d1**2
    e1 = np.array([0.0, 1.0]) + lr * m1 / (np.sqrt(v1) + tau)
    np.testing.assert_allclose(x1["u"], e1, rtol=1e-5)
    d2 = np.array([-0.1, 0.3])
    x2 = s.aggregate(2, x1, _sums(s, [(2, d2)]))
    m2 = b1 * m1 + (1 - b1) * d2
    v2 = b2 * v1 + (1 - b2) * d2**2
    np.testing.assert_allclose(x2["u"], e1 + lr * m2 / (np.sqrt(v2) + tau), rtol=1e-5)
    clone = FedAdam(lr, b1, b2, tau)  # state survives a checkpoint round trip
    clone.load_state_arrays(s.state_arrays())
    d3 = _sums(s, [(1, [0.5, 0.5])])
    np.testing.assert_allclose(clone.aggregate(3, x2, d3)["u"], s.aggregate(3, x2, d3)["u"])


def test_round_plans():
    assert FedProx(prox_mu=0.1).configure_round(2, LocalTrainingConfig(), seed=0).prox_mu == 0.1
    plain = FedAvg().configure_round(2, LocalTrainingConfig(), seed=0)
    assert plain.prox_mu == 0.0 and plain.retention_lambda == 0.0 and plain.sketch_buckets == 0
    local = LocalOnly().configure_round(1, LocalTrainingConfig(), seed=0)
    assert local.retention_lambda == 1.0 and not local.retention_by_importance
    x = {"u": np.ones(2, np.float32)}
    assert LocalOnly().aggregate(1, x, _sums(FedAvg(), [(1, [5.0, 5.0])]))["u"].tolist() == [1.0, 1.0]


def test_every_strategy_the_config_names_is_registered_and_gets_its_own_settings():
    assert set(STRATEGIES) == set(STRATEGY_CONFIGS)  # no name in the schema without a strategy, nor the reverse
    for name, settings in STRATEGY_CONFIGS.items():
        assert type(build_strategy(settings())) is STRATEGIES[name]
    config = parse_config({"federation": {"strategy": {"name": "fedadam", "server_lr": 0.05, "beta1": 0.5}}})
    adam = build_strategy(config.federation.strategy)
    assert isinstance(adam, FedAdam) and (adam.server_lr, adam.beta1, adam.beta2) == (0.05, 0.5, 0.99)
    prox = build_strategy(parse_config({"federation": {"strategy": {"name": "fedprox", "prox_mu": 0.3}}}).federation.strategy)
    assert prox.configure_round(1, LocalTrainingConfig(), seed=0).prox_mu == 0.3
    fcmoe = build_strategy(FcMoeStrategyConfig(fcmoe={"importance": False}), min_group_size=4)
    assert not fcmoe.settings.importance and fcmoe.min_group_size == 4
    with pytest.raises(ConfigError, match=r"federation.strategy.name = 'fedsgd': no such strategy \(known: fedavg, "):
        build_strategy(FedAvgConfig().model_copy(update={"name": "fedsgd"}))
    with pytest.raises(ConfigError, match=r"federation.strategy.prox_mu: unknown key \(allowed: server_lr, name\)"):
        parse_config({"federation": {"strategy": {"name": "fedavg", "prox_mu": 0.1}}})


def test_accumulator_refuses_bad_payloads_and_keeps_only_group_sums():
    plan = Coefficients({"a": {"u": 1.0}, "b": {"u": 1.0}}, {"a": {"u": 0}, "b": {"u": 1}})
    acc = PlaintextAccumulator({"u": 2}, plan)
    acc.add("a", {"u": np.ones(2, np.float32)})
    with pytest.raises(ProtocolError, match="already"):
        acc.add("a", {"u": np.ones(2, np.float32)})
    with pytest.raises(ProtocolError, match="NaN"):
        acc.add("b", {"u": np.array([np.nan, 0], np.float32)})
    with pytest.raises(ProtocolError, match="no coefficients"):
        acc.add("outsider", {"u": np.ones(2, np.float32)})
    with pytest.raises(ProtocolError, match="units"):
        acc.add("b", {"v": np.ones(2, np.float32)})
    result = acc.result()
    assert set(result["u"]) == {0} and result["u"][0].count == 1  # refused payloads left no trace


def _arrays(value, seen=None):
    """Every array reachable from ``value``'s attributes and containers."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _arrays(item, seen)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from _arrays(item, seen)
    elif hasattr(value, "__dict__"):
        yield from _arrays(vars(value), seen)


def test_accumulator_keeps_group_sums_never_one_silos_payload():
    payloads = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([10.0, 0.0], np.float32),
                "c": np.array([0.0, 30.0], np.float32)}
    plan = Coefficients({s: {"u": 1.0} for s in payloads}, {s: {"u": 0} for s in payloads})
    acc = PlaintextAccumulator({"u": 2}, plan)
    for silo, payload in payloads.items():
        acc.add(silo, {"u": payload.copy()})
    held = list(_arrays(acc))
    assert held and not any(np.array_equal(h, p) for h in held for p in payloads.values())
    np.testing.assert_allclose(acc.result()["u"][0].vector, [11.0, 32.0])


def test_accumulator_bounds_payload_norm_by_alpha_times_clip():
    plan = Coefficients({"a": {"u": 0.5}}, {"a": {"u": 0}})
    acc = PlaintextAccumulator({"u": 2}, plan, clip_norm=1.0)
    with pytest.raises(ProtocolError, match="alpha \\* clip_norm"):
        acc.add("a", {"u": np.array([3e38, 0.0], np.float32)})  # finite, but no clipped delta is that large
    acc.add("a", {"u": np.array([0.3, 0.4], np.float32)})  # norm 0.5 = alpha * C
    assert acc.result()["u"][0].count == 1


def test_small_groups_are_merged_and_weightless_units_stay_unchanged():
    from aggregator.accumulate import GroupSum, merge_small_groups

    sums = {"u": {0: GroupSum(np.ones(2, np.float32), 2.0, 3), 1: GroupSum(np.ones(2, np.float32), 1.0, 1)},
            "v": {0: GroupSum(np.ones(2, np.float32), 1.0, 3), 1: GroupSum(np.ones(2, np.float32), 1.0, 3)}}
    merged = merge_small_groups(sums, min_group_size=3)
    assert list(merged["u"]) == [0] and merged["u"][0].count == 4 and merged["u"][0].weight == 3.0
    assert merged["u"][0].vector.tolist() == [2.0, 2.0] and list(merged["v"]) == [0, 1]
    x = {"w": np.ones(2, np.float32)}
    out = FedAvg().aggregate(1, x, {"w": {0: GroupSum(np.zeros(2, np.float32), 0.0, 2)}})
    assert out["w"].tolist() == [1.0, 1.0]  # nobody weighted it: unchanged, no crash
