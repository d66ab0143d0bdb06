"""Parallel synthesis under real ``torchrun`` (gloo on CPU): outputs identical to one process; failures leave nothing.

Every run starts the installed ``posthoc_cli`` with ``python -m torch.distributed.run``
(torchrun) on 1, 2 or 3 ranks and is bounded by a timeout. Headers carry a
``created`` timestamp that rank 0 decides; outputs are compared with that one
field set aside, byte for byte otherwise (header and tensor data).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import record_with_a_frozen_layer
from test_sharded_synthesis import reshard

import posthoc_cli
from posthoc_cli.format.container import read_header

TIMEOUT = 120  # seconds for one torchrun
WORKER = Path(__file__).with_name("parallel_worker.py")


def torchrun(ranks: int, *args: object, cwd: Path, script: Path | None = None) -> subprocess.CompletedProcess[str]:
    target = [str(script)] if script else ["-m", "posthoc_cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *target, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def normalised(path: Path) -> tuple[dict[str, object], bytes]:
    """The header (``created`` set aside) and every byte after it."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    record = json.loads(header["__metadata__"]["posthoc_ema"])
    assert record.pop("created")
    header["__metadata__"]["posthoc_ema"] = record
    return header, raw[8 + n :]


def same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in files:
        if name.suffix == ".json":
            assert (a / name).read_bytes() == (b / name).read_bytes()
        else:
            assert normalised(a / name) == normalised(b / name)


