"""The ``posthoc-ema`` console script: Ctrl-C is handled from the first moment, then the CLI runs.

``[project.scripts]`` points here, not at :func:`posthoc_cli.cli.main.main`, because a
console script imports its target module before it calls anything: pointed at
``cli``, the CLI's imports (Typer, Rich, numpy: a few hundred milliseconds) would
run before any handler exists, and Ctrl-C there printed Python's traceback.
Importing this module costs only the package ``__init__`` (which loads its public
names lazily) and :mod:`signal`, so the handler below is in place before the
first heavy import. What remains unguarded is the interpreter's own start-up
(about 20 ms, before any code of ours runs).

Every interruption ends the same way, whatever was running: ``Error: interrupted``
on stderr (commands that write files add what they left behind) and exit code 130.
"""

from __future__ import annotations

import signal
import sys

TYPE_CHECKING = False  # not typing's: this module must import next to nothing
if TYPE_CHECKING:
    from types import FrameType
    from typing import NoReturn


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # The first Ctrl-C raises KeyboardInterrupt; the clean-up it starts (temporary files removed,
    # writer threads joined: a moment) must not be cut short by a second one, so later ones are ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> NoReturn:
    """Install the Ctrl-C handler, then import and run the command line."""
    # A shell starts background jobs with SIGINT ignored (and Python then leaves it so): keep it that way.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        from .cli.main import main as run_cli

        run_cli()  # always ends in SystemExit
    except KeyboardInterrupt:  # during the imports above, or anywhere the CLI did not catch it itself
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stderr.write("Error: interrupted\n")
        sys.exit(130)
    finally:
        # The command is over (the exit code is decided): a Ctrl-C while the interpreter shuts down
        # (joining threads, flushing files) must not print a traceback over a finished command.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise AssertionError("unreachable: the CLI always exits")
