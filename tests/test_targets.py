"""Targets beyond power functions: every tracker's profile against a step-by-step simulation of its
library's formula, inner products against brute-force sums, the spec parser, and the solve."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posthoc_cli.ema.profiles import sigma_rel_to_gamma, update_beta
from posthoc_cli.ema.solve import fit
from posthoc_cli.ema.targets import closest_power, fit_targets, parse_target
from posthoc_cli.ema.trackers import Classical, Power, Window
from posthoc_cli.errors import InvalidValueError

# --- float64 simulations of each tracker, written from the libraries' formulas -----------------------
# Each returns the tracker's weights on θ_0 (the initial weights) .. θ_T after T optimizer steps.


class Weights(np.ndarray):
    """A tracker's weights on θ_0..θ_T, with the steps at which it updated (``updates``)."""

    updates: list[int]


def simulate(t: int, update: Callable[[int], float | None]) -> Weights:
    """Drive a tracker over steps 1..t; ``update(k)`` gives the decay at step k or None (no update).
    The tracker holds θ_0 at the start (a copy is a decay of 0)."""
    w = np.zeros(t + 1)
    w[0] = 1.0
    updates = []
    for k in range(1, t + 1):
        d = update(k)
        if d is None:
            continue
        updates.append(k)
        w *= d
        w[k] += 1.0 - d
    out = w.view(Weights)
    out.updates = updates
    return out


def spread(w: Weights) -> np.ndarray:
    """Per-step weights of steps 1..t: an update's weight spread over the steps since the previous update."""
    out = np.zeros(w.size - 1)
    last = 0
    for k in w.updates:
        out[last:k] = w[k] / (k - last)
        last = k
    return out


