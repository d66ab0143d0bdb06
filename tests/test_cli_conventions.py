"""Unix and Python conventions through the installed ``posthoc-ema`` script: closed pipes, flags in help, snapshots one level down,
errors that name Python arguments to Python and flags on the command line, leftovers of killed runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_startup import entry_point

TIMEOUT = 120
COMMANDS = ["synthesize", "inspect", "plan", "plot", "beta-to-sigma", "sigma-to-beta", "demo"]


def cli(*args: object, cwd: Path | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([entry_point(), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, **kwargs)  # type: ignore[call-overload]


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# -- a closed pipe ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["inspect", "{folder}"], ["inspect", "{folder}", "--json"], ["beta-to-sigma", "0.999"]])
def test_a_reader_that_went_away_ends_the_command_like_sigpipe(recorded, args):
    """`… | head -1`: the status of a death by SIGPIPE, nothing on stderr."""
    argv = [a.format(folder=recorded) for a in args]
    read, write = os.pipe()
    with os.fdopen(read, "rb") as reader:
        with subprocess.Popen([entry_point(), *argv], stdout=write, stderr=subprocess.PIPE, text=True) as process:
            os.close(write)
            reader.readline()  # `head -1`: one line, then the reader is gone
            reader.close()
            _, stderr = process.communicate(timeout=TIMEOUT)
    # A writer that finished before the reader left saw no closed pipe: only then is 0 right.
    assert process.returncode in (141, -13) or (process.returncode == 0 and not stderr), (process.returncode, stderr)
    assert stderr == ""


@pytest.mark.parametrize("args", [["inspect", "{folder}"], ["inspect", "{folder}", "--json"], ["beta-to-sigma", "0.999"],
                                  ["plan", "--steps", "1000", "--snapshot-every", "100", "--record", "0.05", "--record", "0.1"],
                                  ["--version"]])
def test_a_pipe_closed_before_the_first_line(recorded, args):
    read, write = os.pipe()
    os.close(read)  # the reader left before anything was written: the first write fails
    try:
        result = subprocess.run([entry_point(), *(a.format(folder=recorded) for a in args)], stdout=write,
                                stderr=subprocess.PIPE, text=True, timeout=TIMEOUT)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (141, "")


# -- flags in --help --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_flags_without_a_value(command):
    result = cli(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert "<bool>" not in result.stdout and "BOOLEAN" not in result.stdout
    flags = re.findall(r"(--(?:force|json|help|version|allow-nonfinite|trainable-only))\s+(\S+)", result.stdout)
    assert flags and all(not after.startswith("<") for _, after in flags), flags
    if command is not None:  # options with a value still show it
        assert re.search(r"--\w[\w-]*\s+(-\w\s+)?(<[^>]+>|[A-Z_.]+)\s", result.stdout), result.stdout


# -- snapshots one level down -----------------------------------------------------------------------


@pytest.fixture
def run_dir(recorded: Path, tmp_path: Path) -> Path:
    """A trainer's output folder: its checkpoints, and the snapshots in posthoc-ema/ (the integrations' default)."""
    run = tmp_path / "run"
    (run / "checkpoint-100").mkdir(parents=True)
    (run / "checkpoint-100" / "trainer_state.json").write_text("{}")
    (run / "config.json").write_text("{}")
    shutil.move(recorded, run / "posthoc-ema")
    return run


@pytest.mark.parametrize("command", [["synthesize", "-s", "0.1"], ["inspect"], ["plot"]])
def test_a_run_folder_names_the_snapshot_folder_inside(run_dir, tmp_path, command):
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    result = cli(command[0], run_dir, *command[1:], cwd=tmp_path)
    assert result.returncode == 1
    assert error_line(result) == (f"Error: no posthoc-ema snapshots in {run_dir} — the snapshots are in "
                                  f"{run_dir / 'posthoc-ema'}: pass that folder")
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no output, no plot


def test_a_run_folder_names_the_snapshot_folder_to_python_too(run_dir, tmp_path):
    import posthoc_cli

    with pytest.raises(posthoc_cli.CatalogueError) as caught:
        posthoc_cli.synthesize(run_dir, 0.1, out=tmp_path / "ema.safetensors")
    assert caught.value.fix == f"the snapshots are in {run_dir / 'posthoc-ema'}: pass that folder"
    shutil.copytree(run_dir / "posthoc-ema", run_dir / "more")
    with pytest.raises(posthoc_cli.CatalogueError) as caught:
        posthoc_cli.plan(run_dir, [0.1])
    assert caught.value.fix == (f"the snapshots are in {run_dir / 'posthoc-ema'} and {run_dir / 'more'}: "
                                "pass one of those folders")
    assert posthoc_cli.synthesize(run_dir / "posthoc-ema", 0.1, out=tmp_path / "ema.safetensors")


def test_a_folder_with_nothing_below_keeps_its_fix(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert error_line(cli("inspect", tmp_path / "empty")).endswith(
        "— record some with posthoc_cli.Recorder, or pass the folder it wrote")


# -- errors name Python arguments to Python, flags on the command line ------------------------------


def _poison(folder: Path) -> Path:
    """Write an Inf into the last snapshot's first tensor (header intact)."""
    from posthoc_cli.format.container import read_header

    victim = sorted(folder.glob("*.safetensors"))[-1]
    entry = min(read_header(victim).tensors.values(), key=lambda e: e.begin)
    with open(victim, "r+b") as f:
        f.seek(entry.begin)
        f.write(b"\x00\x00\x80\x7f")  # float32 +Inf
    return victim


