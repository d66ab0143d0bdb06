"""Start-up: the commands that touch no tensor data never import torch, and Ctrl-C ends any command cleanly.

Every run goes through the installed ``posthoc-ema`` console script (beside
``sys.executable``), in a fresh interpreter. To see which modules a run
imported, the script is executed with :func:`runpy.run_path` — the same file,
the same code path — by a small launcher that writes ``sorted(sys.modules)`` to
a file once the command has exited. The same launcher can hold the start-up at
the import of a chosen module, so that Ctrl-C lands exactly there.

SIGINT is also sent to the bare script (no launcher) while torch is being
imported, during a long synthesis and during the demo's training: each time the
result must be ``Error: interrupted``, exit code 130, no traceback, and no
partial file left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import typer.main
from conftest import record_with_a_frozen_layer

from posthoc_cli import Recorder, read_snapshot
from posthoc_cli.cli.main import TENSOR_COMMANDS
from posthoc_cli.cli.main import app
from posthoc_cli.dtypes import SAFETENSORS_DTYPES, torch_codes, torch_dtype, torch_dtypes, unit_roundoff
from posthoc_cli.format.atomic import AtomicWriter

TIMEOUT = 300  # seconds for any one run; generous for a loaded 2-core machine

# Runs the console script as its own __main__ and reports what it imported. HOLD: block inside the
# import of that module (a finder that sleeps), after printing "HELD" on stderr, until a signal comes.
LAUNCHER = r"""
import json, os, runpy, sys, time
hold = os.environ.get("POSTHOC_TEST_HOLD")
if hold:
    class Hold:
        def find_spec(self, name, path=None, target=None):
            if name == hold:
                sys.meta_path.remove(self)
                sys.stderr.write("HELD\n")
                sys.stderr.flush()
                while True:
                    time.sleep(0.01)
            return None
    sys.meta_path.insert(0, Hold())
script = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    with open(os.environ["POSTHOC_TEST_MODULES"], "w") as f:
        json.dump(sorted(sys.modules), f)
"""


def entry_point() -> str:
    """The console script installed next to this interpreter (a venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).with_name("posthoc-ema")
    found = str(beside) if beside.exists() else shutil.which("posthoc-ema")
    assert found, "the posthoc-ema entry point is not installed: run `pip install -e .`"
    return found