def sim_averaged_model(t: int, beta: float, every: int = 1) -> np.ndarray:
    """torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn(beta), float64, on one-hot 'weights'."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = torch.nn.Linear(t + 1, 1, bias=False).double()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(beta))
    updates = []
    with torch.no_grad():
        for k in range(1, t + 1):
            model.weight.zero_()
            model.weight[0, k] = 1.0  # θ_k is the k-th basis vector, so the EMA holds the weights
            if k % every == 0:
                ema.update_parameters(model)
                updates.append(k)
    out = ema.module.weight[0].detach().numpy().astype(np.float64).view(Weights)
    out.updates = updates
    return out


def sim_litema(t: int, decay: float, use_num_updates: bool) -> np.ndarray:
    # ldm/modules/ema.py LitEma.forward: float32 buffers; counter incremented before use
    d32 = torch.tensor(decay, dtype=torch.float32)

    def update(k: int) -> float:
        if not use_num_updates:
            return float(d32)
        n = torch.tensor(k, dtype=torch.int)
        return float(min(d32, (1 + n) / (10 + n)))

    return simulate(t, update)


def sim_diffusers(t: int, decay=0.9999, min_decay=0.0, update_after_step=0, use_ema_warmup=False,
                  inv_gamma=1.0, power=2 / 3) -> np.ndarray:
    # diffusers EMAModel.step: optimization_step += 1, then get_decay(optimization_step)
    def update(opt_step: int) -> float:
        step = max(0, opt_step - update_after_step - 1)
        if step <= 0:
            return 0.0
        value = 1 - (1 + step / inv_gamma) ** -power if use_ema_warmup else (1 + step) / (10 + step)
        return max(min(value, decay), min_decay)

    return simulate(t, update)


def sim_timm(t: int, decay=0.9999, min_decay=0.0, update_after_step=0, use_warmup=False, warmup_gamma=1.0,
             warmup_power=2 / 3) -> np.ndarray:
    # timm ModelEmaV3.get_decay(step), step = optimizer steps taken (1 after the first)
    def update(step: int) -> float:
        k = max(0, step - update_after_step - 1)
        if k <= 0:
            return 0.0
        if use_warmup:
            return max(min(1 - (1 + k / warmup_gamma) ** -warmup_power, decay), min_decay)
        return decay

    return simulate(t, update)


def sim_ema_pytorch(t: int, beta=0.9999, update_after_step=100, update_every=10, inv_gamma=1.0, power=2 / 3,
                    min_value=0.0) -> np.ndarray:
    # ema_pytorch EMA.update: step (a tensor) read then incremented; float32 decay from torch ops
    counter = torch.tensor(0)

    def update(_: int) -> float | None:
        nonlocal counter
        step = counter.item()
        counter += 1
        if step == 0:
            return 0.0  # init: copy
        if step % update_every != 0:
            return None
        if step <= update_after_step:
            return 0.0
        epoch = (counter - update_after_step - 1).clamp(min=0.0)
        value = 1 - (1 + epoch / inv_gamma) ** -power
        return value.clamp(min=min_value, max=beta).item()

    return simulate(t, update)


def sim_supergradients(t: int, decay=0.9999, decay_type="exp", beta=15.0, total_steps=None) -> np.ndarray:
    # super_gradients ModelEMA.update(model, step=global_step, total_steps); starts from the model's copy
    def update(step: int) -> float:
        if decay_type == "constant":
            return decay
        if decay_type == "threshold":
            return float(np.minimum(decay, (1 + step) / (10 + step)))
        return decay * (1 - np.exp(-(step / total_steps) * beta))

    return simulate(t, update)


CASES: list[tuple[str, Callable[[int], np.ndarray]]] = [
    ("beta=0.99", lambda t: sim_averaged_model(t, 0.99)),
    ("beta=0.995,every=7", lambda t: sim_averaged_model(t, 0.995, 7)),
    ("beta=0.9,every=3,after=20", lambda t: _after(None, t, 0.9, 3, 20)),
    ("litema:decay=0.999", lambda t: sim_litema(t, 0.999, True)),
    ("litema:decay=0.995,use_num_upates=false", lambda t: sim_litema(t, 0.995, False)),
    ("diffusers:decay=0.999", lambda t: sim_diffusers(t, decay=0.999)),
    ("diffusers:decay=0.9995,use_ema_warmup=true,update_after_step=7,power=0.75,min_decay=0.3",
     lambda t: sim_diffusers(t, decay=0.9995, use_ema_warmup=True, update_after_step=7, power=0.75, min_decay=0.3)),
    ("timm:decay=0.998", lambda t: sim_timm(t, decay=0.998)),
    ("timm:decay=0.999,use_warmup=true,warmup_gamma=2,update_after_step=3",
     lambda t: sim_timm(t, decay=0.999, use_warmup=True, warmup_gamma=2.0, update_after_step=3)),
    ("ema-pytorch:beta=0.999", lambda t: sim_ema_pytorch(t, beta=0.999)),
    ("ema-pytorch:beta=0.995,update_every=3,update_after_step=5,inv_gamma=2",
     lambda t: sim_ema_pytorch(t, beta=0.995, update_every=3, update_after_step=5, inv_gamma=2.0)),
    ("supergradients:decay=0.999,decay_type=threshold", lambda t: sim_supergradients(t, 0.999, "threshold")),
    ("supergradients:decay=0.999,total_steps=3000", lambda t: sim_supergradients(t, 0.999, "exp", 15.0, 3000)),
    ("supergradients:decay=0.995,decay_type=constant", lambda t: sim_supergradients(t, 0.995, "constant")),
]


def _after(sim: object, t: int, beta: float, every: int, after: int) -> np.ndarray:
    """AveragedModel whose updates at steps ≤ after are copies (re-created there), then decay beta."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = torch.nn.Linear(t + 1, 1, bias=False).double()
    ema = None
    updates = list(range(every, t + 1, every))
    with torch.no_grad():
        for k in updates:
            model.weight.zero_()
            model.weight[0, k] = 1.0
            if ema is None or k <= after:
                ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(beta))
            ema.update_parameters(model)
    assert ema is not None
    out = ema.module.weight[0].detach().numpy().astype(np.float64).view(Weights)
    out.updates = updates
    return out


def recorder_weights(t: int, gamma: float) -> np.ndarray:
    """Per-step weights of a Recorder's power EMA at time t, from its update rule (update_beta), step by step."""
    w = np.zeros(t + 1)
    for k in range(1, t + 1):
        b = update_beta(k, k - 1, gamma)
        w *= b
        w[k] += 1.0 - b
    return w[1:]


