"""silo_agent/evaluation.py: reliability is the gain on all held-out tokens, not a mean over domains."""


def test_reliability_is_the_gain_on_all_held_out_tokens_not_a_mean_over_domains():
    from silo_agent.evaluation import reliability

    # the silo's main domain (100 held-out tokens) improves, its 8-token minor domain gets worse
    before = {"main": (300.0, 100), "minor": (24.0, 8)}
    after = {"main": (240.0, 100), "minor": (40.0, 8)}
    assert reliability(before, after) == __import__("pytest").approx((324 - 280) / 324)
    assert reliability(after, before) == 0.0  # worse: bounded at 0
    assert reliability({}, after) == 0.0