def final_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if not p.name.endswith(".tmp") and ".tmp" not in p.parent.name)


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_outputs_are_identical_to_one_process(recorded, tmp_path, ranks):
    args = [recorded, "-s", "0.15", "-s", "0.07", "--max-shard-size", "300"]
    posthoc_cli.synthesize(recorded, [0.15, 0.07], out=tmp_path / "one", max_shard_size=300)
    result = torchrun(ranks, "synthesize", *args, "--out", tmp_path / "many", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # rank 0 alone printed: one JSON document
    assert [o["path"] for o in document["outputs"]] == [str(tmp_path / "many" / n) for n in ("ema-s0.150-t200", "ema-s0.070-t200")]
    n = len(document["inputs"])
    assert document["bytes_read"] == sum(e.nbytes * (n if e.dtype.is_floating_point else 1) for e in posthoc_cli.plan(recorded, [0.15]).entries)
    same_tree(tmp_path / "one", tmp_path / "many")
    assert len(list((tmp_path / "many" / "ema-s0.150-t200").iterdir())) == 4  # 3 shards cut across the ranks' parts


def test_a_sharded_recording_in_parallel_into_one_file(recorded, tmp_path):
    sharded = reshard(recorded, tmp_path / "sharded", [2, "c2", 3])
    one = posthoc_cli.synthesize(recorded, 0.12, out=tmp_path / "one.safetensors")[0]
    result = torchrun(3, "synthesize", sharded, "-s", "0.12", "--out", tmp_path / "three.safetensors", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Synthesized 1 EMA") == 1
    header, data = normalised(tmp_path / "three.safetensors")
    want_header, want_data = normalised(one)
    assert data == want_data
    inputs = header["__metadata__"]["posthoc_ema"].pop("inputs")  # type: ignore[index]
    assert [i["file"] for i in inputs] == [i["file"].removesuffix(".safetensors") for i in want_header["__metadata__"]["posthoc_ema"].pop("inputs")]  # type: ignore[index]
    assert header == want_header


@pytest.mark.parametrize("sharded", [False, True], ids=["frozen-file", "frozen-set"])
def test_frozen_weights_are_copied_in_by_the_last_rank(tmp_path, sharded):
    """Complete outputs (also cut into HF shards) and --trainable-only ones equal one process's bytes."""
    folder = tmp_path / "ckpts"
    record_with_a_frozen_layer(folder, tmp_path, sharded=sharded)
    posthoc_cli.synthesize(folder, [0.12, 0.07], out=tmp_path / "one", max_shard_size=4096)
    result = torchrun(2, "synthesize", folder, "-s", "0.12", "-s", "0.07", "--max-shard-size", "4096",
                      "--out", tmp_path / "two", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    same_tree(tmp_path / "one", tmp_path / "two")
    assert len(list((tmp_path / "two" / "ema-s0.120-t20").glob("*.safetensors"))) > 1  # the frozen part spans shards
    posthoc_cli.synthesize(folder, 0.12, out=tmp_path / "one.safetensors", trainable_only=True)
    result = torchrun(2, "synthesize", folder, "-s", "0.12", "--trainable-only", "--out", tmp_path / "two.safetensors", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert normalised(tmp_path / "one.safetensors") == normalised(tmp_path / "two.safetensors")
    assert not any(name.startswith("0.") for name in read_header(tmp_path / "two.safetensors").tensors)


def test_a_rank_failing_midway_stops_all_with_one_error_and_nothing_written(recorded, tmp_path):
    victim = sorted(recorded.glob("*.safetensors"))[-1]
    entry = max(read_header(victim).tensors.values(), key=lambda e: e.begin)  # the last tensor: rank 1's part
    with open(victim, "r+b") as f:
        f.seek(entry.begin)
        f.write(torch.tensor([float("inf")]).numpy().tobytes())
    out = tmp_path / "out"
    result = torchrun(2, "synthesize", recorded, "-s", "0.15", "--out", out / "ema.safetensors", cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: rank 1: tensor {entry.name!r} in {victim} holds NaN or Inf — move that snapshot out "
                      "of the folder, or pass --allow-nonfinite to write the result anyway"]
    assert not out.exists()  # neither the output, its temporary file, nor the folder made for it


def test_a_poor_target_is_refused_on_every_rank_before_anything_is_written(recorded, tmp_path):
    before = {p.name: p.read_bytes() for p in recorded.iterdir()}
    out = tmp_path / "out"
    result = torchrun(2, "synthesize", recorded, "-s", "0.12", "--beta", "0.9999", "--out", out, "--json", cwd=tmp_path)
    assert result.returncode != 0 and result.stdout == ""  # torchrun reports a failed rank with its own code
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: beta=0.9999: profile error "), result.stderr
    assert errors[0].endswith("pass --allow-poor to write it anyway")
    assert not out.exists() and {p.name: p.read_bytes() for p in recorded.iterdir()} == before
    result = torchrun(2, "synthesize", recorded, "--beta", "0.9999", "--allow-poor", "--out", out / "x.safetensors", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["synthesis_seconds"] >= 0 and (out / "x.safetensors").exists()


def test_a_killed_rank_leaves_nothing_under_a_final_name(recorded, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = torchrun(2, "synthesize", recorded, "-s", "0.15", "-s", "0.07", "--out", out, cwd=tmp_path, script=WORKER)
    assert result.returncode != 0
    assert "SIGXFSZ" in result.stderr  # torchrun's report: rank 1 was killed by the file size limit
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) <= 1  # rank 0's, if it got to say it
    assert final_names(out) == []


def test_one_process_never_touches_torch_distributed(recorded, tmp_path):
    code = (
        "import sys, torch.distributed as dist\n"
        "from typer.testing import CliRunner\n"
        "from posthoc_cli.cli.main import app\n"
        f"r = CliRunner().invoke(app, ['synthesize', {str(recorded)!r}, '-s', '0.15', '--out', {str(tmp_path / 'o')!r}, '--max-shard-size', '1KB'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('posthoc_cli.synth.team' in sys.modules, dist.is_initialized())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert result.stdout.split() == ["False", "False"], result.stderr


# -- rank 0 killed mid-synthesis (SIGKILL: no clean-up of its own) ----------------------------------


def _record_big(folder: Path) -> Path:
    """4.2 M parameters (17 MB a snapshot), 6 snapshots: a synthesis long enough to be killed midway."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048), nn.Linear(2048, 1024))
    with posthoc_cli.Recorder(model, folder, sigma_rels=(0.05, 0.10), snapshot_every=2) as rec:
        for _ in range(6):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
            rec.update()
    return folder  # 6 updates: every length is poor here, so the runs below pass --allow-poor (they test kills)


def _rank_pids(parent: int) -> dict[str, int]:
    """RANK → pid of ``parent``'s children (torchrun's workers), from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] != str(parent):
                continue
            env = dict(x.split("=", 1) for x in (entry / "environ").read_bytes().decode().split("\0") if "=" in x)
        except OSError:
            continue
        if "RANK" in env:
            found[env["RANK"]] = int(entry.name)
    return found


def _kill_when_writing(process: subprocess.Popen[str], out: Path, pid: Callable[[], int]) -> None:
    """SIGKILL the process ``pid()`` names once the outputs' temporary files exist (mid-synthesis)."""
    deadline = time.monotonic() + TIMEOUT
    while not any(p.name.endswith(".tmp") for p in out.rglob("*")):
        assert process.poll() is None and time.monotonic() < deadline, "the synthesis ended before it could be killed"
        time.sleep(0.002)
    os.kill(pid(), signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's ranks in /proc")
def test_leftovers_of_a_killed_rank_0_are_removed_by_the_next_run(tmp_path):
    big = _record_big(tmp_path / "big")
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "posthoc_cli",
               "synthesize", str(big), "-s", "0.15", "-s", "0.07", "--allow-poor", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as run:
        _kill_when_writing(run, out, lambda: _rank_pids(run.pid)["0"])
        _, stderr = run.communicate(timeout=TIMEOUT)
    assert run.returncode == 1 and "SIGKILL" in stderr
    assert "SIGABRT" not in stderr and "exitcode  : -6" not in stderr
    assert final_names(out) == [] and list(out.glob("*.tmp"))  # what a SIGKILL leaves: temporary files
    # The next run, writing other outputs into that folder, removes them (no process holds them).
    result = torchrun(2, "synthesize", big, "-s", "0.1", "--allow-poor", "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ema-s0.100-t6.safetensors"]


def test_the_survivors_of_a_killed_rank_0_say_so_and_exit_1(tmp_path):
    """Ranks started as torchrun starts them, without its agent (which would SIGTERM the survivors at once)."""
    big = _record_big(tmp_path / "big")
    out = tmp_path / "out"
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    for rank in range(3):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "3",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        ranks.append(subprocess.Popen([sys.executable, "-m", "posthoc_cli", "synthesize", str(big), "-s", "0.15",
                                       "-s", "0.07", "--allow-poor", "--out", str(out)], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _kill_when_writing(ranks[0], out, lambda: ranks[0].pid)
        reports = [p.communicate(timeout=TIMEOUT) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert ranks[0].returncode == -signal.SIGKILL
    for rank in (1, 2):
        assert ranks[rank].returncode == 1, reports[rank]
        [line] = reports[rank][1].splitlines()
        assert line.startswith(f"Error: rank {rank}: another rank of the parallel synthesis stopped without reporting why")
        assert line.endswith("— see that rank's log (torchrun names the failed rank); nothing was written")
    assert final_names(out) == []