@pytest.mark.parametrize("spec,sim", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("t", [1, 2, 9, 23, 700])
def test_profile_is_the_simulated_trackers(spec: str, sim: Callable[[int], np.ndarray], t: int) -> None:
    target = parse_target(spec)
    try:
        steps, initial = target.step_weights(t)
    except InvalidValueError as e:  # e.g. every=7 at t < 7: the tracker has not started
        assert "made no update" in str(e) and t < 7
        return
    w = sim(t)
    # ema-pytorch computes its decay in float32 torch ops; numpy's float32 pow differs from torch's by
    # one ulp at a few steps, i.e. ~1e-5 of (1 − decay): the weights agree to 1e-4 there, 1e-12 elsewhere
    tol = 1e-4 if spec.startswith("ema-pytorch") else 1e-12
    np.testing.assert_allclose(steps, spread(w), rtol=tol, atol=tol * 1e-3)
    assert math.isclose(initial, w[0], rel_tol=tol, abs_tol=1e-300)
    assert math.isclose(target.initial_weight(t), w[0], rel_tol=tol, abs_tol=1e-18)
    assert math.isclose(steps.sum() + initial, 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("spec,sim", CASES, ids=[c[0] for c in CASES])
def test_inner_products_use_the_recorders_time_model(spec: str, sim: Callable[[int], np.ndarray]) -> None:
    t = 600
    target = parse_target(spec)
    c = spread(sim(t))
    for t_i, sigma_rel in ((600, 0.05), (600, 0.2), (301, 0.1), (37, 0.05)):
        gamma = sigma_rel_to_gamma(sigma_rel)
        a = recorder_weights(t_i, gamma)  # what the Recorder's EMA at t_i gives each step
        expected = math.fsum(c[:t_i] * a)
        got = float(target.dots(t, [t_i], [gamma])[0])
        tol = 1e-4 if spec.startswith("ema-pytorch") else 1e-9
        assert math.isclose(got, expected, rel_tol=tol), (t_i, sigma_rel, got, expected)
    norm = math.fsum(c * c) + target.initial_weight(t) ** 2
    assert math.isclose(target.norm_sq(t), norm, rel_tol=1e-4 if spec.startswith("ema-pytorch") else 1e-12)


def _brute_dots(target, t: int, t_in: np.ndarray, g_in: np.ndarray) -> np.ndarray:
    c, _ = target.step_weights(t)
    k = np.arange(1, t + 1, dtype=np.float64)
    out = []
    for ti, g in zip(t_in, g_in):
        kk = k[: int(ti)]
        s = g + 1.0
        out.append(math.fsum(c[: kk.size] * ((kk / ti) ** s - ((kk - 1) / ti) ** s)))
    return np.array(out)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["beta", "window", "litema", "diffusers", "ema-pytorch", "sg-exp"]),
    t=st.integers(2, 100_000),
    log_one_minus=st.floats(-5.5, -0.3),
    every=st.integers(1, 40),
    after=st.integers(0, 500),
    fractions=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=4),
    sigma_rels=st.lists(st.floats(0.01, 0.28), min_size=1, max_size=4),
)
def test_inner_products_match_brute_force_sums(kind, t, log_one_minus, every, after, fractions, sigma_rels) -> None:
    decay = 1.0 - 10.0**log_one_minus
    spec = {
        "beta": f"beta={decay!r},every={every},after={after}",
        "window": f"window={max(1, int(t * fractions[0]))}",
        "litema": f"litema:decay={decay!r}",
        "diffusers": f"diffusers:decay={decay!r},use_ema_warmup=true,update_after_step={after}",
        "ema-pytorch": f"ema-pytorch:beta={decay!r},update_every={every},update_after_step={after}",
        "sg-exp": f"supergradients:decay={decay!r},total_steps={t}",
    }[kind]
    target = parse_target(spec)
    try:
        target.norm_sq(t)
    except InvalidValueError:  # no update yet at t (every > t)
        return
    t_in = np.array([max(1.0, math.ceil(f * t)) for f in fractions] + [float(t)])
    g_in = np.array([sigma_rel_to_gamma(s) for s in (sigma_rels * 5)[: t_in.size]])
    got = target.dots(t, t_in, g_in)
    expected = _brute_dots(target, t, t_in, g_in)
    scale = max(expected.max(), 1e-300)
    # 1e-9 relative to each value, or to the largest where a value is ~1e-30 of it (rounding of the brute force)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-15 * scale)
    c, initial = target.step_weights(t)
    assert math.isclose(target.norm_sq(t), math.fsum(c * c) + initial * initial, rel_tol=1e-11)


