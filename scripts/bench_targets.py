"""Solving weights for many targets: 100 targets over 1,000 snapshots at T = 1e9 (issue 11: < 1 s).

Snapshots: sigma_rel 0.05 and 0.10 at 500 evenly spaced times up to T. Targets: 100 of
mixed kinds (sigma_rel, beta, beta with every, window, ema-pytorch), random but seeded.
Prints the time of the targets' inner products (b and ⟨p_r, p_r⟩), of the least-squares
solve (the same for any targets), of the whole ``fit_targets`` call, and the ratio of the
whole to the same call with 100 power targets (the solve alone).

    python scripts/bench_targets.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from posthoc_cli.ema.profiles import sigma_rel_to_gamma
from posthoc_cli.ema.solve import gram, solve_gram
from posthoc_cli.ema.targets import fit_targets, parse_target


def targets(seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(100):
        kind = i % 5
        if kind == 0:
            specs.append(f"beta={1 - 10 ** rng.uniform(-9, -6):.12f}")
        elif kind == 1:
            specs.append(f"sigma_rel={rng.uniform(0.03, 0.25):.4f}")
        elif kind == 2:
            specs.append(f"window={int(10 ** rng.uniform(5, 8.5))}")
        elif kind == 3:
            specs.append(f"beta={1 - 10 ** rng.uniform(-9, -6):.12f},every={int(rng.integers(1, 100))}")
        else:
            specs.append(f"ema-pytorch:beta={1 - 10 ** rng.uniform(-6, -4):.12f}")
    return specs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    t = 10**9
    times = np.arange(1, 501) * (t // 500)
    t_in = np.concatenate([times, times]).astype(np.float64)
    s_in = np.array([0.05] * 500 + [0.10] * 500)
    g_in = np.array([sigma_rel_to_gamma(s) for s in s_in])
    mixed = [parse_target(s) for s in targets()]
    powers = [parse_target(float(s)) for s in np.linspace(0.03, 0.25, 100)]

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs)

    dots = timed(lambda: [(x.dots(t, t_in, g_in), x.norm_sq(t)) for x in mixed])
    a = gram(t_in, g_in)
    b = np.stack([x.dots(t, t_in, g_in) for x in mixed], axis=1)
    solve = timed(lambda: solve_gram(a, b, t))
    whole = timed(lambda: fit_targets(t_in, s_in, mixed, t))
    power = timed(lambda: fit_targets(t_in, s_in, powers, t))
    print(f"100 mixed targets x 1,000 snapshots, T = 1e9 (median of {args.repeats}):")
    print(f"  inner products of the targets   {dots:.3f} s")
    print(f"  least-squares solve (eigh)      {solve:.3f} s")
    print(f"  fit_targets, all of it          {whole:.3f} s")
    print(f"  fit_targets, 100 power targets  {power:.3f} s")
    print(f"  mixed / power = {whole / power:.2f}x")


if __name__ == "__main__":
    main()
