"""One rank of a distributed recording, run by ``torchrun`` from tests/test_distributed.py (gloo, CPU).

    torchrun --nproc-per-node N tests/dist_worker.py LAYOUT FOLDER STEPS [--kill-after K] [--count OUT.json]

LAYOUT is ``fsdp`` (fully_shard on a 1-D mesh), ``tp`` (parallelize_module:
colwise then rowwise), ``hsdp`` (fully_shard on a 2×2 mesh: replicate × shard)
``fsdp+tp`` (2×2: fully_shard over dp, parallelize_module over tp: rowwise fc2)
or ``titan`` (2×2, as torchtitan composes them: colwise fc1 and rowwise fc2 over
tp, then fully_shard over dp, which gives fc1 ``_StridedShard`` placements). Every
rank builds the same model from a seed, shards it, makes a Recorder, replays
the deterministic trajectory up to the Recorder's resume time (a stand-in for
loading a training checkpoint), then trains to STEPS: each step is a forward
and backward pass (FSDP2's all-gathers and reduce-scatters run; gradients are dropped) and a drift of every parameter that
:func:`trajectory` defines on the *full* tensor, applied to the local shard, so
an unsharded Recorder fed the full weights (:func:`reference_run`) is the oracle.

``--kill-after K`` SIGKILLs this rank (rank 1) at its K-th write call of a snapshot
file (a random moment while writing). ``--count`` writes the number of
collectives seen during the updates and snapshots (and, as a control, during
the forward passes) to a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

SIGMA_RELS = (0.05, 0.10)
SNAPSHOT_EVERY = 4


class Net(nn.Module):
    """Uneven dimensions (7, 10 rows), a parameter smaller than 3 ranks, tied weights, float and integer buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.fc1 = nn.Linear(6, 7)
        self.fc2 = nn.Linear(7, 6)
        self.small = nn.Parameter(torch.randn(2))
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("running", torch.zeros(6))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(self.embed(x))))
        return self.head(h + self.small.sum())


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def trajectory(step: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The drift of parameter ``name`` at ``step``, on the full tensor (the same on every rank and in the oracle)."""
    g = torch.Generator().manual_seed(step * 1000 + sum(map(ord, name)))
    return 0.01 * torch.randn(shape, generator=g) + 0.002


def advance(model: nn.Module, step: int) -> None:
    """Apply one step of the trajectory to whatever each parameter is here (a full tensor or a local shard)."""
    from posthoc_cli.record.dtensors import is_dtensor

    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights once
            delta = trajectory(step, name, tuple(p.shape))
            if is_dtensor(p):
                (chunk,) = p.__create_chunk_list__()
                box = tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))
                p._local_tensor.add_(delta[box])
            else:
                p.add_(delta)
        model.running.add_(float(step))
        model.seen.add_(1)


def reference_run(folder: Path, steps: int, **options: object) -> None:
    """The oracle: an unsharded Recorder fed the full weights of every step (runs in one process)."""
    from posthoc_cli import Recorder

    model = make_model()
    with Recorder(model, folder, sigma_rels=SIGMA_RELS, snapshot_every=SNAPSHOT_EVERY, **options) as rec:  # type: ignore[arg-type]
        for step in range(1, steps + 1):
            advance(model, step)
            rec.update()


def shard(model: Net, layout: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    world = int(os.environ["WORLD_SIZE"])
    tp_plan = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
    if layout == "fsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    elif layout == "tp":
        parallelize_module(model, init_device_mesh("cpu", (world,)), tp_plan)
    elif layout == "hsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")))
    elif layout == "fsdp+tp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"fc2": RowwiseParallel()})
        fully_shard(model, mesh=mesh["dp"])
    elif layout == "titan":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], tp_plan)
        for layer in (model.fc1, model.fc2):
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        assert type(model.fc1.weight.placements[0]).__name__ == "_StridedShard", model.fc1.weight.placements
    elif layout in ("scattered", "partial"):  # layouts the Recorder must refuse (fully_shard first: FSDP2's lazy init)
        from torch.distributed.tensor import DTensor, Partial, distribute_tensor
        from torch.distributed.tensor.placement_types import _StridedShard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model, mesh=mesh)
        if layout == "scattered":  # rows {0, 1, 4, 5} of 7 on rank 0: not one block
            model.fc1.weight = nn.Parameter(distribute_tensor(model.fc1.weight.full_tensor().detach(), mesh, [_StridedShard(0, split_factor=2)], src_data_rank=None))
        else:
            model.small = nn.Parameter(DTensor.from_local(torch.ones(2), mesh, [Partial()], run_check=False))
    else:
        raise SystemExit(f"unknown layout {layout}")


class Collectives:
    """Counts collective operations: every c10d op the dispatcher sees, and calls of torch.distributed's functions."""

    NAMES = (
        "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
        "barrier", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "gather", "scatter", "reduce",
        "all_gather_object", "broadcast_object_list",
    )

    def __init__(self) -> None:
        import torch.distributed as dist
        from torch.utils._python_dispatch import TorchDispatchMode

        self.count = 0
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                if "c10d" in str(func):
                    counter.count += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(original))

    def _wrap(self, original):  # type: ignore[no-untyped-def]
        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.count += 1
            return original(*args, **kwargs)

        return counted