def test_a_billion_steps_agrees_with_the_continuous_exponential() -> None:
    # Over 1e9 steps with 1 − β = 1.25e-8 the staircase is the exponential λ e^{−λ(T−τ)} to ~1e-8:
    # its integral against s u^{s−1} on [0, 1] (Gauss–Legendre, smooth) is the reference.
    t = 10**9
    beta = 1.0 - 1.25e-8
    lam = -math.log(beta)
    target = Classical(beta)
    x, w = np.polynomial.legendre.leggauss(200)
    u = (x + 1.0) / 2.0
    for t_i, sigma_rel in ((t, 0.05), (t, 0.1), (t // 2, 0.05), (t // 4, 0.2)):
        g = sigma_rel_to_gamma(sigma_rel)
        s = g + 1.0
        reference = float(np.sum(w / 2.0 * s * u ** (s - 1.0) * lam * np.exp(-lam * (t - u * t_i))))
        got = float(target.dots(t, [t_i], [g])[0])
        assert math.isclose(got, reference, rel_tol=1e-6), (t_i, sigma_rel, got, reference)
    sigma, distance = closest_power(target, t)
    assert 0.05 < sigma < 0.11 and distance < 0.1  # an exponential is not a power function: ~5% apart


def test_power_targets_reproduce_the_existing_fit_bit_for_bit() -> None:
    t_in = [100, 200, 300, 100, 200, 300]
    s_in = [0.05, 0.05, 0.05, 0.1, 0.1, 0.1]
    old = fit(t_in, s_in, [300] * 3, [0.07, 0.1, 0.15])
    new = fit_targets(t_in, s_in, [0.07, "sigma_rel=0.1", Power(0.15)], 300)
    assert np.array_equal(old.weights, new.weights)
    assert np.array_equal(old.profile_error, new.profile_error)


def test_a_window_is_an_exact_uniform_average() -> None:
    w = Window(250)
    c, _ = w.step_weights(1000)
    assert np.count_nonzero(c) == 250 and math.isclose(c.sum(), 1.0)
    with pytest.raises(InvalidValueError, match="longer than the run"):
        w.norm_sq(100)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("foo:decay=0.9", "unknown kind 'foo'"),
        ("diffusers:dekay=0.9", "diffusers has no parameter 'dekay'"),
        ("beta=1.5", "out of range"),
        ("beta=0.9,every=0", "every=0"),
        ("litema:use_num_updates=maybe", "not a boolean"),
        ("supergradients:decay=0.999", "needs total_steps"),
        ("supergradients:decay_type=linear,decay=0.9", "decay_type='linear' is unknown"),
        ("window=abc", "not a number"),
        ("beta=0.9,window=10", "not understood"),
        ("timm:decay=0.9,decay=0.8", "given twice"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(InvalidValueError, match=message) as info:
        parse_target(spec)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_litema_accepts_its_own_spelling_and_the_correct_one() -> None:
    a = parse_target("litema:decay=0.99,use_num_upates=false")
    b = parse_target("litema:decay=0.99,use_num_updates=false")
    assert a == b and a.spec == "litema:decay=0.99,use_num_updates=false"


def test_a_target_that_is_mostly_initial_weights_is_refused(recorded) -> None:
    from posthoc_cli import plan

    with pytest.raises(InvalidValueError, match="initial weights"):
        plan(recorded, ["litema:decay=0.999,use_num_updates=false"])  # 0.999^200 = 82% initial
