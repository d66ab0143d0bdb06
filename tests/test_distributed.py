"""Recording sharded models under real torchrun process groups (gloo on CPU), each run bounded in time.

Every case runs tests/dist_worker.py under ``torchrun``: the model is sharded
(FSDP2, tensor parallel, HSDP), a Recorder records its local shards, and the
union of the rank files must equal, bit for bit, what an unsharded Recorder fed
the same full weights every step records (``shardsets.assert_same_snapshots``).
"""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_worker import reference_run
from shardsets import assert_same_snapshots, full_tensors

from posthoc_cli import scan

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(ranks: int, *args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER), *map(str, args),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The oracle: 12 steps of the trajectory recorded by an unsharded Recorder (snapshots at 4, 8, 12)."""
    folder = tmp_path_factory.mktemp("reference") / "ckpts"
    reference_run(folder, 12)
    return folder


def test_fsdp2_on_2_ranks_records_the_unsharded_snapshots_with_zero_collectives(tmp_path, reference):
    torchrun(2, "fsdp", tmp_path / "ckpts", 12, "--count", tmp_path / "count.json")
    for rank in range(2):
        seen = json.loads((tmp_path / f"count-{rank}.json").read_text())
        assert seen["in_forward"] > 0  # the counter sees FSDP2's all-gathers ...
        assert seen["in_updates"] == 0  # ... and none in 12 updates and a snapshot
    assert assert_same_snapshots(tmp_path / "ckpts", reference) == 6
    snap = scan(tmp_path / "ckpts").series[0.05][-1]
    assert len(snap.files) == 2 and [c.offsets for c in snap.chunks["fc1.weight"]] == [(0, 0), (4, 0)]
    assert "head.weight" in snap.layout and "embed.weight" in snap.layout  # tied: both names, one EMA


def test_fsdp2_on_3_ranks_uneven_and_empty_shards_read_by_torch_too(tmp_path, reference):
    torchrun(3, "fsdp", tmp_path / "ckpts", 12)
    assert_same_snapshots(tmp_path / "ckpts", reference)
    snap = scan(tmp_path / "ckpts").snapshots[-1]
    assert [c.entry.shape for c in snap.chunks["small"]] == [(1,), (1,)]  # 2 elements on 3 ranks: one rank holds none
    assert [c.entry.shape for c in snap.chunks["fc1.weight"]] == [(3, 6), (3, 6), (1, 6)]
    assert_torch_reads(snap)


def assert_torch_reads(snap) -> None:
    """DCP's HuggingFaceStorageReader loads the snapshot folder into plain tensors: exactly our tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    ours = full_tensors(snap)
    state = {name: torch.full_like(t, 7) for name, t in ours.items()}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(snap.path)), no_dist=True)
    assert all(torch.equal(state[n], ours[n]) for n in ours)


def test_tensor_parallel_on_2_ranks(tmp_path, reference):
    torchrun(2, "tp", tmp_path / "ckpts", 12)
    assert_same_snapshots(tmp_path / "ckpts", reference)
    snap = scan(tmp_path / "ckpts").snapshots[-1]
    assert [c.offsets for c in snap.chunks["fc2.weight"]] == [(0, 0), (0, 4)]  # rowwise: split along dim 1
    assert len(snap.chunks["fc2.bias"]) == 1  # replicated over TP: written once


def test_hsdp_on_a_2x2_mesh_writes_one_replica(tmp_path, reference):
    torchrun(4, "hsdp", tmp_path / "ckpts", 8)
    folder = tmp_path / "ckpts"
    snap = scan(folder).snapshots[-1]
    assert len(snap.files) == 2  # the replicate dimension's coordinate-0 ranks only
    ours = full_tensors(snap)
    ref = {(s.sigma_rel, s.t): s for s in scan(reference).snapshots}[(snap.sigma_rel, snap.t)]
    assert all(torch.equal(ours[n], t) for n, t in full_tensors(ref).items())


def test_resume_with_the_same_world_size(tmp_path, reference):
    torchrun(2, "fsdp", tmp_path / "ckpts", 6)  # snapshots at 4, then resumed from t=4
    torchrun(2, "fsdp", tmp_path / "ckpts", 12)
    assert_same_snapshots(tmp_path / "ckpts", reference)


