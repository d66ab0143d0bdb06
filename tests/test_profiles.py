"""Tests for posthoc_cli.ema.profiles, .solve and .classical: the post-hoc EMA math (Karras et al. 2023, Sec. 3, App. C)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posthoc_cli.ema.classical import (
    beta_half_life,
    beta_std_steps,
    beta_to_sigma_rel,
    sigma_rel_to_beta,
)
from posthoc_cli.ema.profiles import (
    SIGMA_REL_MAX,
    check_sigma_rel,
    gamma_to_sigma_rel,
    profile_dot,
    profile_norm_sq,
    sigma_rel_to_gamma,
    update_beta,
)
from posthoc_cli.ema.solve import (
    Fit,
    fit,
    gram,
    profile_error,
    solve_gram,
    solve_weights,
)
from posthoc_cli.errors import InvalidValueError

# The paper's schedule: 40 snapshots each of sigma_rel 0.05 and 0.10, every 1000 steps.
T40 = np.arange(1000.0, 40001.0, 1000.0)
T_IN = np.concatenate([T40, T40])
S_IN = np.array([0.05] * 40 + [0.10] * 40)

sigma_rels = st.floats(1e-4, 0.2886)


@functools.cache
def _gauss(a: float, b: float, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes and weights on [a, b]."""
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1) * (b - a) / 2 + a, w * (b - a) / 2


# --- sigma_rel <-> gamma ------------------------------------------------------


@pytest.mark.parametrize(("sigma_rel", "gamma"), [(0.05, 16.97), (0.10, 6.94), (0.15, 3.56)])
def test_sigma_rel_to_gamma_check_values(sigma_rel: float, gamma: float) -> None:
    assert round(sigma_rel_to_gamma(sigma_rel), 2) == gamma


@settings(deadline=None)
@given(sigma_rels)
def test_sigma_rel_gamma_round_trip(sigma_rel: float) -> None:
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # gamma is a root of Eq. 126 to rounding of its terms
    c = sigma_rel**-2
    terms = [gamma**3, 7 * gamma**2, abs(16 - c) * gamma, abs(12 - c)]
    assert abs(gamma**3 + 7 * gamma**2 + (16 - c) * gamma + (12 - c)) <= 1e-13 * sum(terms)


@settings(deadline=None)
@given(st.floats(0.01, 1000.0))
def test_gamma_round_trip(gamma: float) -> None:
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.2887, 0.3, SIGMA_REL_MAX, math.nan, math.inf, -math.inf])
def test_out_of_range_sigma_rel_raises(bad: float) -> None:
    with pytest.raises(InvalidValueError, match="sigma_rel .* is out of range — choose a value in"):
        sigma_rel_to_gamma(bad)
    with pytest.raises(InvalidValueError):
        check_sigma_rel(bad)


def test_check_sigma_rel_returns_float() -> None:
    assert check_sigma_rel(np.float32(0.25)) == pytest.approx(0.25)
    assert type(check_sigma_rel(0.1)) is float


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_gamma_to_sigma_rel_rejects_bad_gamma(bad: float) -> None:
    with pytest.raises(InvalidValueError):
        gamma_to_sigma_rel(bad)


# --- update rule (Eq. 127) ----------------------------------------------------


def test_update_beta_first_update_copies() -> None:
    assert update_beta(1, 0, 6.94) == 0.0
    assert update_beta(1000, 0, 16.97) == 0.0
    assert update_beta(2, 1, 1.0) == 0.25


@pytest.mark.parametrize(("t", "t_prev"), [(5, 5), (5, 6), (5, -1), (0, 0)])
def test_update_beta_rejects_bad_times(t: int, t_prev: int) -> None:
    with pytest.raises(InvalidValueError):
        update_beta(t, t_prev, 1.0)


