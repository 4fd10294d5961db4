"""FedAvg / FedAvgM / FedAdam against hand computations, and the accumulator's refusals."""

import numpy as np
import pytest

from aggregator.accumulate import PlaintextAccumulator
from aggregator.strategies import FedAdam, FedAvg, FedAvgM, FedProx, build_strategy
from fcmoe.config import LocalTrainingConfig, StrategyConfig
from fcmoe.errors import ProtocolError


def _sum(updates):
    """updates: list of (weight, delta-vector) for one unit 'u' -> GroupSum of w*delta."""
    acc = PlaintextAccumulator({"u": 2})
    for i, (w, d) in enumerate(updates):
        acc.add(f"s{i}", w, {"u": w * np.asarray(d, np.float32)})
    return acc.result()


def test_fedavg_is_sample_weighted_mean():
    x = {"u": np.array([1.0, -1.0], np.float32)}
    total = _sum([(1, [1.0, 0.0]), (3, [0.0, 2.0])])
    # hand: (1*[1,0] + 3*[0,2]) / 4 = [0.25, 1.5]; x + 1.0 * mean
    out = FedAvg(server_lr=1.0).aggregate(1, x, total)
    np.testing.assert_allclose(out["u"], [1.25, 0.5], rtol=1e-6)
    out = FedAvg(server_lr=0.5).aggregate(1, x, total)
    np.testing.assert_allclose(out["u"], [1.125, -0.25], rtol=1e-6)


def test_fedavgm_momentum_by_hand():
    s = FedAvgM(server_lr=1.0, momentum=0.5)
    x = {"u": np.zeros(2, np.float32)}
    x = s.aggregate(1, x, _sum([(1, [1.0, 2.0])]))  # v = [1,2]; x = [1,2]
    np.testing.assert_allclose(x["u"], [1.0, 2.0])
    x = s.aggregate(2, x, _sum([(2, [1.0, 0.0])]))  # v = 0.5*[1,2] + [1,0] = [1.5,1]; x = [2.5,3]
    np.testing.assert_allclose(x["u"], [2.5, 3.0])


def test_fedadam_by_hand():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    s = FedAdam(lr, b1, b2, tau)
    x = {"u": np.array([0.0, 1.0], np.float32)}
    d1 = np.array([0.2, -0.4])
    x1 = s.aggregate(1, x, _sum([(1, d1)]))
    m1 = (1 - b1) * d1
    v1 = b2 * tau**2 + (1 - b2) * d1**2
    e1 = np.array([0.0, 1.0]) + lr * m1 / (np.sqrt(v1) + tau)
    np.testing.assert_allclose(x1["u"], e1, rtol=1e-5)
    d2 = np.array([-0.1, 0.3])
    x2 = s.aggregate(2, x1, _sum([(2, d2)]))
    m2 = b1 * m1 + (1 - b1) * d2
    v2 = b2 * v1 + (1 - b2) * d2**2
    np.testing.assert_allclose(x2["u"], e1 + lr * m2 / (np.sqrt(v2) + tau), rtol=1e-5)
    # state survives a checkpoint round trip
    clone = FedAdam(lr, b1, b2, tau)
    clone.load_state_arrays(s.state_arrays())
    d3 = _sum([(1, [0.5, 0.5])])
    np.testing.assert_allclose(clone.aggregate(3, x2, d3)["u"], s.aggregate(3, x2, d3)["u"])


def test_fedprox_asks_for_proximal_term_and_builder_maps_names():
    plan = FedProx(prox_mu=0.1).configure_round(2, LocalTrainingConfig(), seed=0)
    assert plan.prox_mu == 0.1 and plan.round == 2
    assert FedAvg().configure_round(2, LocalTrainingConfig(), seed=0).prox_mu == 0.0
    for name, cls in [("fedavg", FedAvg), ("fedprox", FedProx), ("fedavgm", FedAvgM), ("fedadam", FedAdam)]:
        assert type(build_strategy(StrategyConfig(name=name))) is cls


def test_accumulator_refuses_bad_payloads():
    acc = PlaintextAccumulator({"u": 2})
    acc.add("a", 1.0, {"u": np.ones(2, np.float32)})
    with pytest.raises(ProtocolError, match="already"):
        acc.add("a", 1.0, {"u": np.ones(2, np.float32)})
    with pytest.raises(ProtocolError, match="NaN"):
        acc.add("b", 1.0, {"u": np.array([np.nan, 0], np.float32)})
    with pytest.raises(ProtocolError, match="weight"):
        acc.add("c", -1.0, {"u": np.ones(2, np.float32)})
    with pytest.raises(ProtocolError, match="units"):
        acc.add("d", 1.0, {"v": np.ones(2, np.float32)})
    result = acc.result()
    assert result.count == 1 and result.weight == 1.0  # refused payloads left no trace
