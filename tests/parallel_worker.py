"""Run ``posthoc-ema`` under torchrun with rank 1 limited to 4 KiB files: its first write past the
header gets SIGXFSZ from the kernel, which kills it (a rank killed mid-way, without hooks in our code).
Python ignores SIGXFSZ (the write would fail with EFBIG instead): its default action is restored."""

from __future__ import annotations

import os
import resource
import signal

import posthoc_cli.cli.main
import posthoc_cli.synth.team  # noqa: F401  (imported before the limit: no cache file may be written after it)

if os.environ.get("RANK") == "1":
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
posthoc_cli.cli.main.main()