def test_elastic_resume_from_3_ranks_on_2(tmp_path, reference):
    torchrun(3, "fsdp", tmp_path / "ckpts", 8)
    torchrun(2, "fsdp", tmp_path / "ckpts", 12)  # each rank reads its new chunks from the 3-rank ones
    assert_same_snapshots(tmp_path / "ckpts", reference)
    files = {len(s.files) for s in scan(tmp_path / "ckpts").snapshots}
    assert files == {2, 3}


def test_a_rank_killed_while_writing_leaves_nothing_used_and_resume_recovers(tmp_path, reference):
    rng = random.Random()
    folder = tmp_path / "ckpts"
    kill_after = rng.randint(1, 40)  # the k-th tensor write of rank 1's snapshot files (each holds ~9)
    result = torchrun(2, "fsdp", folder, 12, "--kill-after", kill_after, check=False)
    assert result.returncode != 0, f"kill-after {kill_after} did not kill"
    catalogue = scan(folder)
    assert not catalogue.broken, (kill_after, catalogue.broken)
    unfinished = {i.path for i in catalogue.incomplete}
    assert not unfinished & {s.path for s in catalogue.snapshots}  # what synthesis and resume may use
    torchrun(2, "fsdp", folder, 12)
    assert_same_snapshots(folder, reference)
    assert not scan(folder).incomplete, kill_after


def test_fsdp2_over_tensor_parallel_on_a_2x2_mesh(tmp_path, reference):
    """fully_shard over dp after parallelize_module over tp: 2-D chunks, and dp-only parameters replicated over tp written once."""
    torchrun(4, "fsdp+tp", tmp_path / "ckpts", 4)
    snap = scan(tmp_path / "ckpts").snapshots[-1]
    assert [c.offsets for c in snap.chunks["fc2.weight"]] == [(0, 0), (0, 4), (3, 0), (3, 4)]
    assert [c.offsets for c in snap.chunks["fc1.weight"]] == [(0, 0), (4, 0)]
    ref = {(s.sigma_rel, s.t): s for s in scan(reference).snapshots}[(snap.sigma_rel, snap.t)]
    ours = full_tensors(snap)
    assert all(torch.equal(ours[n], t) for n, t in full_tensors(ref).items())


def test_fsdp2_over_colwise_tp_strided_shards_on_a_2x2_mesh(tmp_path, reference):
    """torchtitan's 2-D layout: colwise fc1 and rowwise fc2 over tp, then fully_shard over dp, so fc1 is
    (_StridedShard(0, sf=2), Shard(0)): each rank's rows are one block (7 rows: 2, 2, 2, 1), stored once, with
    zero collectives; synthesis (one process and 2 ranks) gives the unsharded recording's bits; DCP loads the
    folder into plain tensors here and into the strided DTensors in the worker."""
    torchrun(4, "titan", tmp_path / "ckpts", 12, "--count", tmp_path / "count.json")
    assert all(json.loads((tmp_path / f"count-{rank}.json").read_text())["in_updates"] == 0 for rank in range(4))
    assert assert_same_snapshots(tmp_path / "ckpts", reference) == 6
    snap = scan(tmp_path / "ckpts").snapshots[-1]
    # rank 1 is (dp 0, tp 1): the first half of tp 1's rows [4, 7), not rows 2-3 as (Shard(0), Shard(0)) would give
    assert [(c.offsets, c.entry.shape) for c in snap.chunks["fc1.weight"]] == [((0, 0), (2, 6)), ((4, 0), (2, 6)), ((2, 0), (2, 6)), ((6, 0), (1, 6))]
    assert [c.offsets for c in snap.chunks["fc1.bias"]] == [(0,), (4,), (2,), (6,)]
    assert_torch_reads(snap)
    assert_synthesizes_like(tmp_path / "ckpts", reference, tmp_path, ranks=2)


