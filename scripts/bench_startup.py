"""Start-up time of the commands that need no tensors, against ``python -c "import torch"``.

Each case is the wall time of one fresh process, started and waited for by this
script, with its output discarded: what a user at a shell prompt (or a shell
loop, or tab completion) waits for. The cases of a round run back to back in a
rotating order after an untimed warm-up round (so every file is in page cache),
and every ratio compares medians measured in this one run:

- ``python -c "import torch"``: the yardstick (what every command paid before);
- ``python -c "pass"``: the interpreter alone, the floor no Python CLI goes below;
- ``posthoc-ema --version``, ``--help``;
- ``posthoc-ema beta-to-sigma 0.999 --steps 100000``;
- ``posthoc-ema inspect DEMO``, DEMO a folder written by ``posthoc-ema demo --out``
  (made once, untimed, before the rounds).

Target (issue 14): ``--version``, ``beta-to-sigma`` and ``inspect`` each <= 0.25x
``import torch``.

    python scripts/bench_startup.py [--quick] [--repeats N]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _bench as B

TARGET = 0.25
TARGETED = ("posthoc-ema --version", "posthoc-ema beta-to-sigma 0.999 --steps 100000", "posthoc-ema inspect DEMO")


def entry_point() -> str:
    """The console script installed next to this interpreter (a venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).with_name("posthoc-ema")
    found = str(beside) if beside.exists() else shutil.which("posthoc-ema")
    if not found:
        sys.exit("the posthoc-ema entry point is not installed: run `pip install -e .`")
    return found


def timed(command: list[str]) -> B.Case:
    def case() -> float:
        start = B.now()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return B.now() - start

    return case


def main() -> None:
    args = B.parser(__doc__ or "", default_repeats=9, quick_repeats=5).parse_args()
    repeats = B.repeats_of(args)
    entry = entry_point()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as scratch:
        demo = Path(scratch) / "demo"
        subprocess.run([entry, "demo", "--out", str(demo)], stdout=subprocess.DEVNULL, check=True)
        cases = {
            'python -c "import torch"': timed([sys.executable, "-c", "import torch"]),
            'python -c "pass"': timed([sys.executable, "-c", "pass"]),
            "posthoc-ema --version": timed([entry, "--version"]),
            "posthoc-ema --help": timed([entry, "--help"]),
            "posthoc-ema beta-to-sigma 0.999 --steps 100000": timed([entry, "beta-to-sigma", "0.999", "--steps", "100000"]),
            "posthoc-ema inspect DEMO": timed([entry, "inspect", str(demo)]),
        }
        results = B.run_interleaved(cases, repeats)
    B.print_environment({"entry point": entry, "repeats": str(repeats)})
    torch_s = B.median(results['python -c "import torch"'])
    rows = []
    for name, times in results.items():
        x = B.ratio(B.median(times), torch_s)
        verdict = ("met" if x is not None and x <= TARGET else "NOT met") if name in TARGETED else ""
        rows.append([name, B.fmt_s(B.median(times)), B.fmt_s(min(times)), B.fmt_x(x), f"<= {TARGET}x" if verdict else "", verdict])
    B.print_table(
        f"Start-up, wall time of one process (median of {repeats})",
        ["command", "median", "min", "vs import torch", "target", ""],
        rows,
    )


if __name__ == "__main__":
    main()
