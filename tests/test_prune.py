"""`posthoc-ema prune`: a dry run by default, --yes removes (whole sets, crash-safe), --json, --at, refusals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_e2e import cli
from test_parallel import TIMEOUT
from test_thinning import BAND, run, weights_at
from typer.testing import CliRunner

from posthoc_cli import Recorder, load_synthesized, scan
from posthoc_cli.cli.main import app
from posthoc_cli.ema.thinning import band_sigma_rels, errors

PRUNE = ["--band", "0.03..0.20", "--max-error", "0.01"]


@pytest.fixture(scope="module")
def _folder_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("prune") / "ckpts")  # 200 snapshots per series, t = 1..200


@pytest.fixture
def folder(tmp_path: Path, _folder_once: Path) -> Path:
    import shutil

    return Path(shutil.copytree(_folder_once, tmp_path / "ckpts"))


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def band_error_at(folder: Path, t: int) -> float:
    snaps = scan(folder).snapshots
    return float(errors([s.t for s in snaps], [s.sigma_rel for s in snaps], band_sigma_rels(BAND), [t]).max())


def test_a_dry_run_changes_nothing(folder):
    before = contents(folder)
    result = CliRunner().invoke(app, ["prune", str(folder), *PRUNE])
    assert result.exit_code == 0, result.output
    assert contents(folder) == before
    lines = result.output.splitlines()
    assert re.fullmatch(r"Would remove (\d+) of 400 snapshots \(.+\); worst profile error of sigma_rel 0\.03\.\.0\.2 "
                        r"at t=200: 0\.00\d+ \(was .+, allowed 0\.01\)", lines[-2]), lines[-2]
    assert lines[-1] == "Nothing was removed: run again with --yes to remove them."
    assert all(line.startswith("  ema-s0.") for line in lines[:-2])


def test_yes_removes_most_of_the_folder_and_inspect_confirms_the_errors(folder):
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    result = cli("prune", folder, *PRUNE, "--yes", "--json", cwd=folder.parent)  # the installed command
    report = json.loads(result.stdout)
    assert len(report["removed"]) >= 0.6 * 400 and len(report["kept"]) + len(report["removed"]) == 400
    assert report["worst_error"] <= 0.01 and not report["dry_run"]
    assert report["bytes_freed"] == sum(sizes[n] for n in report["removed"])
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(report["kept"])
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == [".pruned.json"]
    assert {"ema-s0.050-t000000000200.safetensors", "ema-s0.100-t000000000200.safetensors"} <= set(report["kept"])
    inspect = json.loads(cli("inspect", folder, "--json", cwd=folder.parent).stdout)
    in_band = [row for row in inspect["grid"] if 0.03 <= row["sigma_rel"] <= 0.20]
    assert len(in_band) == 18 and all(row["profile_error"] <= 0.01 for row in in_band)
    assert inspect["thinned"]["prune"]["removed"] == len(report["removed"])
    assert not [p for p in inspect["problems"] if "no snapshot" in p]
    print(f"\nprune: removed {len(report['removed'])} of 400 ({len(report['removed']) / 4:.0f} %), worst {report['worst_error']:.4f}")


def test_at_keeps_the_band_within_the_error_at_that_time_too(folder, tmp_path):
    import shutil

    plain = Path(shutil.copytree(folder, tmp_path / "plain"))
    assert CliRunner().invoke(app, ["prune", str(plain), *PRUNE, "--yes"]).exit_code == 0
    result = CliRunner().invoke(app, ["prune", str(folder), *PRUNE, "--at", "60", "--yes", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["times"] == [60, 200]
    assert band_error_at(folder, 60) <= 0.01 and band_error_at(folder, 200) <= 0.01
    assert band_error_at(plain, 60) > 0.01  # without --at, t=60 was not protected


def test_an_impossible_band_exits_1_naming_the_achievable_band(folder):
    before = contents(folder)
    result = cli("prune", folder, "--band", "0.03..0.28", "--max-error", "0.01", "--yes", cwd=folder.parent, check_rc=1)
    assert re.fullmatch(
        r"Error: even before pruning, sigma_rel 0\.03\.\.0\.28 misses profile error 0\.01 at t=200 \(worst .+\); "
        r"achievable band: only 0\.\d+\.\.0\.\d+ — pass --band within it, or a larger --max-error\n", result.stderr
    ), result.stderr
    assert contents(folder) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--band", "0.2", "--max-error", "0.01"], "band '0.2' is not LO..HI"),
        (["--band", "0.2..0.03", "--max-error", "0.01"], "band 0.2..0.03 is reversed"),
        (["--band", "0.03..0.2", "--max-error", "0"], "max error 0.0 is not in (0, 1)"),
        (["--band", "0.03..0.2", "--max-error", "0.01", "--at", "999"], "time 999 is outside the snapshots' 1..200"),
    ],
)
def test_bad_values_exit_2(folder, args, message):
    result = CliRunner().invoke(app, ["prune", str(folder), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_frozen_weights_and_incomplete_sets_are_left_alone_and_reported(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    folder = tmp_path / "ckpts"
    with Recorder(model, folder, (0.05, 0.10), snapshot_every=1) as rec:
        for step in range(1, 61):
            weights_at(model[1], step)
            rec.update()
    unfinished = folder / "ema-s0.050-t000000000999"
    unfinished.mkdir()
    (unfinished / "rank-00000-of-00002.safetensors.tmp").write_bytes(b"x")
    frozen = (folder / "frozen.safetensors").read_bytes()
    result = CliRunner().invoke(app, ["prune", str(folder), *PRUNE, "--yes", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["removed"]) > 60
    alone = {Path(s["path"]).name: s["reason"] for s in report["left_alone"]}
    assert alone["frozen.safetensors"] == "frozen weights stored once"
    assert alone[unfinished.name].startswith("incomplete: ")
    assert (folder / "frozen.safetensors").read_bytes() == frozen and unfinished.is_dir()
    assert load_synthesized(folder, 0.15).keys() == model.state_dict().keys()  # complete outputs still work


def test_a_sharded_folder_is_pruned_and_thinned_by_whole_sets(tmp_path):
    """FSDP2 on 2 gloo ranks, a snapshot at every step: one folder kept whole, then pruned; one thinned while recording."""
    worker = Path(__file__).with_name("thinning_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker), str(tmp_path), "40", "10"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    thinned = scan(tmp_path / "thinned")
    assert {s: len(g) for s, g in thinned.series.items()} == {0.05: 10, 0.10: 10}
    assert all(s.sharded for s in thinned.snapshots) and not thinned.incomplete and not thinned.broken
    assert sorted(p.name for p in (tmp_path / "thinned").iterdir()) == sorted(s.path.name for s in thinned.snapshots)
    sharded = tmp_path / "sharded"
    result = CliRunner().invoke(app, ["prune", str(sharded), *PRUNE, "--yes", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["removed"] and all(not name.endswith(".safetensors") for name in report["removed"])  # set folders
    assert sorted(p.name for p in sharded.iterdir() if not p.name.startswith(".")) == sorted(report["kept"])
    after = scan(sharded)
    assert not after.incomplete and not after.broken and all(len(s.files) == 2 for s in after.snapshots)
    load_synthesized(sharded, 0.15)
