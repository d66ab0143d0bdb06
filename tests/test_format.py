"""The on-disk format: golden header bytes, every dtype through our writer, buffers unchanged, atomic writes."""

from __future__ import annotations

import errno
import json
import os
import re

import pytest
import safetensors.torch
import torch
from torch import nn

from posthoc_cli import (
    OutputError,
    Recorder,
    __version__,
    load_synthesized,
    scan,
    synthesize,
)
from posthoc_cli.dtypes import torch_codes
from posthoc_cli.format import leftovers
from posthoc_cli.format.atomic import AtomicWriter, write_file
from posthoc_cli.format.container import load_tensors, read_header
from posthoc_cli.format.snapshot import snapshot_metadata
from posthoc_cli.format.snapshot_set import read_snapshot


class Golden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)
        self.bn = nn.BatchNorm1d(3)


# The exact header of `ema-s0.050-t000000000001.safetensors` written by a Recorder for `Golden`,
# `created` excepted: key order, compact JSON, data offsets, the metadata record, space padding to 8 bytes.
GOLDEN_HEADER = (
    '{"__metadata__":{"posthoc_ema":"{\\"format\\": 1, \\"kind\\": \\"snapshot\\", \\"sigma_rel\\": 0.05, '
    '\\"gamma\\": 16.97219860230345, \\"t\\": 1, \\"time_unit\\": \\"step\\", \\"updates\\": 1, '
    '\\"dtype\\": \\"float32\\", \\"library\\": {\\"name\\": \\"posthoc-ema\\", \\"version\\": \\"VERSION\\"}, '
    '\\"created\\": \\"CREATED\\"}"},'
    '"fc.weight":{"dtype":"F32","shape":[3,2],"data_offsets":[0,24]},'
    '"fc.bias":{"dtype":"F32","shape":[3],"data_offsets":[24,36]},'
    '"bn.weight":{"dtype":"F32","shape":[3],"data_offsets":[36,48]},'
    '"bn.bias":{"dtype":"F32","shape":[3],"data_offsets":[48,60]},'
    '"bn.running_mean":{"dtype":"F32","shape":[3],"data_offsets":[60,72]},'
    '"bn.running_var":{"dtype":"F32","shape":[3],"data_offsets":[72,84]},'
    '"bn.num_batches_tracked":{"dtype":"I64","shape":[],"data_offsets":[84,92]}}'
)