@settings(deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.sampled_from([0.05, 0.10, 0.2]))
def test_update_rule_weights_match_closed_form(deltas: list[int], sigma_rel: float) -> None:
    gamma = sigma_rel_to_gamma(sigma_rel)
    times = np.cumsum(deltas).tolist()
    weights = np.zeros(len(times))  # weight of the value seen at each update, in the current EMA
    t_prev = 0
    for k, t in enumerate(times):
        beta = update_beta(t, t_prev, gamma)
        weights *= beta
        weights[k] += 1.0 - beta
        t_prev = t
    prev = np.array([0] + times[:-1], dtype=np.float64)
    now = np.array(times, dtype=np.float64)
    expected = (now ** (gamma + 1) - prev ** (gamma + 1)) / now[-1] ** (gamma + 1)
    np.testing.assert_allclose(weights, expected, rtol=1e-10, atol=1e-300)
    assert weights.sum() == pytest.approx(1.0, rel=1e-12)


# --- profile inner products (Eq. 151) -----------------------------------------


def _integrate_dot(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    """∫ p_a p_b by Gauss–Legendre on [0, min(t_a, t_b)], with p(τ) = (g+1) τ^g / t^(g+1)."""
    tau, w = _gauss(0.0, min(t_a, t_b))
    p_a = (g_a + 1) * tau**g_a / t_a ** (g_a + 1)
    p_b = (g_b + 1) * tau**g_b / t_b ** (g_b + 1)
    return float(np.sum(w * p_a * p_b))


@pytest.mark.parametrize(
    ("t_a", "g_a", "t_b", "g_b"),
    [(100.0, 6.94, 100.0, 6.94), (50.0, 16.97, 100.0, 6.94), (100.0, 3.56, 37.0, 0.5), (1.0, 0.1, 2.0, 40.0)],
)
def test_profile_dot_matches_numerical_integration(t_a: float, g_a: float, t_b: float, g_b: float) -> None:
    expected = _integrate_dot(t_a, g_a, t_b, g_b)
    assert float(profile_dot(t_a, g_a, t_b, g_b)) == pytest.approx(expected, rel=1e-9)


@settings(deadline=None)
@given(st.floats(1.0, 1e12), st.floats(0.01, 1000.0), st.floats(1.0, 1e12), st.floats(0.01, 1000.0))
def test_profile_dot_is_symmetric(t_a: float, g_a: float, t_b: float, g_b: float) -> None:
    ab, ba = profile_dot(t_a, g_a, t_b, g_b), profile_dot(t_b, g_b, t_a, g_a)
    assert np.isfinite(ab) and ab >= 0
    assert float(ab) == pytest.approx(float(ba), rel=1e-12, abs=1e-300)


def test_profile_dot_broadcasts_and_never_overflows() -> None:
    t = np.array([1.0, 1e6, 1e12])
    g = np.array([0.01, 500.0, 1000.0])
    a = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])  # => [3, 3]
    assert a.shape == (3, 3)
    assert np.all(np.isfinite(a)) and np.all(a >= 0)
    np.testing.assert_array_equal(a, a.T)
    assert np.isfinite(profile_dot(1e12, 500.0, 1e12 - 1, 500.0))
    assert float(profile_dot(1e12, 500.0, 1e12, 500.0)) == pytest.approx(501**2 / (1001 * 1e12))


def test_profile_norm_sq() -> None:
    assert float(profile_norm_sq(1000.0, 6.94)) == pytest.approx(7.94**2 / (14.88 * 1000.0))
    assert profile_norm_sq(1e12, 500.0) == profile_dot(1e12, 500.0, 1e12, 500.0)


# --- solving for weights (Alg. 3) ---------------------------------------------


def test_target_equal_to_input_is_exactly_one_hot() -> None:
    w = solve_weights(T_IN, S_IN, [40000, 20000, 40000], [0.10, 0.05, 0.05])
    assert w.shape == (80, 3)
    for col, idx in enumerate([79, 19, 39]):
        expected = np.zeros(80)
        expected[idx] = 1.0
        np.testing.assert_array_equal(w[:, col], expected)


