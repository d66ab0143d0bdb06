"""The ranks of ``torch.distributed`` as recording sees them: every call recording makes to it goes through here.

Outside a process group (one process, or ``torch.distributed`` unavailable) there is
one rank, rank 0, and waiting for the others returns at once. Nothing here imports
``torch.distributed.tensor``: :mod:`.dtensors` does that, and only for a model that
holds DTensors.

>>> alone(lambda: set_aside_after("ckpts", 100), mine=rank() == 0, together=True)  # doctest: +SKIP
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import torch


def grouped() -> bool:
    """Whether this process is one rank of an initialised process group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return torch.distributed.get_rank() if grouped() else 0


def world_size() -> int:
    """The number of ranks in the job (1 outside a process group)."""
    return torch.distributed.get_world_size() if grouped() else 1


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for outside a process group)."""
    if grouped():
        torch.distributed.barrier()


def alone(act: Callable[[], object], *, mine: bool, together: bool) -> None:
    """``act`` on this rank if ``mine``; with ``together`` every rank waits for it between two barriers.

    For a change to a folder every rank reads and writes (a sharded model's): no
    rank writes or scans while one rank moves files. Without ``together`` only the
    acting rank uses the folder, and nobody waits.
    """
    if together:
        barrier()
    if mine:
        act()
    if together:
        barrier()


def agreed_id() -> str:
    """A new random id, the same on every rank: rank 0's, broadcast (every rank must call this)."""
    chosen: list[str | None] = [uuid.uuid4().hex if rank() == 0 else None]
    if grouped():
        torch.distributed.broadcast_object_list(chosen, src=0)
    assert chosen[0] is not None
    return chosen[0]


__all__ = ["agreed_id", "alone", "barrier", "grouped", "rank", "world_size"]
