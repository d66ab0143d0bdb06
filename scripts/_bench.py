"""Shared helpers for ``scripts/bench_*.py``: optional imports, interleaved timing, RSS, tables.

Not part of the package. The benchmarks print medians and ratios measured in one
process run; nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType

# `python scripts/bench_x.py` puts scripts/ on sys.path, not the repo root: add it so an
# uninstalled checkout of posthoc_cli is importable too.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PEERS_INSTALL = "pip install --no-deps ema-pytorch pytorch-posthoc-ema && pip install pillow"
MB = 1024 * 1024


# --- optional imports -------------------------------------------------------------------


def load_ours() -> tuple[ModuleType | None, str]:
    """``(posthoc_cli, version)`` or ``(None, why not)``; the benchmarks skip our rows without it."""
    try:
        import posthoc_cli

        _ = (posthoc_cli.Recorder, posthoc_cli.synthesize)  # both must exist, not just the package
    except Exception as exc:  # noqa: BLE001  (any failure means "not ready yet")
        return None, f"not importable yet ({type(exc).__name__}: {exc})"
    return posthoc_cli, getattr(posthoc_cli, "__version__", "?")


def load_baseline(root: str) -> ModuleType:
    """Another checkout's ``posthoc_cli`` (``root``/posthoc_cli), imported as ``posthoc_baseline`` beside ours.

    Its modules import each other relatively, so both versions live in one process and
    an A/B of the two is interleaved like any other pair of cases.
    """
    init = Path(root) / "posthoc_cli" / "__init__.py"
    spec = importlib.util.spec_from_file_location("posthoc_baseline", init, submodule_search_locations=[str(init.parent)])
    if spec is None or spec.loader is None or not init.is_file():
        raise SystemExit(f"--baseline {root}: no posthoc_cli package there")
    module = importlib.util.module_from_spec(spec)
    sys.modules["posthoc_baseline"] = module
    spec.loader.exec_module(module)
    return module


def load_peer(module: str, dist: str) -> tuple[ModuleType | None, str]:
    """``(module, version)`` of a peer package, or ``(None, "not installed ...")``."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001  (ImportError, or a missing dependency of the peer)
        return None, f"not installed ({type(exc).__name__}: {exc}; {PEERS_INSTALL})"
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return mod, version


# --- timing --------------------------------------------------------------------------------

# A case runs once and returns the seconds it measured itself (so untimed setup, such as
# deleting an old output or a device synchronisation, stays outside the measurement).
Case = Callable[[], float]


def run_interleaved(cases: Mapping[str, Case], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every case ``warmup`` times untimed, then ``repeats`` rounds of all cases.

    The cases of one round run back to back in a rotating order, so slow drift of the
    machine (page cache, thermal, other tenants) reaches every case alike.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    results: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            results[name].append(cases[name]())
    return results


def per_call(fn: Callable[[], object], calls: int, sync: Callable[[], object] | None = None) -> Case:
    """A case that times ``calls`` calls of ``fn`` back to back: seconds per call.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the clock starts and again before it
    stops, so work a device still has queued is neither charged to the block nor left out of it.
    """

    def case() -> float:
        if sync is not None:
            sync()
        t0 = now()
        for _ in range(calls):
            fn()
        if sync is not None:
            sync()
        return (now() - t0) / calls

    return case


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


# --- memory (Linux /proc) ---------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size (VmHWM) since start or since the last ``reset_peak_rss``."""
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


# --- output --------------------------------------------------------------------------------


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def fmt_x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def fmt_mb(n_bytes: float | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / MB:.1f} MB"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join([first, *rest])

    print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def print_environment(extra: Mapping[str, str] | None = None) -> None:
    """Versions and the machine; the load average says whether other work shared the CPUs."""
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, {platform.machine()}, "
          f"load average {load}")
    for name, value in (extra or {}).items():
        print(f"{name}: {value}")


def parser(description: str, *, default_repeats: int = 7, quick_repeats: int = 5) -> argparse.ArgumentParser:
    """Arguments every benchmark has: ``--repeats`` and ``--quick``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed repeats per case; the median is reported (default {default_repeats}, "
                        f"{quick_repeats} with --quick)")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (under a minute)")
    p.set_defaults(_default_repeats=default_repeats, _quick_repeats=quick_repeats)
    return p


def repeats_of(args: argparse.Namespace) -> int:
    if args.repeats is not None:
        return max(1, args.repeats)
    return args._quick_repeats if args.quick else args._default_repeats


def now() -> float:
    return time.perf_counter()