def test_exact_duplicate_input_picks_the_first() -> None:
    w = solve_weights([100, 200, 200, 100], [0.1, 0.1, 0.1, 0.05], 200, 0.1)
    assert w[:, 0].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_scalar_and_broadcast_targets() -> None:
    assert solve_weights(T_IN, S_IN, 40000, 0.15).shape == (80, 1)
    w = solve_weights(T_IN, S_IN, 40000, [0.07, 0.15, 0.2])
    assert w.shape == (80, 3)
    alone = solve_weights(T_IN, S_IN, [40000], [0.15])
    np.testing.assert_allclose(w[:, 1], alone[:, 0], rtol=1e-12, atol=1e-15)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(1, 10**6), min_size=1, max_size=25, unique=True),
    st.lists(st.sampled_from([0.03, 0.05, 0.10, 0.2]), min_size=1, max_size=2, unique=True),
    st.lists(st.floats(0.01, 0.28), min_size=1, max_size=3),
    st.floats(0.0, 1.0),
)
def test_weights_sum_to_one(times: list[int], rels: list[float], targets: list[float], where: float) -> None:
    t_in = np.repeat(np.array(times, dtype=np.float64), len(rels))
    s_in = np.tile(rels, len(times))
    t_r = float(np.quantile(t_in, where, method="higher"))
    w = solve_weights(t_in, s_in, t_r, targets)
    assert w.shape == (t_in.size, len(targets))
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=0, atol=1e-9)
    assert np.all(w[t_in > t_r] == 0.0)


def test_later_inputs_get_zero_weight() -> None:
    w = solve_weights(T_IN, S_IN, [20000, 40000], [0.15, 0.15])
    later = T_IN > 20000
    assert np.all(w[later, 0] == 0.0)
    assert np.any(w[later, 1] != 0.0)
    assert w[:, 0].sum() == pytest.approx(1.0)


def test_target_before_every_snapshot_raises() -> None:
    with pytest.raises(InvalidValueError, match="precedes every snapshot"):
        solve_weights(T_IN, S_IN, 999, 0.1)


@pytest.mark.parametrize(
    ("t_in", "s_in", "t_out", "s_out"),
    [
        ([1, 2], [0.1], 2, 0.1),  # lengths differ
        ([1, 2], [0.1, 0.3], 2, 0.1),  # sigma_rel out of range
        ([0, 2], [0.1, 0.1], 2, 0.1),  # time 0
        ([1, 2], [0.1, 0.1], [2, 2], [0.1, 0.1, 0.1]),  # targets do not broadcast
        ([1, 2], [0.1, 0.1], 2, 0.0),
    ],
)
def test_bad_solve_inputs_raise(
    t_in: list[float], s_in: list[float], t_out: float | list[float], s_out: float | list[float]
) -> None:
    with pytest.raises(InvalidValueError):
        solve_weights(t_in, s_in, t_out, s_out)


def test_duplicates_and_near_duplicates_stay_finite() -> None:
    # The paper's schedule stretched to 1e9 steps, plus a copy of the last
    # snapshots one step later (t + 1) and an exact duplicate of one.
    t = T40 * 25_000.0  # 2.5e7 … 1e9
    base_t, base_s = np.concatenate([t, t]), np.array([0.05] * 40 + [0.10] * 40)
    t_in = np.concatenate([base_t, [1e9 + 1, 1e9 + 1, 5e8]])
    s_in = np.concatenate([base_s, [0.05, 0.10, 0.10]])
    base = fit(base_t, base_s, 1e9, 0.15)
    dup = fit(t_in, s_in, 1e9 + 1, [0.15, 0.07])
    assert np.all(np.isfinite(dup.weights))
    np.testing.assert_allclose(dup.weights.sum(axis=0), 1.0, atol=1e-12)
    assert dup.profile_error[0] < base.profile_error[0] * 1.01 + 1e-6
    assert np.all(dup.profile_error < 2e-3)
    assert np.all(dup.sum_abs_weights < 5.0)


def test_profile_error_zero_for_recorded_target() -> None:
    f = fit(T_IN, S_IN, [40000, 30000], [0.05, 0.10])
    assert isinstance(f, Fit)
    assert np.all(f.profile_error < 1e-9)
    np.testing.assert_array_equal(f.sum_abs_weights, [1.0, 1.0])


