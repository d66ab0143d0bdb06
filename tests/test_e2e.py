"""End to end: the installed ``posthoc-ema`` entry point, in a subprocess, on real snapshots of a real run.

The oracle is an EMA of sigma_rel 0.15 tracked directly by a second Recorder
over the bit-identical training trajectory; the file that ``synthesize`` writes
from the 0.05/0.10 snapshots must match it to a relative error below 1e-3, and
must equal what :func:`posthoc_cli.load_synthesized` computes in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from posthoc_cli import (
    PoorTargetError,
    load_synthesized,
    plan,
    scan,
    sigma_rel_to_gamma,
    synthesize,
)
from posthoc_cli.format.container import load_tensors


def entry_point() -> str:
    """The console script installed next to this interpreter (a venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).with_name("posthoc-ema")
    found = str(beside) if beside.exists() else shutil.which("posthoc-ema")
    assert found, "the posthoc-ema entry point is not installed: run `pip install -e .`"
    return found


def cli(*args: object, cwd: Path, check_rc: int | None = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [entry_point(), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )
    if check_rc is not None:
        assert result.returncode == check_rc, result.stdout + result.stderr
    return result


def float_rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    names = [n for n, t in want.items() if t.is_floating_point()]
    num = sum(float((got[n].double() - want[n].double()).pow(2).sum()) for n in names)
    den = sum(float(want[n].double().pow(2).sum()) for n in names)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, record):
    """Two Recorders on one trajectory: the snapshots to synthesize from, and the directly tracked oracle."""
    root = tmp_path_factory.mktemp("e2e")
    record(root / "ckpts", (0.05, 0.10), steps=400, snapshot_every=20)
    record(root / "direct", (0.15, 0.08), steps=400, snapshot_every=20)
    return root


def test_synthesize_matches_a_directly_tracked_ema(runs, tmp_path, make_model):
    result = cli("synthesize", runs / "ckpts", "--sigma-rel", 0.15, "--out", tmp_path / "ema.safetensors", cwd=tmp_path)
    assert "Synthesized 1 EMA at t=400" in result.stdout
    got = safetensors.torch.load_file(tmp_path / "ema.safetensors")
    direct = load_tensors(scan(runs / "direct").series[0.15][-1].header)
    assert got.keys() == direct.keys()
    assert float_rel_err(got, direct) < 1e-3
    assert torch.equal(got["bn.num_batches_tracked"], direct["bn.num_batches_tracked"])
    in_memory = load_synthesized(runs / "ckpts", 0.15)
    for name, tensor in got.items():
        assert torch.equal(in_memory[name], tensor), name
    model = make_model()
    model.load_state_dict(got)  # a plain state dict for the model that was recorded


def test_earlier_time_and_several_targets_in_one_call(runs, tmp_path):
    result = cli(
        "synthesize", runs / "ckpts", "-s", 0.15, "-s", 0.08, "--step", 200, "--out", tmp_path / "emas", "--json",
        cwd=tmp_path,
    )
    doc = json.loads(result.stdout)
    assert doc["t"] == 200 and [o["sigma_rel"] for o in doc["outputs"]] == [0.15, 0.08]
    direct = {s.sigma_rel: s for s in scan(runs / "direct").snapshots if s.t == 200}
    for out in doc["outputs"]:
        got = safetensors.torch.load_file(out["path"])
        assert float_rel_err(got, load_tensors(direct[out["sigma_rel"]].header)) < 1e-3
        # one matrix product for both targets: equal to a single-target run up to float32 summation order
        single = load_synthesized(runs / "ckpts", out["sigma_rel"], t=200)
        for name in got:
            torch.testing.assert_close(got[name], single[name], rtol=1e-6, atol=1e-7)


def test_default_output_name_in_the_current_folder(runs, tmp_path):
    cli("synthesize", runs / "ckpts", "-s", 0.12, cwd=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["ema-s0.120-t400.safetensors"]
    again = cli("synthesize", runs / "ckpts", "-s", 0.12, cwd=tmp_path, check_rc=1)
    assert again.stderr.startswith("Error: ") and "already exists" in again.stderr


def test_user_errors_are_one_line_without_traceback(runs, tmp_path):
    for args, code in [
        (("synthesize", tmp_path / "missing", "-s", 0.15), 1),
        (("synthesize", runs / "ckpts", "-s", 0.3), 2),
        (("synthesize", runs / "ckpts", "-s", 0.15, "--step", 10**6), 2),
        (("beta-to-sigma", 1.5), 2),
    ]:
        result = cli(*args, cwd=tmp_path, check_rc=code)
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: "), result.stderr
        assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_inspect_and_classical_ema_helpers(runs, tmp_path):
    doc = json.loads(cli("inspect", runs / "ckpts", "--json", cwd=tmp_path).stdout)
    assert [s["snapshots"] for s in doc["series"]] == [20, 20]
    assert next(g for g in doc["grid"] if g["sigma_rel"] == 0.15)["faithful"]
    # the number alone on stdout, ready for $(posthoc-ema beta-to-sigma ...)
    shell = f'x=$("{entry_point()}" beta-to-sigma 0.999 --steps 100000) && echo "[$x]"'
    out = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, check=True).stdout
    assert out.startswith("[0.0099") and out.endswith("]\n")


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["synthesize", "-s", "abc"], "Error: Invalid value for '--sigma-rel'"),
        (["beta-to-sigma"], "Error: Missing argument 'BETA'"),
        (["beta-to-sigma", "0.999", "--steps", "0"], "Error: Invalid value for '--steps'"),
        (["synthesize", "--bogus"], "Error: No such option: --bogus"),
        (["bogus"], "Error: No such command 'bogus' — see 'posthoc-ema --help'"),
        (["synthesize", "--sigma-rel"], "Error: Option '--sigma-rel' requires an argument — see 'posthoc-ema synthesize --help'"),
    ],
)
def test_command_line_mistakes_get_one_error_line(tmp_path, args, start):
    result = cli(*args, cwd=tmp_path, check_rc=2)
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(start) and result.stderr.rstrip().endswith("--help'")