def test_golden_header_bytes(tmp_path):
    torch.manual_seed(0)
    model = Golden()
    with Recorder(model, tmp_path, sigma_rels=(0.05, 0.10), snapshot_every=1) as rec:
        rec.update()
    raw = (tmp_path / "ema-s0.050-t000000000001.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 4096 == 0  # tensor data starts on a page boundary
    text = raw[8 : 8 + n].decode()
    created = re.search(r'\\"created\\": \\"([^"\\]*)\\"', text)
    assert created and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", created.group(1))
    golden = GOLDEN_HEADER.replace("VERSION", __version__)
    assert text.rstrip(" ").replace(created.group(1), "CREATED") == golden
    assert 0 <= n - len(text.rstrip(" ")) < 4096  # only spaces pad the header, less than a page
    # the data section is the tensors, in header order, as raw little-endian bytes
    state = model.state_dict()
    data = b"".join(state[k].numpy().tobytes() for k in state)
    assert raw[8 + n :] == data


def _all_dtypes() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = []
    for dtype, code in torch_codes().items():
        if dtype.is_floating_point:
            base = torch.randn(3, 5, generator=g, dtype=torch.float32) * 100
            if code.startswith("F8"):
                base = base.clamp(-400, 400)
            value = base.to(dtype)
        elif dtype == torch.bool:
            value = torch.rand(3, 5, generator=g) > 0.5
        else:
            info = torch.iinfo(dtype)
            value = torch.tensor([info.min, info.max, 0, 1, info.max - 1], dtype=dtype)
        tensors += [
            (f"{code}.matrix", value),
            (f"{code}.scalar", value.reshape(-1)[1].clone()),  # 0-dim
            (f"{code}.empty", value.reshape(-1)[:0].reshape(0, 4)),  # no elements
        ]
    return tensors


def test_every_dtype_round_trips_through_our_writer(tmp_path):
    tensors = _all_dtypes()
    path = write_file(tmp_path / "all.safetensors", tensors, {"note": "x"})
    header = read_header(path)
    assert {n: (e.code, e.shape) for n, e in header.tensors.items()} == {
        n: (torch_codes()[t.dtype], tuple(t.shape)) for n, t in tensors
    }
    assert header.metadata == {"note": "x"}
    ours = load_tensors(header)
    theirs = safetensors.torch.load_file(path)
    for name, value in tensors:
        for got in (ours[name], theirs[name]):
            assert got.dtype == value.dtype and got.shape == value.shape, name
            assert got.reshape(-1).view(torch.uint8).tolist() == value.reshape(-1).view(torch.uint8).tolist(), name


def test_files_written_by_safetensors_read_back_with_our_reader(tmp_path):
    tensors = dict(_all_dtypes())
    path = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"k": "v"})
    ours = load_tensors(read_header(path))
    assert read_header(path).metadata == {"k": "v"}
    for name, value in tensors.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape
        assert torch.equal(ours[name].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("snapshot_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_snapshot_dtypes_and_non_float_buffers_stored_unchanged(tmp_path, snapshot_dtype):
    class Buffers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))
            self.register_buffer("mask", torch.tensor([True, False, True]))
            self.register_buffer("ids", torch.tensor([7, -3], dtype=torch.int32))
            self.register_buffer("codes", torch.tensor([250, 3], dtype=torch.uint8))
            self.register_buffer("lowp", torch.zeros(2, dtype=torch.float16))

    model = Buffers()
    with Recorder(model, tmp_path, sigma_rels=(0.05, 0.10), snapshot_every=3, snapshot_dtype=snapshot_dtype) as rec:
        for t in range(1, 7):
            with torch.no_grad():
                model.fc.weight.add_(0.1)
                model.steps.fill_(t * 1000)
                model.mask[1] = t % 2 == 0
                model.ids.mul_(-1)
                model.codes.add_(1)
                model.lowp.fill_(t)
            rec.update()
            if t in (3, 6):
                rec.flush()
                expected = {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point()}
                for snap in scan(tmp_path).snapshots:
                    if snap.t == t:
                        got = load_tensors(snap.header)
                        for name, value in expected.items():
                            assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
                        for name in ("fc.weight", "fc.bias", "lowp"):
                            assert got[name].dtype == snapshot_dtype  # averaged: stored in the snapshot dtype
    # synthesis copies integer and bool buffers from the latest input, it never averages them
    # six updates: 0.07 is poor (allow_poor), but the buffers are what this checks
    out = safetensors.torch.load_file(synthesize(tmp_path, 0.07, out=tmp_path / "out" / "ema.safetensors", allow_poor=True)[0])
    for name, value in model.state_dict().items():
        if not value.is_floating_point():
            assert out[name].dtype == value.dtype and torch.equal(out[name], value), name


def test_load_synthesized_with_odd_sized_buffers(tmp_path):
    model = nn.Module()
    model.register_buffer("mask", torch.ones(3, dtype=torch.bool))
    model.fc = nn.Linear(2, 2)
    with Recorder(model, tmp_path, snapshot_every=1) as rec:
        rec.update()
        rec.update()
    out = load_synthesized(tmp_path, 0.07, allow_poor=True)  # two updates: poor, but the buffers are what counts
    assert torch.equal(out["mask"], model.mask) and out["fc.weight"].dtype == torch.float32


def test_write_interrupted_by_an_exception_leaves_nothing_a_scan_accepts(tmp_path):
    metadata = snapshot_metadata(sigma_rel=0.05, gamma=16.97219860230345, t=5, time_unit="step", updates=5, dtype="float32")
    layout = [("a", "F32", (1000,)), ("b", "F32", (1000,))]
    path = tmp_path / "ema-s0.050-t000000000005.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with AtomicWriter(path, layout, metadata) as writer:
            writer.write(torch.ones(1000))
            writer.write(torch.ones(500))  # half of the second tensor
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # temp file removed, no final file
    # a write that never reaches commit() (the process died) leaves only the temp file, which scans ignore
    writer = AtomicWriter(path, layout, metadata)
    writer.write(torch.ones(1000))
    writer._file.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name + ".tmp"]
    catalogue = scan(tmp_path)
    assert not catalogue.series and not catalogue.broken
    assert [s.reason for s in catalogue.ignored] == ["temporary file of an unfinished write"]
    writer.abort()
    # commit() refuses a file whose layout was not completely written
    with AtomicWriter(path, layout, metadata) as writer:
        writer.write(torch.ones(1000))
        with pytest.raises(ValueError, match="bytes of the layout were not written"):
            writer.commit()
    assert list(tmp_path.iterdir()) == []


