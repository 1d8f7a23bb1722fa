"""at.report.statistics: paired differences and Student-t intervals, against hand-worked numbers
and closed forms (and scipy's t, where it is installed, as a second independent computation)."""

import math

import pytest

from at.report import statistics as st

# t_{0.975, 2}: for 2 degrees of freedom the t CDF is 1/2 + t / (2 sqrt(2 + t^2)), so
# t_p = (2p - 1) sqrt(2 / (1 - (2p - 1)^2)) = 0.95 * sqrt(2 / 0.0975) = 4.30265272974946...
T_975_2 = 4.302652729749464


def test_three_seeds_worked_by_hand():
    method = {0: 7.5, 1: 8.25, 2: 7.0, 5: 6.0}    # seed 5 has no baseline run: it drops out
    baseline = {0: 8.5, 1: 8.75, 2: 8.5, 3: 9.0}  # seed 3 has no method run: it drops out
    # differences, method - baseline: 7.5 - 8.5 = -1.0, 8.25 - 8.75 = -0.5, 7.0 - 8.5 = -1.5
    # mean: (-1.0 - 0.5 - 1.5) / 3 = -1.0
    # sample sd: deviations 0, +0.5, -0.5; sum of squares 0.5; / (3 - 1) = 0.25; sqrt = 0.5
    # half width: t_{0.975,2} * 0.5 / sqrt(3) = 4.302652729749464 * 0.28867513459481287
    #           = 1.24206886; interval [-2.24206886, 0.24206886]
    half = T_975_2 * 0.5 / math.sqrt(3)
    p = st.paired_difference(method, baseline, reference_method=7.93, reference_baseline=8.77)
    assert p.seeds == (0, 1, 2)
    assert p.differences == (-1.0, -0.5, -1.5)
    assert p.n == 3
    assert p.mean == pytest.approx(-1.0, abs=1e-12)
    assert st.sample_std(p.differences) == pytest.approx(0.5, abs=1e-12)
    assert half == pytest.approx(1.24206886, abs=1e-8)
    assert (p.ci_low, p.ci_high) == pytest.approx((-2.24206886, 0.24206886), abs=1e-8)
    assert p.ci_low == pytest.approx(-1.0 - half, abs=1e-9)
    assert p.ci_high == pytest.approx(-1.0 + half, abs=1e-9)
    assert p.reference == pytest.approx(7.93 - 8.77)
    assert p.sign_agrees is True


def test_one_pair_has_no_interval_and_no_pair_no_mean():
    one = st.paired_difference({0: 7.0, 1: 6.0}, {1: 8.0, 2: 9.0})
    assert (one.seeds, one.differences, one.mean) == ((1,), (-2.0,), -2.0)
    assert one.ci_low is None and one.ci_high is None
    assert st.confidence_interval([-2.0]) is None
    assert one.sign_agrees is None  # no reference
    none = st.paired_difference({0: 7.0}, {1: 8.0})
    assert none.n == 0 and none.mean is None and none.sign_agrees is None


def test_sign_agreement():
    against = st.paired_difference({0: 9.0, 1: 9.5}, {0: 8.0, 1: 8.0}, 7.93, 8.77)  # ours +, ref -
    assert against.sign_agrees is False
    half_ref = st.paired_difference({0: 9.0}, {0: 8.0}, reference_method=7.93)  # baseline ref missing
    assert half_ref.reference is None and half_ref.sign_agrees is None


def test_t_quantile_closed_forms():
    assert st.t_quantile(0.975, 2) == pytest.approx(T_975_2, rel=1e-12)
    # 1 degree of freedom is the Cauchy distribution: t_p = tan(pi (p - 1/2))
    assert st.t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-12)
    assert st.t_quantile(0.025, 1) == pytest.approx(-math.tan(math.pi * 0.475), rel=1e-12)
    # many degrees of freedom approach the normal quantile 1.959963984540054
    assert st.t_quantile(0.975, 1e7) == pytest.approx(1.959963984540054, rel=1e-6)
    assert st.t_quantile(0.5, 4) == pytest.approx(0.0, abs=1e-12)


def test_incomplete_beta_closed_forms():
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert st.regularized_incomplete_beta(1.0, 1.0, x) == pytest.approx(x, abs=1e-14)
        assert st.regularized_incomplete_beta(3.0, 1.0, x) == pytest.approx(x ** 3, abs=1e-14)
        assert st.regularized_incomplete_beta(1.0, 2.0, x) == pytest.approx(1 - (1 - x) ** 2, abs=1e-14)
    with pytest.raises(ValueError, match="0 <= x <= 1"):
        st.regularized_incomplete_beta(1.0, 1.0, 1.5)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 29, 100])
def test_t_quantile_against_scipy(df):
    stats = pytest.importorskip("scipy.stats")
    for p in (0.6, 0.9, 0.975, 0.995):
        assert st.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-10)
        assert st.t_cdf(-1.3, df) == pytest.approx(stats.t.cdf(-1.3, df), abs=1e-12)


def test_mean_and_sample_std():
    assert st.mean([]) is None and st.sample_std([3.0]) is None
    assert st.mean([1.0, 2.0, 4.0]) == pytest.approx(7 / 3)
    # deviations from 7/3: -4/3, -1/3, 5/3; squares sum to 42/9; / 2 = 7/3
    assert st.sample_std([1.0, 2.0, 4.0]) == pytest.approx(math.sqrt(7 / 3))
