"""Who synthesizes: one process, or the ranks of a ``torchrun`` team, behind one small interface.

The orchestrator (:mod:`.synthesis`) runs the same steps either way; a
:class:`Coordinator` says which part of the model this process streams and
turns the few points where ranks must agree into collectives. On one process
(:class:`OneProcess`) they are plain calls, so that path never imports
``torch.distributed``; the team over a gloo group is :class:`.team.Team`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol, TypeVar, cast

from .plan import Plan

T = TypeVar("T")
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting its variables)."""
    return all(key in os.environ for key in _ENV)


class Coordinator(Protocol):
    """The processes of one synthesis; every method is collective (all of them call it, in the same order)."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def agree(self, fn: Callable[[], T]) -> list[T]:
        """Run ``fn`` on every process; each gets all results, or raises the first process's error."""
        ...

    def settle(self, error: BaseException | None, value: T | None = None) -> list[T]:
        """Share every process's outcome; raise the first process's error on all, else return all values."""
        ...

    def part(self, p: Plan) -> tuple[int, int] | None:
        """This process's byte range of the model, written in place into outputs rank 0 reserved;
        None: all of it, written in order (one process)."""
        ...

    def close(self) -> None:
        """Leave the group, if this coordinator joined one."""
        ...


class OneProcess:
    """A synthesis in this process alone: agreement is a plain call, an error is raised as it is."""

    rank = 0
    size = 1

    def agree(self, fn: Callable[[], T]) -> list[T]:
        return [fn()]

    def settle(self, error: BaseException | None, value: T | None = None) -> list[T]:
        if error is not None:
            raise error
        return [cast(T, value)]  # a value comes with every success

    def part(self, p: Plan) -> None:
        return None

    def close(self) -> None:
        pass