def test_a_complete_write_is_a_valid_snapshot_and_the_next_write_clears_a_stale_temp_file(tmp_path):
    metadata = snapshot_metadata(sigma_rel=0.05, gamma=16.97219860230345, t=5, time_unit="step", updates=5, dtype="float32")
    path = tmp_path / "ema-s0.050-t000000000005.safetensors"
    (tmp_path / (path.name + ".tmp")).write_bytes(b"half a file from a crashed run")
    write_file(path, [("w", torch.arange(4.0))], metadata)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    snap = read_snapshot(path)
    assert (snap.sigma_rel, snap.t, snap.updates, snap.dtype) == (0.05, 5, 5, "float32")
    assert json.loads(snap.header.metadata["posthoc_ema"])["library"] == {"name": "posthoc-ema", "version": __version__}


def test_writer_never_follows_a_symlink_planted_at_its_temp_name(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out" / "ema.safetensors"
    out.parent.mkdir()
    (out.parent / "ema.safetensors.tmp").symlink_to(victim)
    write_file(out, [("w", torch.ones(3))], {})
    assert victim.read_text() == "precious"
    assert not out.is_symlink() and torch.equal(safetensors.torch.load_file(out)["w"], torch.ones(3))


@pytest.mark.skipif(leftovers.fcntl is None, reason="no advisory locks on this system")
def test_a_live_writers_temp_file_is_never_taken_over(tmp_path, monkeypatch):
    """Also where exclusive locks need a file open for writing (NFS emulates flock so)."""
    fcntl, real_flock = leftovers.fcntl, leftovers.fcntl.flock

    def nfs_flock(fd: int, operation: int) -> None:
        if operation & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    out = tmp_path / "ema.safetensors"
    first = AtomicWriter(out, [("w", "F32", (4,))], {})
    with pytest.raises(OutputError, match="is being written by another run"):
        AtomicWriter(out, [("w", "F32", (4,))], {}, overwrite=True)
    first.write(torch.arange(4.0))
    first.commit()
    assert torch.equal(safetensors.torch.load_file(out)["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.safetensors"]


def test_synthesized_output_header_is_a_plain_loadable_state_dict(tmp_path):
    model = Golden()
    with Recorder(model, tmp_path / "ckpts", sigma_rels=(0.05, 0.10), snapshot_every=2) as rec:
        for _ in range(6):
            with torch.no_grad():
                model.fc.weight.add_(0.1)
            rec.update()
    out = synthesize(tmp_path / "ckpts", 0.08, out=tmp_path / "ema.safetensors")[0]
    Golden().load_state_dict(safetensors.torch.load_file(out))
    snap = read_snapshot(out)
    assert snap.kind == "synthesized" and snap.t == 6 and snap.sigma_rel == 0.08
    info = snap.info
    assert {"inputs", "weights", "profile_error", "sum_abs_weights"} <= info.keys()
    assert abs(sum(info["weights"]) - 1) < 1e-9
    assert scan(tmp_path / "ckpts").series.keys() == {0.05, 0.10}  # outputs are never taken for inputs


def test_file_systems_without_hard_links_still_write_atomically_and_never_clobber(tmp_path, monkeypatch):
    import errno
    import os

    def no_links(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = write_file(tmp_path / "a.safetensors", [("w", torch.ones(2))], {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    from posthoc_cli import OutputError

    with pytest.raises(OutputError, match="already exists"):
        write_file(path, [("w", torch.zeros(2))], {})
    assert torch.equal(safetensors.torch.load_file(path)["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    write_file(path, [("w", torch.zeros(2))], {}, overwrite=True)
    assert torch.equal(safetensors.torch.load_file(path)["w"], torch.zeros(2))


def test_models_with_empty_and_0_dim_tensors_synthesize(tmp_path):
    model = nn.Linear(2, 2)
    model.register_buffer("placeholder", torch.empty(0))
    model.register_buffer("temperature", torch.tensor(2.0))  # 0-dim float: averaged like any other
    with Recorder(model, tmp_path / "ckpts", snapshot_every=1) as rec:
        rec.update()
        rec.update()
    out = safetensors.torch.load_file(synthesize(tmp_path / "ckpts", 0.07, out=tmp_path / "ema.safetensors", allow_poor=True)[0])  # 2 updates: poor
    assert out["placeholder"].shape == (0,) and out["temperature"].shape == () and float(out["temperature"]) == 2.0