def _cases(folder: Path, tmp_path: Path) -> list[tuple[dict[str, object], list[str], str, str]]:
    """(Python arguments, CLI arguments, the fix Python reads, the fix the CLI prints)."""
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"mine")
    return [
        (dict(out=existing), ["--out", str(existing)],
         "use force=True to overwrite it, or choose another out=…", "use --force to overwrite it, or choose another --out"),
        (dict(t=10_000, out=tmp_path / "a.safetensors"), ["--step", "10000", "--out", str(tmp_path / "a.safetensors")],
         "t=10000 is outside", "--step 10000 is outside"),
        (dict(max_shard_size="5XB", out=tmp_path / "b"), ["--max-shard-size", "5XB", "--out", str(tmp_path / "b")],
         "max_shard_size='5XB' is not a size", "--max-shard-size 5XB is not a size"),
    ]


def test_errors_name_python_arguments_to_python_and_flags_to_the_cli(recorded, tmp_path):
    import posthoc_cli

    for kwargs, flags, python_says, cli_says in _cases(recorded, tmp_path):
        with pytest.raises(posthoc_cli.PosthocError) as caught:
            posthoc_cli.synthesize(recorded, 0.1, **kwargs)  # type: ignore[arg-type]
        assert python_says in str(caught.value) and "--" not in str(caught.value)
        assert python_says in f"{caught.value.what} — {caught.value.fix}"  # the parts read the same
        assert not re.search("[\ue000-\ue002]", str(caught.value) + caught.value.what + (caught.value.fix or ""))
        line = error_line(cli("synthesize", recorded, "-s", "0.1", *flags, cwd=tmp_path))
        assert cli_says in line and "=True" not in line and "=…" not in line, line
    assert (tmp_path / "existing.safetensors").read_bytes() == b"mine"


def test_nonfinite_errors_name_allow_nonfinite_both_ways(recorded, tmp_path):
    import posthoc_cli

    _poison(recorded)
    with pytest.raises(posthoc_cli.NonFiniteError, match=r"pass allow_nonfinite=True to write the result anyway$"):
        posthoc_cli.synthesize(recorded, 0.1, out=tmp_path / "a.safetensors")
    line = error_line(cli("synthesize", recorded, "-s", "0.1", "--out", tmp_path / "a.safetensors"))
    assert line.endswith("pass --allow-nonfinite to write the result anyway")
    assert not (tmp_path / "a.safetensors").exists()


def test_a_rank_error_relayed_to_rank_0_keeps_both_spellings():
    """A message built from another error (as ranks relay theirs) still reads right on both sides."""
    from posthoc_cli.errors import OutputError, ParallelError, arg, cli_text

    first = OutputError("x exists", f"use {arg('force', True)}, or choose another {arg('out')}")
    relayed = ParallelError(f"rank 1: {first.message}")
    assert str(relayed) == "rank 1: x exists — use force=True, or choose another out=…"
    assert cli_text(relayed) == "rank 1: x exists — use --force, or choose another --out"


# -- leftovers of a killed run ----------------------------------------------------------------------


def test_a_run_removes_dead_runs_leftovers_but_not_a_live_runs_files(recorded, tmp_path):
    from posthoc_cli.format.atomic import AtomicWriter

    out = tmp_path / "out"
    snapshot = next(recorded.glob("*.safetensors")).read_bytes()  # what our writers put in a temporary file
    dead = out / ".ema.0123abcd.tmp"  # a killed run's hidden folder of HF shards
    dead.mkdir(parents=True)
    (dead / "model-00001-of-00002.safetensors.tmp").write_bytes(snapshot[:4096])
    (out / "ema-s0.300-t9.safetensors.tmp").write_bytes(snapshot[:4096])  # a killed run's file, named otherwise
    # The user's own files, which merely look alike: never touched
    (out / "notes.tmp").write_text("mine")
    (out / "user.safetensors.tmp").write_bytes(b"\0" * 64)
    (out / ".mydata.deadbeef.tmp").mkdir()
    (out / ".mydata.deadbeef.tmp" / "f").write_text("mine too")
    (out / ".mixed.0badcafe.tmp").mkdir()
    (out / ".mixed.0badcafe.tmp" / "model.safetensors.tmp").write_bytes(snapshot[:4096])
    (out / ".mixed.0badcafe.tmp" / "diary.txt").write_text("and this")
    kept = ["notes.tmp", "user.safetensors.tmp", ".mydata.deadbeef.tmp", ".mixed.0badcafe.tmp"]
    with AtomicWriter(out / "live.safetensors", [], {}) as live:  # a live run's temporary file: locked, kept
        result = cli("synthesize", recorded, "-s", "0.1", "--out", out / "ema.safetensors")
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in out.iterdir()) == sorted(["ema.safetensors", "live.safetensors.tmp", *kept])
        assert (out / ".mydata.deadbeef.tmp" / "f").read_text() == "mine too"
        live.commit()
