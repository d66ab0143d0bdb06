"""One exception tree whose messages are written for users.

Every error the library raises on purpose is a :class:`PosthocError`. Its
message reads ``<what went wrong> — <what to do>``; the CLI prints it as
``Error: <message>`` and exits with :attr:`PosthocError.exit_code`, so a user
never sees a traceback for a mistake of theirs.

A message that tells the user to change an argument names it with :func:`arg`
(or :func:`spelled`), which keeps both spellings: ``str(error)`` names the Python
argument (``force=True``), :func:`cli_text` the command line's flag (``--force``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

# An argument named in a message: both spellings between private-use characters, so that text
# built from messages (a rank's error relayed to rank 0, a re-raised error) keeps them both.
_OPEN, _BETWEEN, _CLOSE = "\ue000", "\ue001", "\ue002"
_SPELLED = re.compile(f"{_OPEN}([^{_BETWEEN}]*){_BETWEEN}([^{_CLOSE}]*){_CLOSE}")
# Python arguments whose flag is not --name-with-dashes.
_FLAGS = {"t": "--step", "sigma_rels": "--sigma-rel"}
_ANY = object()


def spelled(python: str, cli: str) -> str:
    """Text that reads ``python`` in Python and ``cli`` on the command line."""
    return f"{_OPEN}{python}{_BETWEEN}{cli}{_CLOSE}"


def arg(name: str, value: object = _ANY) -> str:
    """The argument ``name`` (set to ``value``): ``force=True`` / ``--force``, ``t=5`` / ``--step 5``, ``out=…`` / ``--out``."""
    flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
    if value is _ANY:
        return spelled(f"{name}=…", flag)
    return spelled(f"{name}={value!r}", flag if value is True else f"{flag} {value}")


def few(names: Sequence[str], limit: int = 3) -> str:
    """``'a', 'b', 'c' and 4 more``: names for a one-line message."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def python_text(text: str) -> str:
    """``text`` with its arguments spelled for Python."""
    return _SPELLED.sub(r"\1", text)


def cli_text(text: str | BaseException) -> str:
    """``text`` (or an error's message) with its arguments spelled as the command line's flags."""
    raw = text.message if isinstance(text, PosthocError) else str(text)
    return _SPELLED.sub(r"\2", raw)


class PosthocError(Exception):
    """Something the user can fix; the message says what and how."""

    exit_code = 1

    def __init__(self, what: str, fix: str | None = None) -> None:
        self.raw = (what, fix)  # with both spellings of the arguments named (see arg): to build another error
        self.what = python_text(what)
        self.fix = None if fix is None else python_text(fix)
        self.message = f"{what} — {fix}" if fix else what  # raw too: cli_text reads it
        super().__init__(python_text(self.message))


class InvalidValueError(PosthocError, ValueError):
    """A value given by the user is outside its valid range (bad usage, exit 2)."""

    exit_code = 2


class PoorTargetError(InvalidValueError):
    """A target the snapshots reproduce only roughly (profile error above :data:`~posthoc_cli.ema.quality.POOR`)."""


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

    def __init__(self, what: str, fix: str | None = None, *, exit_code: int = 1, lost_peer: bool = False) -> None:
        super().__init__(what, fix)
        self.exit_code = exit_code
        self.lost_peer = lost_peer  # a rank died without a word: the process group is broken


class ModelChangedError(PosthocError):
    """The model's tensors were replaced in a way the Recorder cannot follow (e.g. resharded after averaging began)."""


class EvaluationError(PosthocError):
    """No candidate of a sweep could be evaluated: every evaluation failed."""