def assert_synthesizes_like(folder: Path, reference: Path, tmp_path: Path, ranks: int = 0) -> None:
    """Synthesis from ``folder`` gives the bits of synthesis from the unsharded ``reference`` (and in parallel on ``ranks``)."""
    import safetensors.torch
    from test_parallel import torchrun as parallel
    from test_sharded_synthesis import same_bits

    import posthoc_cli

    want = posthoc_cli.load_synthesized(reference, 0.07)
    assert same_bits(posthoc_cli.load_synthesized(folder, 0.07), want)
    if ranks:
        result = parallel(ranks, "synthesize", folder, "-s", "0.07", "--out", tmp_path / "par.safetensors", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert same_bits(safetensors.torch.load_file(tmp_path / "par.safetensors"), want)


def test_elastic_resume_into_and_out_of_the_strided_layout(tmp_path, reference):
    """3 FSDP2 ranks, then the 2x2 strided layout resumed from their chunks, resumed from its own chunks, then 2
    FSDP2 ranks resumed from the 4 strided files: the uninterrupted run's snapshots and synthesis, bit for bit."""
    folder = tmp_path / "ckpts"
    torchrun(3, "fsdp", folder, 4)
    torchrun(4, "titan", folder, 8)
    torchrun(4, "titan", folder, 10)  # resumes from its own t=8 set, writes nothing
    torchrun(2, "fsdp", folder, 12)
    assert assert_same_snapshots(folder, reference) == 6
    assert sorted((s.t, len(s.files)) for s in scan(folder).series[0.05]) == [(4, 3), (8, 4), (12, 2)]
    assert_synthesizes_like(folder, reference, tmp_path)


def test_every_rank_judges_the_whole_strided_layout():
    """FSDP2 over TP (_StridedShard(sf=tp) on dp, then Shard on tp) is recorded wherever the placements' meaning
    and FSDP2's layout (the TP shard cut again) agree on every rank: any size on 2 x 2 and 2 x 4, multiples of
    dp x tp on any mesh; elsewhere (25 rows on 4 x 2) every rank refuses, also those whose own rows agree."""
    from posthoc_cli.record.dtensors import _scattered

    for dp, tp in ((2, 2), (2, 4)):
        assert all(_scattered(rows, ((dp, tp), (tp, 0))) is None for rows in range(0, 40)), (dp, tp)
    for dp, tp in ((4, 2), (3, 5), (8, 8)):
        assert all(_scattered(rows, ((dp, tp), (tp, 0))) is None for rows in range(0, 400, dp * tp)), (dp, tp)
    assert _scattered(25, ((4, 2), (2, 0))) == ([12, 22], (3, 0))  # FSDP2 puts row 12 alone there
    assert _scattered(3, ((2, 2),)) == ([0, 2], (0,))  # coordinate 1 holds [1], a block, but refuses too


@pytest.mark.parametrize(("layout", "message"), [
    ("scattered", r"placements \(_StridedShard\(dim=0, sf=2\),\), whose local shards are not one block of the tensor each, "
                  r"in the same place as FSDP2 over TP puts them \(indices \[0, 1, 4, 5\] of dimension 0 at mesh coordinate \[0\]\) — shard as FSDP2"),
    ("partial", r"placements \(Partial\(sum\),\): only Shard, _StridedShard and Replicate placements can be recorded without communication — "),
])
def test_strided_shards_that_are_not_one_block_and_partial_placements_are_refused(tmp_path, layout, message):
    result = torchrun(2, layout, tmp_path / "ckpts", 4, check=False)
    assert result.returncode != 0
    assert re.search(r"InvalidValueError: the model holds a DTensor with " + message, result.stderr), result.stderr[-3000:]
    assert not list((tmp_path / "ckpts").glob("ema-*"))


def test_fully_shard_after_the_recorder_is_followed(tmp_path, reference):
    """A Recorder made before fully_shard(model) starts over on the sharded parameters at its first update."""
    torchrun(2, "fsdp", tmp_path / "ckpts", 8, "--late")
    folder = tmp_path / "ckpts"
    assert all(s.sharded for s in scan(folder).snapshots)
    ref = {(s.sigma_rel, s.t): s for s in scan(reference).snapshots}
    for snap in scan(folder).snapshots:
        ours = full_tensors(snap)
        assert all(torch.equal(ours[n], t) for n, t in full_tensors(ref[(snap.sigma_rel, snap.t)]).items())


def test_update_every_and_ema_device_work_on_shards(tmp_path):
    reference_run(tmp_path / "reference", 12, update_every=3, ema_device="cpu")
    torchrun(2, "fsdp", tmp_path / "ckpts", 12, "--update-every", 3, "--ema-device", "cpu")
    assert_same_snapshots(tmp_path / "ckpts", tmp_path / "reference")
