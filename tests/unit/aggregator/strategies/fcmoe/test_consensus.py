"""FC-MoE's consensus maths by hand: importance, normalisation, sign-and-cosine agreement, groups,
coefficients, the reliability weight."""

import numpy as np
import pytest

from aggregator.strategies.fcmoe import consensus


def test_importance_and_normalisation_by_hand():
    s = consensus.importance(np.array([100, 300]), np.array([0.5, 1.0]), np.array([[0.8, 0.2], [0.1, 0.9]]))
    np.testing.assert_allclose(s, [[40.0, 10.0], [30.0, 270.0]])
    w = consensus.normalise(s)
    np.testing.assert_allclose(w, [[40 / 70, 10 / 280], [30 / 70, 270 / 280]])
    off = consensus.importance(np.array([100, 300]), np.array([0.5, 1.0]), np.zeros((2, 2)), use_routing=False,
                               use_reliability=False)
    np.testing.assert_allclose(consensus.normalise(off), [[0.25, 0.25], [0.75, 0.75]])
    np.testing.assert_allclose(consensus.normalise(np.zeros((2, 1))), [[0.5], [0.5]])


def test_agreement_flags_the_opposing_silo():
    rng = np.random.default_rng(1)
    common = rng.standard_normal(256)
    y = np.stack([common + 0.1 * rng.standard_normal(256) for _ in range(4)] + [-common])
    cos, sign = consensus.agreement(y, np.full(5, 0.2))
    score = consensus.agreement_score(cos, sign)
    assert np.all(cos[:4] > 0.9) and cos[4] < -0.9 and np.all(sign[:4] > 0.9) and sign[4] < 0.1
    groups = consensus.partition(score, min_group_size=1)
    assert groups.tolist() == [0, 0, 0, 0, 1]
    assert consensus.partition(score, min_group_size=2).tolist() == [0] * 5  # a group of 1 is merged
    alpha = consensus.coefficients(np.full(5, 0.2), consensus.phi(score, 0.1))
    assert alpha.sum() == pytest.approx(1.0) and alpha[4] < alpha[0] / 5


def test_reliability_weight_screens_out_unhelpful_rounds_without_ranking_healthy_ones():
    rel = np.array([-0.2, 0.0, 0.004, 0.01, 0.15, 0.6])
    np.testing.assert_allclose(consensus.reliability_weight(rel, 0.05, 0.01), [0.05, 0.05, 0.4, 1.0, 1.0, 1.0])
    # saturation 1 is the unsaturated relative gain, floored
    np.testing.assert_allclose(consensus.reliability_weight(rel, 0.05, 1.0), [0.05, 0.05, 0.05, 0.05, 0.15, 0.6])