def test_profile_error_small_for_paper_schedule() -> None:
    f = fit(T_IN, S_IN, 40000, 0.15)
    # measured: profile error 1.47e-3, Σ|w| 1.68
    assert 0 < f.profile_error[0] < 1e-2
    assert f.sum_abs_weights[0] < 3.0
    again = profile_error(T_IN, S_IN, f.weights, 40000, 0.15)
    np.testing.assert_array_equal(again, f.profile_error)


def test_profile_error_matches_numerical_integration() -> None:
    t_in, s_in = [500.0, 1000.0, 500.0, 1000.0], [0.05, 0.05, 0.10, 0.10]
    f = fit(t_in, s_in, 1000.0, 0.15)
    g_in = [sigma_rel_to_gamma(s) for s in s_in]
    g_r = sigma_rel_to_gamma(0.15)
    # the residual has a kink at t = 500: integrate the two pieces separately
    tau, w = (np.concatenate(pair) for pair in zip(_gauss(0.0, 500.0), _gauss(500.0, 1000.0)))
    p_in = [(g + 1) * tau**g / t ** (g + 1) * (tau <= t) for t, g in zip(t_in, g_in)]
    p_r = (g_r + 1) * tau**g_r / 1000.0 ** (g_r + 1)
    residual = p_r - sum(wi * p for wi, p in zip(f.weights[:, 0], p_in))
    err = math.sqrt(np.sum(w * residual**2)) / math.sqrt(float(profile_norm_sq(1000.0, g_r)))
    assert f.profile_error[0] == pytest.approx(err, rel=1e-3)


def test_sum_abs_weights_grows_below_smallest_recorded() -> None:
    f = fit(T_IN, S_IN, 40000, [0.07, 0.02])
    # measured: Σ|w| 1.53 for 0.07, 30.9 for 0.02
    assert f.sum_abs_weights[1] > 10 * f.sum_abs_weights[0]
    assert f.profile_error[1] > f.profile_error[0]


# --- classical EMA ------------------------------------------------------------


def _brute_sigma_rel(beta: float, steps: int, k: int) -> float:
    """Std of the truncated geometric age distribution, summed term by term."""
    n = steps // k
    ages = np.arange(n + 1, dtype=np.float64)
    probs = (1 - beta) * beta**ages
    probs[n] = beta**n  # mass left on the initial weights
    mean = math.fsum(probs * ages)
    return k * math.sqrt(math.fsum(probs * (ages - mean) ** 2)) / steps


@pytest.mark.parametrize(
    ("beta", "steps", "k"),
    [
        (0.5, 1, 1),
        (0.9, 100, 1),
        (0.999, 50, 1),  # T ≪ 1/(1−β): mostly initial weights
        (0.9999, 10, 1),
        (0.9999, 3, 1),
        (0.999, 999, 1),  # either side of the switch between formulas
        (0.999, 1001, 1),
        (0.99, 1000, 7),  # T not a multiple of k
        (0.95, 10, 3),
        (0.999, 20000, 1),
        (0.3, 4, 1),
    ],
)
def test_beta_to_sigma_rel_matches_brute_force(beta: float, steps: int, k: int) -> None:
    assert beta_to_sigma_rel(beta, steps, k) == pytest.approx(_brute_sigma_rel(beta, steps, k), rel=1e-10)


@pytest.mark.parametrize(("beta", "k"), [(0.99, 1), (0.999, 1), (0.99, 4)])
def test_beta_to_sigma_rel_long_run_limit(beta: float, k: int) -> None:
    steps = int(1000 * k / (1 - beta))
    limit = k * math.sqrt(beta) / ((1 - beta) * steps)
    assert beta_to_sigma_rel(beta, steps, k) == pytest.approx(limit, rel=1e-9)
    assert beta_std_steps(beta, k) / steps == pytest.approx(limit, rel=1e-12)


def test_steps_below_update_every_is_zero() -> None:
    assert beta_to_sigma_rel(0.9, 3, 5) == 0.0
    with pytest.raises(InvalidValueError):
        sigma_rel_to_beta(0.1, 3, 5)