def run_traced(tmp_path: Path, *args: object, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the installed script with ``args``; the result and the modules it had imported at exit."""
    modules = tmp_path / "modules.json"
    modules.unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, entry_point(), *map(str, args)],
        cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
        env={**os.environ, "COLUMNS": "200", "POSTHOC_TEST_MODULES": str(modules), **(env or {})},
    )
    return result, set(json.loads(modules.read_text()))


# -- light commands ---------------------------------------------------------------------------------

# One or more real runs of every command that is not in cli.main.TENSOR_COMMANDS. A new light command
# needs an example here (test_every_light_command_is_exercised says so). "{ckpts}": a recorded folder.
LIGHT_RUNS: list[tuple[list[str], int]] = [
    ([], 2),  # bare: the help
    (["--help"], 0),
    (["--version"], 0),
    (["--show-completion", "bash"], 0),
    (["beta-to-sigma", "0.999", "--steps", "100000"], 0),
    (["beta-to-sigma", "0.999"], 0),
    (["beta-to-sigma", "0.9999", "--steps", "10"], 1),
    (["sigma-to-beta", "0.1", "--steps", "100000"], 0),
    (["sigma-to-beta", "0.5", "--steps", "100000"], 2),
    (["inspect", "{ckpts}"], 0),
    (["inspect", "{ckpts}", "--json"], 0),
    (["inspect", "no-such-folder"], 1),
    (["inspect", "{ckpts}", "--beta", "0.99", "--ema", "window=50"], 0),
    (["plan", "--steps", "100000", "--snapshot-every", "1000", "--record", "0.05", "--record", "0.1", "-s", "0.15"], 0),
    (["plan", "--steps", "100000", "--snapshot-every", "1000", "--record", "0.05", "--record", "0.1", "--json"], 0),
    (["plan", "--steps", "1000", "--snapshot-every", "10", "--record", "0.05", "--ema", "bogus=1"], 2),
    (["plot", "{ckpts}", "-s", "0.15", "--out", "plot.png"], 0),
    (["prune", "{ckpts}", "--band", "0.05..0.10", "--max-error", "0.05"], 0),
    (["prune", "{ckpts}", "--band", "0.01..0.28", "--max-error", "0.001", "--yes"], 1),
    (["plan", "--steps", "1000", "--snapshot-every", "50", "--record", "0.05", "--record", "0.1", "--max-snapshots", "10"], 0),
    *[
        ([command, "--help"], 0)
        for command in ("synthesize", "inspect", "beta-to-sigma", "sigma-to-beta", "demo", "plan", "plot", "prune")
    ],
]


@pytest.mark.parametrize(("args", "code"), LIGHT_RUNS, ids=[" ".join(a) or "(bare)" for a, _ in LIGHT_RUNS])
def test_light_commands_do_not_import_torch(tmp_path, recorded, args, code):
    # Typer detects the shell from the parent process unless told not to (then it takes the named one).
    env = {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"} if "--show-completion" in args else None
    result, modules = run_traced(tmp_path, *(a.format(ckpts=recorded) for a in args), env=env)
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "torch" not in modules and "safetensors" not in modules
    if args == ["--version"]:
        assert result.stdout.startswith("posthoc-ema ")


def test_inspect_shows_the_same_report_without_torch(tmp_path, recorded):
    result, modules = run_traced(tmp_path, "inspect", recorded, "--json")
    report = json.loads(result.stdout)
    assert "torch" not in modules
    assert report["series"][0]["parameters"] > 0 and report["grid"]  # dtype table and fit worked


def test_inspect_of_a_sharded_recording_with_frozen_layers_does_not_import_torch(tmp_path):
    """Set folders of rank files and a frozen/ rank-file set (FSDP2 on a 1-rank gloo world) are scanned without torch."""
    folder = tmp_path / "ckpts"
    record_with_a_frozen_layer(folder, tmp_path, sharded=True)  # Linear(48, 48) frozen, Linear(48, 16) trained
    assert (folder / "frozen" / "rank-00000.safetensors").is_file()
    result, modules = run_traced(tmp_path, "inspect", folder, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["series"][0]["parameters"] == 48 * 16 + 16  # the trainable layer
    assert report["contents"]["stored_once"]["path"] == str(folder / "frozen")
    assert report["contents"]["stored_once"]["parameters"] == 48 * 48 + 48  # the frozen one
    assert "torch" not in modules and "safetensors" not in modules


def test_shell_completion_does_not_import_torch(tmp_path):
    env = {"_POSTHOC_EMA_COMPLETE": "complete_bash", "COMP_WORDS": "posthoc-ema in", "COMP_CWORD": "1"}
    result, modules = run_traced(tmp_path, env=env)
    assert result.returncode == 0 and result.stdout.split() == ["inspect"]
    assert "torch" not in modules


def test_the_probe_sees_torch_when_a_command_needs_it(tmp_path, recorded):
    # The control: the same launcher does report torch for a command that reads tensor data.
    result, modules = run_traced(tmp_path, "synthesize", recorded, "--sigma-rel", "0.15", "--out", tmp_path / "ema.safetensors")
    assert result.returncode == 0, result.stderr
    assert "torch" in modules


def test_every_light_command_is_exercised():
    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert TENSOR_COMMANDS <= commands
    exercised = {args[0] for args, code in LIGHT_RUNS if args and code == 0 and "--help" not in args}
    missing = commands - TENSOR_COMMANDS - exercised
    assert not missing, f"add a run of {sorted(missing)} to LIGHT_RUNS, or list it in cli.main.TENSOR_COMMANDS if it needs torch"


def test_importing_the_package_imports_nothing_heavy():
    code = (
        "import sys, posthoc_cli\n"
        "print(sorted(m for m in ('torch', 'numpy', 'typer', 'rich', 'safetensors') if m in sys.modules))\n"
        "from posthoc_cli import Recorder, scan, synthesize, PosthocError\n"
        "print(Recorder.__module__, 'torch' in sys.modules)\n"
        "print(all(n in dir(posthoc_cli) and getattr(posthoc_cli, n) is not None for n in posthoc_cli.__all__))\n"
        "try:\n    posthoc_cli.nothing_by_this_name\nexcept AttributeError as e:\n    print('AttributeError', e)\n"
    )
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines == [
        "[]",
        "posthoc_cli.record.recorder True",
        "True",
        "AttributeError module 'posthoc_cli' has no attribute 'nothing_by_this_name'",
    ]


def test_header_modules_work_without_torch(recorded):
    # In a fresh interpreter: scan, read a header, build the inspect report, plan a synthesis.
    code = (
        "import sys\n"
        "from posthoc_cli.synth.plan import plan\n"
        "from posthoc_cli.analysis.report import inspect_report\n"
        "from posthoc_cli.format.catalogue import scan\n"
        f"cat = scan({str(recorded)!r})\n"
        "report = inspect_report(cat)\n"
        "p = plan(cat.folder, [0.15])\n"
        "print(len(cat.snapshots), report['series'][0]['parameters'], len(p.inputs) > 0, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "20" and int(out[1]) > 0 and out[2:] == ["True", "False"]


@pytest.mark.parametrize("code", sorted(SAFETENSORS_DTYPES))
def test_the_torch_free_dtype_table_agrees_with_torch(code):
    import torch

    info, dtype = SAFETENSORS_DTYPES[code], torch_dtype(code)
    assert (info.itemsize, info.is_floating_point) == (dtype.itemsize, dtype.is_floating_point)
    if info.is_floating_point:
        assert unit_roundoff(code) == torch.finfo(dtype).eps / 2
    assert torch_dtypes()[code] is dtype and torch_codes()[dtype] == code
    reference = getattr(safetensors.torch, "_TYPES", {})  # the reference implementation's table (private)
    assert reference.get(code, dtype) is dtype


def test_a_dropped_writer_removes_its_temp_file(tmp_path):
    # What an interruption between creating a writer and handing it on leaves: nothing.
    writer = AtomicWriter(tmp_path / "out.safetensors", [("w", "F32", (2,))], {})
    assert writer.tmp.exists()
    del writer
    assert list(tmp_path.iterdir()) == []


# -- Ctrl-C ---------------------------------------------------------------------------------------


def _error_lines(stderr: str) -> list[str]:
    # Click writes an empty line before handing an interrupt during parsing on; nothing else may appear.
    return [line for line in stderr.splitlines() if line.strip() and line != "HELD"]


def _assert_interrupted(proc: subprocess.Popen[str], expected: str = "Error: interrupted") -> str:
    """Check the end of an interrupted run; its stdout."""
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert _error_lines(stderr) == [expected], stderr
    return stdout


def _popen(args: list[object], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (code {proc.returncode}) before {what}: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def _interrupt_now(proc: subprocess.Popen[str]) -> None:
    # Frozen while the signal is queued, so the moment we chose is the one it lands in.
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("module", ["typer", "rich.console", "numpy", "posthoc_cli.cli"])
@pytest.mark.parametrize("args", [["--version"], ["inspect", "{ckpts}"], ["beta-to-sigma", "0.999"]])
def test_ctrl_c_during_start_up(tmp_path, recorded, module, args):
    env = {"POSTHOC_TEST_HOLD": module, "POSTHOC_TEST_MODULES": str(tmp_path / "modules.json")}
    command = [sys.executable, "-c", LAUNCHER, entry_point(), *(a.format(ckpts=recorded) for a in args)]
    proc = _popen(command, tmp_path, env)
    assert proc.stderr is not None
    assert proc.stderr.readline() == "HELD\n"  # start-up is now inside `import <module>`
    proc.send_signal(signal.SIGINT)
    assert _assert_interrupted(proc) == ""


def _maps(proc: subprocess.Popen[str], library: str) -> Callable[[], bool]:
    def mapped() -> bool:
        try:
            return library in Path(f"/proc/{proc.pid}/maps").read_text()
        except OSError:
            return False

    return mapped


linux_only = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc/PID/maps")


@pytest.fixture(scope="module")
def large_ckpts(tmp_path_factory) -> Path:
    """Snapshots of a 33 MB model (2 sigma_rels x 3 times): synthesizing 8 targets from them takes a while."""
    import torch
    from torch import nn

    folder = tmp_path_factory.mktemp("large") / "ckpts"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048))
    with Recorder(model, folder, sigma_rels=(0.05, 0.10), snapshot_every=1) as rec:
        for _ in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            rec.update()
    return folder


@linux_only
def test_ctrl_c_while_synthesize_imports_torch(tmp_path, recorded):
    out = tmp_path / "out"
    proc = _popen([entry_point(), "synthesize", recorded, "-s", "0.12", "-s", "0.15", "--out", f"{out}/"], tmp_path)
    _wait_for(_maps(proc, "libtorch"), proc, "torch was being imported")
    _interrupt_now(proc)
    _assert_interrupted(proc, "Error: interrupted — no output was written")
    assert not out.exists()  # the folder made for the outputs is gone too


@linux_only
def test_ctrl_c_during_a_long_synthesize(tmp_path, large_ckpts):
    out = tmp_path / "out"
    targets = [a for s in ("0.06", "0.07", "0.08", "0.09", "0.11", "0.12", "0.13", "0.15") for a in ("-s", s)]
    # 3 snapshot times: most of these targets are poor (--allow-poor); a long pass is what this needs
    proc = _popen([entry_point(), "synthesize", large_ckpts, *targets, "--allow-poor", "--accumulate", "float64", "--out", f"{out}/"], tmp_path)
    # The temporary outputs exist from the start of the pass to its end, and torch is in by then.
    _wait_for(lambda: any(out.glob("*.tmp")) and _maps(proc, "libtorch")(), proc, "the synthesis pass started")
    _interrupt_now(proc)
    _assert_interrupted(proc, "Error: interrupted — no output was written")
    assert not out.exists()
    assert sorted(p.name for p in large_ckpts.iterdir()) == sorted(s.path.name for s in _snapshots(large_ckpts))


def _snapshots(folder: Path) -> list:
    return [read_snapshot(p) for p in folder.iterdir() if p.is_file()]


@linux_only
def test_ctrl_c_while_demo_imports_torch(tmp_path):
    out = tmp_path / "demo"
    proc = _popen([entry_point(), "demo", "--out", out], tmp_path)
    _wait_for(_maps(proc, "libtorch"), proc, "torch was being imported")
    _interrupt_now(proc)
    _assert_interrupted(proc)
    assert not out.exists()


def test_ctrl_c_during_demo_training(tmp_path):
    out = tmp_path / "demo"
    proc = _popen([entry_point(), "demo", "--out", out], tmp_path)
    _wait_for(lambda: any(out.glob("ema-*.safetensors")), proc, "the demo wrote its first snapshot")
    _interrupt_now(proc)
    _assert_interrupted(proc)
    # Whatever is left is whole: complete snapshots only, no temporary file.
    files = [p for p in out.iterdir() if p.is_file()]
    assert files and all(p.suffix == ".safetensors" for p in files)
    assert all(s.kind == "snapshot" for s in _snapshots(out))


def test_ctrl_c_during_demo_in_a_temporary_folder(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = _popen([entry_point(), "demo"], tmp_path, {"TMPDIR": str(scratch)})
    _wait_for(lambda: any(scratch.glob("posthoc-ema-demo-*/ckpts/ema-*.safetensors")), proc, "the demo started training")
    _interrupt_now(proc)
    _assert_interrupted(proc)
    assert not list(scratch.glob("posthoc-ema-demo-*"))  # the temporary folder is removed


def test_more_ctrl_c_do_not_cut_the_clean_up_short(tmp_path, large_ckpts):
    # Ctrl-C pressed again and again: the first interrupts, the others must not break the clean-up.
    out = tmp_path / "out"
    targets = [a for s in ("0.06", "0.08", "0.12", "0.15") for a in ("-s", s)]
    proc = _popen([entry_point(), "synthesize", large_ckpts, *targets, "--allow-poor", "--out", f"{out}/"], tmp_path)
    _wait_for(lambda: any(out.glob("*.tmp")), proc, "the synthesis pass started")
    while proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.0005)
    _assert_interrupted(proc, "Error: interrupted — no output was written")
    assert not out.exists()


def test_a_background_job_keeps_ignoring_ctrl_c(tmp_path):
    # A shell starts `cmd &` with SIGINT ignored; the entry point must not take it back.
    code = (
        "import signal, subprocess, sys\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        f"p = subprocess.Popen([{entry_point()!r}, 'beta-to-sigma', '0.999'], stdout=subprocess.PIPE, stderr=subprocess.PIPE)\n"
        "import time; time.sleep(0.05); p.send_signal(signal.SIGINT)\n"
        "out, err = p.communicate(timeout=300)\n"
        "print(p.returncode, b'Traceback' in err, b'Classical EMA' in out)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert result.stdout.split() == ["0", "False", "True"], result.stderr
