"""One exception tree whose messages are written for users.

Every error the library raises on purpose is a :class:`PosthocError`. Its
message reads ``<what went wrong> — <what to do>``; the CLI prints it as
``Error: <message>`` and exits with :attr:`PosthocError.exit_code`, so a user
never sees a traceback for a mistake of theirs.
"""

from __future__ import annotations

import os


class PosthocError(Exception):
    """Something the user can fix; the message says what and how."""

    exit_code = 1

    def __init__(self, what: str, fix: str | None = None) -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what} — {fix}" if fix else what)


class InvalidValueError(PosthocError, ValueError):
    """A value given by the user is outside its valid range (bad usage, exit 2)."""

    exit_code = 2


class PoorTargetError(InvalidValueError):
    """A target the snapshots reproduce only roughly (profile error above :data:`~posthoc_cli.quality.POOR`)."""


class SnapshotFileError(PosthocError):
    """A file on disk is missing, unreadable, corrupt or not what it should be."""

    def __init__(self, path: str | os.PathLike[str], what: str, fix: str | None = None) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {what}", fix)


class CatalogueError(PosthocError):
    """The snapshot folder as a whole cannot serve the request."""


class ResumeError(PosthocError):
    """A Recorder refuses to continue the snapshots already in its folder."""


class OutputError(PosthocError):
    """An output file cannot be written (exists, unwritable, disk full)."""


class NonFiniteError(PosthocError):
    """A snapshot tensor holds NaN or Inf values."""


class WriterError(PosthocError):
    """A background snapshot write failed; raised in the training thread."""


class FrozenWeightsError(PosthocError):
    """Frozen weights stored once per folder are missing, or the model no longer holds them."""


class ParallelError(PosthocError):
    """Another rank of a parallel synthesis failed (its message), or stopped without a word."""

    def __init__(self, what: str, fix: str | None = None, *, exit_code: int = 1) -> None:
        super().__init__(what, fix)
        self.exit_code = exit_code


class ModelChangedError(PosthocError):
    """The model's tensors were replaced in a way the Recorder cannot follow (e.g. resharded after averaging began)."""