def check_local_use(model: nn.Module, rec: object) -> None:
    """``ema_state_dict`` gives local shards as DTensors that load into the model; ``swapped`` swaps local shards."""
    from posthoc_cli.record.dtensors import is_dtensor

    ema = rec.ema_state_dict(0.05)  # type: ignore[attr-defined]
    live = {n: t.detach().clone() for n, t in model.state_dict().items()}
    for name, t in model.state_dict().items():
        assert is_dtensor(ema[name]) == is_dtensor(t), name
        if is_dtensor(t):
            assert ema[name].shape == t.shape and ema[name].placements == t.placements, name
    with rec.swapped(0.05):  # type: ignore[attr-defined]
        for name, t in model.state_dict().items():
            mine = t._local_tensor if is_dtensor(t) else t
            theirs = ema[name]._local_tensor if is_dtensor(ema[name]) else ema[name]
            if mine.is_floating_point():
                assert torch.equal(mine, theirs), name
    for name, t in model.state_dict().items():  # the training weights are back
        a = t._local_tensor if is_dtensor(t) else t
        b = live[name]._local_tensor if is_dtensor(live[name]) else live[name]
        assert torch.equal(a, b), name
    model.load_state_dict(ema)


def check_torch_loads_dtensors(model: nn.Module, rec: object) -> None:
    """DCP loads the latest snapshot folder into DTensors laid out like the model (strided ones too): our local EMAs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from posthoc_cli import scan
    from posthoc_cli.record.dtensors import is_dtensor

    torch.distributed.barrier()  # every rank's file of the set is written
    snap = scan(rec.ckpt_dir).series[0.05][-1]  # type: ignore[attr-defined]
    if snap.t != rec.t:  # type: ignore[attr-defined]
        return  # the run stopped between snapshots
    ema = {n: t for n, t in rec.ema_state_dict(0.05).items() if is_dtensor(t)}  # type: ignore[attr-defined]
    state = {n: torch.distributed.tensor.DTensor.from_local(torch.full_like(t._local_tensor, 7.0), t.device_mesh, t.placements,
                                                              shape=t.shape, stride=t.stride()) for n, t in ema.items()}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(snap.path)))
    assert all(torch.equal(state[n]._local_tensor, t._local_tensor) for n, t in ema.items())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("layout")
    parser.add_argument("folder", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--kill-after", type=int, default=0)
    parser.add_argument("--count", type=Path)
    parser.add_argument("--late", action="store_true", help="make the Recorder before sharding the model")
    parser.add_argument("--update-every", type=int, default=1)
    parser.add_argument("--ema-device")
    args = parser.parse_args()

    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    counter = Collectives() if args.count else None
    if args.kill_after and rank == 1:
        from posthoc_cli.format import atomic

        calls = {"n": 0}
        write = atomic.AtomicWriter.write

        def dying_write(self, data):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] >= args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return write(self, data)

        atomic.AtomicWriter.write = dying_write  # type: ignore[method-assign]

    from posthoc_cli import Recorder

    model = make_model()
    options = {"update_every": args.update_every, "ema_device": args.ema_device}
    if args.late:  # the Recorder must follow fully_shard's new parameters (issue 10's stale-tensor defect)
        rec = Recorder(model, args.folder, sigma_rels=SIGMA_RELS, snapshot_every=SNAPSHOT_EVERY, **options)
        shard(model, args.layout)
    else:
        shard(model, args.layout)
        rec = Recorder(model, args.folder, sigma_rels=SIGMA_RELS, snapshot_every=SNAPSHOT_EVERY, **options)
    x = torch.arange(6).reshape(2, 3) % 10
    for step in range(1, rec.t + 1):  # "load the training checkpoint" of time rec.t
        advance(model, step)
    in_updates = in_forward = 0
    for step in range(rec.t + 1, args.steps + 1):
        before = counter.count if counter else 0
        if args.layout in ("fsdp", "hsdp"):  # (this toy model has no TP-ready forward; the TP layouts record without one)
            with counter.mode() if counter else contextlib.nullcontext():
                model(x).square().mean().backward()  # FSDP2 reshards after backward
            model.zero_grad(set_to_none=True)
        in_forward += (counter.count - before) if counter else 0
        advance(model, step)
        before = counter.count if counter else 0
        if counter:
            with counter.mode():
                rec.update()
                if step == args.steps:
                    rec.snapshot()
                    rec.flush()
        else:
            rec.update()
        in_updates += (counter.count - before) if counter else 0
    rec.close()
    if args.layout == "titan":
        check_torch_loads_dtensors(model, rec)
    check_local_use(model, rec)
    if counter and args.count:
        args.count.with_name(f"{args.count.stem}-{rank}.json").write_text(
            json.dumps({"updates": args.steps - 0, "in_updates": in_updates, "in_forward": in_forward})
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
