"""The ranks of a parallel synthesis under ``torchrun``: a :class:`~.coordinator.Coordinator` on torch.distributed.

Under ``torchrun --nproc-per-node N -m posthoc_cli synthesize …`` every rank plans
the same synthesis from the headers, then takes one contiguous byte range of
the model (tensors one after another, cut at element boundaries): it reads
those bytes of every input and writes the matching bytes of every output, with
positioned writes into temporary files that rank 0 created at full size
(:mod:`.synthesis` does the steps; this module only makes them collective).

Coordination is a handful of collectives on a gloo group (CPU objects; a new
gloo group is made when the default backend is another, e.g. NCCL): each
exchange shares every rank's outcome, and if any rank failed, all raise its
error. Across nodes the snapshot folder and the output must be on a shared
file system. The one-process path never imports this module.

>>> with Team.join() as team:  # doctest: +SKIP
...     p, paths = plan_outputs(team, "ckpts", [0.15], out="ema.safetensors")
...     for _ in synthesize_iter(p, paths, coordinator=team):
...         pass
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

import torch.distributed as dist

from ..errors import ParallelError, PosthocError
from .plan import Plan

T = TypeVar("T")


def _describe(error: BaseException) -> tuple[int, str]:
    """The exit code and one-line message a rank reports for its error."""
    if isinstance(error, PosthocError):
        return error.exit_code, error.message  # both spellings: rank 0's CLI prints the flags
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return 1, f"{where}{error.strerror or error} — check the path and its permissions"
    return 1, f"{type(error).__name__}: {error}"


class Team:
    """The ranks of one parallel synthesis, over a gloo process group."""

    def __init__(self, group: dist.ProcessGroup | None = None, *, owns_default: bool = False) -> None:
        if group is None:
            group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._owns_default = owns_default
        self._broken = False  # a peer died: the group cannot be torn down collectively

    @classmethod
    def join(cls, timeout: timedelta | None = None) -> Team:
        """Join the process group the launcher describes (initialised here unless it already is)."""
        if dist.is_initialized():
            return cls()
        try:
            dist.init_process_group("gloo", timeout=timeout)
        except Exception as e:  # rendezvous failed: unreachable MASTER_ADDR, a port in use, a timeout
            raise ParallelError(
                f"cannot join the ranks of the parallel synthesis ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})",
                "check torchrun's --rdzv-endpoint / MASTER_ADDR and MASTER_PORT",
            ) from e
        return cls(owns_default=True)

    def close(self) -> None:
        # Tearing down a group whose peer is gone waits on (or aborts in) gloo's C++: leave it to the exit.
        if self._owns_default and dist.is_initialized() and not self._broken:
            dist.destroy_process_group()
            self._owns_default = False

    def __enter__(self) -> Team:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _gather(self, item: object) -> list[Any]:
        out: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(out, item, group=self.group)
        except Exception as e:  # a peer died: gloo reports a closed connection or a timeout
            self._broken = True
            raise ParallelError(
                f"another rank of the parallel synthesis stopped without reporting why ({type(e).__name__})",
                "see that rank's log (torchrun names the failed rank); nothing was written",
                lost_peer=True,
            ) from e
        return out

    def settle(self, error: BaseException | None, value: T | None = None) -> list[T]:
        """Share every rank's outcome; raise the first rank's error on all ranks, else return all values."""
        gathered = self._gather((None if error is None else _describe(error), None if error is not None else value))
        failed = [(rank, report) for rank, (report, _) in enumerate(gathered) if report is not None]
        if failed:
            rank, (code, message) = failed[0]
            if error is not None and rank == self.rank:
                raise error
            raise ParallelError(f"rank {rank}: {message}", exit_code=code) from error
        return [v for _, v in gathered]

    def agree(self, fn: Callable[[], T]) -> list[T]:
        """Run ``fn`` on every rank; every rank gets all results, or raises the first rank's error."""
        try:
            value = fn()
        except Exception as e:
            return self.settle(e)
        return self.settle(None, value)

    def part(self, p: Plan) -> tuple[int, int]:
        """This rank's byte range of the model (all ranks' ranges tile it)."""
        total = sum(e.nbytes for e in p.entries)
        return self.rank * total // self.size, (self.rank + 1) * total // self.size