def test_bare_command_shows_the_help(tmp_path):
    result = cli(cwd=tmp_path, check_rc=2)
    assert "synthesize" in result.stdout and "beta-to-sigma" in result.stdout
    assert result.stdout.count("Usage:") == 1  # once


def test_python_dash_m_runs_the_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "posthoc_cli", "--help"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    for command in ("synthesize", "inspect", "beta-to-sigma", "sigma-to-beta", "demo"):
        assert command in result.stdout


def demo_rows(stdout: str) -> dict[tuple[str, float | None], float]:
    """(kind, sigma_rel) -> validation loss, from the demo's table."""
    rows: dict[tuple[str, float | None], float] = {}
    for line in stdout.splitlines():
        words = line.split()
        if words[:2] == ["raw", "weights"]:
            rows[("raw", None)] = float(words[4])
        elif words[:2] == ["recorded", "EMA"]:
            rows[("recorded", float(words[2]))] = float(words[4])
        elif words[:1] == ["synthesized"]:
            rows[("synthesized", float(words[1]))] = float(words[3])
    return rows


def test_demo_finds_a_synthesized_length_better_than_both_recorded_ones(tmp_path):
    """The full default demo, as the README's first command runs it."""
    result = cli("demo", "--out", tmp_path / "demo", cwd=tmp_path)
    rows = demo_rows(result.stdout)
    swept = [k for k in rows if k[0] == "synthesized"]
    assert 9 <= len(swept) <= 12 and len(rows) == 1 + 2 + len(swept) and result.stdout.count("<- best") == 1
    best = min(rows, key=rows.__getitem__)
    assert best[0] == "synthesized" and best in [k for k in rows if "<- best" in result.stdout]
    assert rows[best] < min(rows[("recorded", 0.05)], rows[("recorded", 0.1)]) < rows[("raw", None)]
    # synthesizing a recorded length reproduces it exactly
    assert rows[("synthesized", 0.05)] == rows[("recorded", 0.05)]
    assert rows[("synthesized", 0.1)] == rows[("recorded", 0.1)]
    # the snapshots stay for the user to explore
    assert sorted(scan(tmp_path / "demo").series) == [0.05, 0.1]
    assert f"posthoc-ema inspect {tmp_path / 'demo'}" in result.stdout


