"""The names every posthoc-ema file shares: the metadata key of its record, the format version, the suffix.

A leaf: every other module of the format (and the writers above it) takes these from here.
"""

from __future__ import annotations

import datetime as _dt

from .._version import __version__

FORMAT_VERSION = 1  # of a snapshot's (and a synthesized file's) record
METADATA_KEY = "posthoc_ema"  # the safetensors ``__metadata__`` key holding our JSON record
SUFFIX = ".safetensors"
KINDS = ("snapshot", "synthesized")  # the kinds of file a snapshot record may describe
SWEEPS_FOLDER = "sweeps"  # inside a snapshot folder: the results of `posthoc-ema sweep`, never scanned



def library_info() -> dict[str, str]:
    """The ``library`` field of every record we write."""
    return {"name": "posthoc-ema", "version": __version__}


def utc_now() -> str:
    """The ``created`` field of a record: the time now, ``2026-12-04T21:41:42Z``."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# Wrappers that prefix state_dict names: DistributedDataParallel / DataParallel and torch.compile.
# Snapshot tensors are named without them (docs/design.md §2).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrappers(name: str) -> str:
    """``_orig_mod.module.fc.weight`` → ``fc.weight``."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


__all__ = ["FORMAT_VERSION", "KINDS", "METADATA_KEY", "SUFFIX", "WRAPPER_PREFIXES", "library_info", "strip_wrappers", "utc_now"]
