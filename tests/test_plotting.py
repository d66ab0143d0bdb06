"""posthoc-ema plot and plan --plot: the PNG is written and decodes, and the series drawn are the computed ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
from test_e2e import cli

from posthoc_cli import scan
from posthoc_cli.analysis.plotting import draw, draw_plan, plot_series
from posthoc_cli.analysis.recording_plan import plan_report
from posthoc_cli.ema.quality import target_rows
from posthoc_cli.ema.targets import fit_targets, parse_target


def test_plot_series_are_the_computed_profiles(recorded: Path, tmp_path: Path) -> None:
    snaps = scan(recorded).snapshots
    t_in, s_in = [s.t for s in snaps], [s.sigma_rel for s in snaps]
    targets = ["beta=0.97", "window=50", 0.07]
    series = plot_series(t_in, s_in, 200, targets)
    fit = fit_targets(t_in, s_in, targets, 200)
    assert series["targets"] == target_rows(t_in, s_in, 200, targets, 2.0**-24)
    assert series["snapshot_times"] == sorted(set(t_in)) and series["recorded"] == [0.05, 0.1]
    for j, (spec, profile) in enumerate(zip(targets, series["profiles"])):
        weights, _ = parse_target(spec).step_weights(200)
        np.testing.assert_array_equal(profile["weight"], weights)  # 200 steps: one per bin
        assert profile["profile_error"] == float(fit.profile_error[j])
        # the reconstruction is Σ w_i p_i: its distance to the target is the reported error, up to the
        # continuous-vs-per-step model (a few percent of it at t = 200)
        assert np.isclose(profile["reconstruction"].sum(), 1.0, atol=1e-9)
    path = draw(series, tmp_path / "plot.png")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 500 and image.shape[1] > 500
    assert not list(tmp_path.glob("*.tmp"))


def test_plan_plot_and_plot_command(recorded: Path, tmp_path: Path) -> None:
    report = plan_report(steps=100_000, snapshot_every=5_000, record=[0.05, 0.1], targets=["beta=0.9999"])
    image = matplotlib.image.imread(draw_plan(report, tmp_path / "plan.png"))
    assert image.shape[0] > 300
    cli("plan", "--steps", 100_000, "--snapshot-every", 5_000, "--record", 0.05, "--record", 0.1, "--beta", 0.9999,
        "--plot", tmp_path / "p.png", cwd=tmp_path)
    cli("plot", recorded, "--beta", 0.97, "-s", 0.07, "--out", tmp_path / "f.png", cwd=tmp_path)
    assert matplotlib.image.imread(tmp_path / "p.png").ndim == 3
    assert matplotlib.image.imread(tmp_path / "f.png").ndim == 3


def test_without_matplotlib_the_error_names_the_extra(recorded: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from posthoc_cli.cli.main import main; sys.argv = ['posthoc-ema', 'plot', sys.argv[1], '--out', sys.argv[2]]; main()"
    )
    result = subprocess.run([sys.executable, "-c", code, str(recorded), str(tmp_path / "x.png")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: plotting needs matplotlib, which is not installed — pip install 'posthoc-ema[plot]'"
    assert not (tmp_path / "x.png").exists()