@settings(deadline=None, max_examples=60)
@given(st.floats(1e-3, 1 - 1e-6), st.integers(1, 10**7), st.integers(1, 10))
def test_sigma_rel_to_beta_inverts(beta: float, steps: int, k: int) -> None:
    steps = max(steps, k)
    sigma_rel = beta_to_sigma_rel(beta, steps, k)
    back = sigma_rel_to_beta(sigma_rel, steps, k)
    assert beta_to_sigma_rel(back, steps, k) == pytest.approx(sigma_rel, rel=1e-8)
    assert back <= beta * (1 + 1e-9) + 1e-12  # the smaller of the two betas


@pytest.mark.parametrize(
    ("sigma_rel", "steps", "k"), [(0.05, 100_000, 1), (0.15, 5000, 10), (0.01, 10**9, 1), (0.3, 1, 1)]
)
def test_sigma_rel_to_beta_round_trip(sigma_rel: float, steps: int, k: int) -> None:
    beta = sigma_rel_to_beta(sigma_rel, steps, k)
    assert 0 < beta < 1
    # as good as a float beta allows: one ulp of beta moves sigma_rel by ~ulp/(1 − beta)
    rel = 1e-12 + 2 * math.ulp(beta) / (1 - beta)
    assert beta_to_sigma_rel(beta, steps, k) == pytest.approx(sigma_rel, rel=rel)


@pytest.mark.parametrize("bad", [0.37, 1.0, 0.0, -0.1, math.nan])
def test_unreachable_sigma_rel_raises(bad: float) -> None:
    with pytest.raises(InvalidValueError, match="not reachable .* choose a value in \\(0, 0.36"):
        sigma_rel_to_beta(bad, 100_000)


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.5, math.nan])
def test_beta_outside_unit_interval_raises(bad: float) -> None:
    message = "is out of range — use a decay in \\(0, 1\\)"
    with pytest.raises(InvalidValueError, match=message):
        beta_to_sigma_rel(bad, 100)
    with pytest.raises(InvalidValueError, match=message):
        beta_std_steps(bad)
    with pytest.raises(InvalidValueError, match=message):
        beta_half_life(bad)


@pytest.mark.parametrize(("steps", "k"), [(0, 1), (10, 0), (-5, 1), (10, 2.5)])
def test_bad_steps_or_update_every_raise(steps: int, k: int) -> None:
    with pytest.raises(InvalidValueError):
        beta_to_sigma_rel(0.9, steps, k)


def test_half_life() -> None:
    assert beta_half_life(0.5) == 1.0
    assert beta_half_life(0.5, update_every=4) == 4.0
    assert 0.999 ** beta_half_life(0.999) == pytest.approx(0.5)


def test_messages_show_plain_numbers():
    """A numpy scalar passed in is named as the number the user gave, not as np.float64(...)."""
    with pytest.raises(InvalidValueError, match=r"^sigma_rel 1e-300 is too small"):
        sigma_rel_to_gamma(np.float64(1e-300))
    with pytest.raises(InvalidValueError, match=r"^sigma_rel 0\.5 is out of range"):
        check_sigma_rel(np.float64(0.5))


def test_each_target_is_solved_the_same_bits_alone_or_with_others() -> None:
    # Near-duplicate inputs (t and t + 1) make the Gram matrix close to singular.
    t_in = np.concatenate([T_IN, T_IN[-3:] + 1.0])
    s_in = np.concatenate([S_IN, S_IN[-3:]])
    g_in = np.array([sigma_rel_to_gamma(s) for s in s_in])
    g_out = np.array([sigma_rel_to_gamma(s) for s in np.linspace(0.03, 0.25, 23)])
    a = gram(t_in, g_in)
    b = profile_dot(t_in[:, None], g_in[:, None], 40001.0, g_out[None, :])  # => [inputs, targets]
    together = solve_gram(a, b, 40001.0)
    for j in range(g_out.size):
        np.testing.assert_array_equal(solve_gram(a, b[:, j : j + 1], 40001.0)[:, 0], together[:, j])
        np.testing.assert_array_equal(solve_gram(a, b[:, j:], 40001.0)[:, 0], together[:, j])