def digests(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_poor_target_is_refused_before_anything_is_written(runs, tmp_path):
    """beta=0.9999 at t=400 is almost flat over the run: no mix of these snapshots comes near it (issue 17)."""
    before = digests(runs / "ckpts")
    out = tmp_path / "out" / "ema.safetensors"
    result = cli("synthesize", runs / "ckpts", "--beta", 0.9999, "--out", out, cwd=tmp_path, check_rc=2)
    line = result.stderr.strip()
    assert result.stdout == "" and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    # what went wrong, what the snapshots can do instead, and how to write it anyway
    assert line.startswith("Error: beta=0.9999: profile error ") and "is above 0.05" in line
    assert "these snapshots reproduce sigma_rel 0.0" in line and "within 0.05 at t=400" in line
    assert line.endswith("— pick a target in that range, or pass --allow-poor to write it anyway")
    assert list(tmp_path.iterdir()) == [] and digests(runs / "ckpts") == before  # no file, no folder, inputs untouched
    with pytest.raises(PoorTargetError, match="beta=0.9999: profile error"):
        synthesize(runs / "ckpts", "beta=0.9999", out=out)
    with pytest.raises(PoorTargetError, match="beta=0.9999: profile error"):
        load_synthesized(runs / "ckpts", "beta=0.9999")
    assert list(tmp_path.iterdir()) == []
    # a good target among poor ones is not written either
    cli("synthesize", runs / "ckpts", "-s", 0.12, "--beta", 0.9999, "--out", tmp_path / "both", cwd=tmp_path, check_rc=2)
    assert list(tmp_path.iterdir()) == []
    # --allow-poor writes it, with the warning
    result = cli("synthesize", runs / "ckpts", "--beta", 0.9999, "--allow-poor", "--out", out, "--json", cwd=tmp_path)
    assert json.loads(result.stdout)["outputs"][0]["profile_error"] > 0.05 and out.exists()
    assert "Warning: beta=0.9999: profile error" in result.stderr
    assert synthesize(runs / "ckpts", "beta=0.9999", out=tmp_path / "py.safetensors", allow_poor=True)[0].exists()
    assert load_synthesized(runs / "ckpts", "beta=0.9999", allow_poor=True).keys() == safetensors.torch.load_file(out).keys()
    assert digests(runs / "ckpts") == before


def test_after_a_killed_run_the_default_time_is_the_latest_every_series_reached(runs, tmp_path):
    """A run killed while writing its last 0.10 snapshot leaves a partial temporary file and no final one."""
    folder = Path(shutil.copytree(runs / "ckpts", tmp_path / "ckpts"))
    newest = scan(folder).series[0.10][-1].path
    assert scan(folder).series[0.10][-1].t == 400
    newest.with_name(newest.name + ".tmp").write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    newest.unlink()
    assert scan(folder).latest_t == 400 and scan(folder).series[0.05][-1].t == 400
    assert plan(folder, [0.15]).t == 380
    # at t=400 the fit rests on the 0.05 series alone: poor, refused, and the refusal names the better time
    assert plan(folder, [0.15], t=400, allow_poor=True).fit.profile_error[0] > 0.05
    with pytest.raises(PoorTargetError, match=r"or use t=380 \(every sigma_rel has a snapshot there\)"):
        plan(folder, [0.15], t=400)
    work = tmp_path / "work"
    work.mkdir()
    result = cli("synthesize", folder, "-s", 0.15, "--json", cwd=work)
    doc = json.loads(result.stdout)
    assert doc["t"] == 380 and doc["outputs"][0]["profile_error"] < 0.05
    assert "t=380 is the latest time at which every sigma_rel has a complete snapshot" in doc["t_reason"]
    assert "at t=400 only sigma_rel 0.05 has one" in doc["t_reason"]
    result = cli("synthesize", folder, "-s", 0.12, cwd=work)
    assert result.stdout.startswith("Synthesized 1 EMA at t=380 ")
    assert "Default time: t=380 is the latest time at which every sigma_rel has a complete snapshot" in result.stdout
    # inspect judges the lengths at that same time (it used the newest, where 0.15 looked poor)
    report = json.loads(cli("inspect", folder, "--json", "-s", 0.15, cwd=work).stdout)
    assert report["t"] == 380 and report["latest_t"] == 400
    assert report["targets"][0]["profile_error"] == pytest.approx(doc["outputs"][0]["profile_error"], rel=1e-9)
    assert "Synthesizable at t=380" in cli("inspect", folder, cwd=work).stdout
    # nothing to say when every series reached the newest time
    doc = json.loads(cli("synthesize", runs / "ckpts", "-s", 0.12, "--json", "--out", work / "x.safetensors", cwd=work).stdout)
    assert doc["t"] == 400 and doc["t_reason"] is None


def test_the_timing_is_of_the_synthesis_alone(runs, tmp_path):
    """Start-up (importing torch: about a second) is not synthesis: the figure and its label say which it is."""
    result = cli("synthesize", runs / "ckpts", "-s", 0.12, "--out", tmp_path / "a.safetensors", cwd=tmp_path)
    summary = result.stdout.splitlines()[0]
    assert " read in " in summary and summary.endswith(" s of synthesis"), summary
    started = time.perf_counter()
    result = cli("synthesize", runs / "ckpts", "-s", 0.12, "--out", tmp_path / "b.safetensors", "--json", cwd=tmp_path)
    outside = time.perf_counter() - started
    doc = json.loads(result.stdout)
    assert "seconds" not in doc and 0 <= doc["synthesis_seconds"] <= outside


def test_the_default_time_on_partly_shared_schedules_is_the_earliest_newest(tmp_path):
    """Series at 96, 98, 100 and at 96, 99: by t=99 each has a snapshot (at 98 and 99), so 99, not the last
    shared time 96; the killed-run case (one series a snapshot short) gives the same as before."""
    from posthoc_cli.format.atomic import write_file
    from posthoc_cli.format.snapshot import snapshot_metadata, snapshot_name

    for sigma_rel, times in ((0.05, (96, 98, 100)), (0.10, (96, 99))):
        for t in times:
            meta = snapshot_metadata(sigma_rel=sigma_rel, gamma=sigma_rel_to_gamma(sigma_rel), t=t, time_unit="step", updates=t, dtype="float32")
            write_file(tmp_path / snapshot_name(sigma_rel, t), [("w", torch.full((3,), float(t)))], meta)
    assert scan(tmp_path).latest_t == 100 and scan(tmp_path).complete_t == 99
    assert plan(tmp_path, [0.07], allow_poor=True).t == 99
