"""Helper for the crash tests: a fork server whose children record or synthesize and get SIGKILLed.

``python tests/crash_worker.py`` imports torch and posthoc_cli once, then reads one
JSON command per line on stdin and answers one JSON line on stdout. Each command
runs in a forked child, so a trial costs a fork instead of a fresh interpreter
(importing torch takes seconds on a busy 2-core CI machine):

- ``{"cmd": "record", "dir": D, "steps": T, ...}``: a real Recorder records the
  deterministic trajectory of :func:`set_weights` into D, resuming whatever D holds.
- ``{"cmd": "cli", "argv": [...]}``: ``posthoc_cli.cli.main.main()`` with that argv; the
  child exits with its exit code.

Ways to die, on top of either command:

- ``kill_event=N``: the child SIGKILLs itself at the N-th crash point of the
  atomic writer (before each fsync, link, unlink or rename, and halfway through a
  tensor's bytes), so every stage of a write is hit deterministically;
- ``kill_after=S``: the server SIGKILLs the child S seconds after forking it;
- ``kill_in="removal"``: ``kill_event`` counts only the crash points inside the Recorder's
  removals of snapshots (``max_snapshots``);
- ``fsize_limit=B``: ``RLIMIT_FSIZE`` is B bytes (SIGXFSZ ignored), so writes fail
  with EFBIG like on a full disk;
- ``full_disk=true``: the atomic writer's temp files write to ``/dev/full`` (ENOSPC).

The answer says how the child ended; a child that ends on its own first writes
``{"events": crash points passed, "error": PosthocError message or null}`` to
``report`` when given. Its stdout and stderr go to the files ``stdout`` and
``stderr`` (default: nowhere).

The model and trajectory are importable, so the tests can run the same recording in-process.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import time
import traceback

import torch
from torch import nn

SIGMA_RELS = (0.05, 0.10)


class Net(nn.Module):
    """Parameters, float buffers (BatchNorm statistics) and an integer buffer, ~7k values."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 96)
        self.bn = nn.BatchNorm1d(96)
        self.fc2 = nn.Linear(96, 32)


def trajectory(t: int, shape: torch.Size, index: int) -> torch.Tensor:
    """The value of one float tensor at training time ``t`` (a pure function of t), in float64."""
    g = torch.Generator().manual_seed(1000 * t + index)
    drift = math.sin(t / 40.0 + index)
    return drift + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)


@torch.no_grad()
def set_weights(model: nn.Module, t: int) -> None:
    """Put the weights of time ``t`` into the model: what an optimizer step would have produced."""
    for index, (name, value) in enumerate(model.state_dict().items()):
        if value.is_floating_point():
            value.copy_(trajectory(t, value.shape, index))
        else:
            value.fill_(t)  # num_batches_tracked: an integer buffer that changes every step


def record(
    folder: str,
    steps: int,
    *,
    snapshot_every: int,
    update_every: int = 1,
    snapshot_dtype: str = "float32",
    async_write: bool = True,
    max_snapshots: int | None = None,
) -> int:
    """Record (or resume recording) the trajectory up to ``steps``; returns the time it resumed from."""
    from posthoc_cli import Recorder

    model = Net()
    with Recorder(
        model,
        folder,
        sigma_rels=SIGMA_RELS,
        snapshot_every=snapshot_every,
        update_every=update_every,
        snapshot_dtype=getattr(torch, snapshot_dtype),
        async_write=async_write,
        max_snapshots=max_snapshots,
    ) as rec:
        start = rec.t
        for t in range(start + 1, steps + 1):
            set_weights(model, t)
            rec.update()
    return start


# -- crash points ---------------------------------------------------------------------------------

_events = 0


def _install_crash_points(kill_event: int | None, removals_only: bool = False) -> None:
    """Count (and at ``kill_event``, die at) every stage of an atomic write; with ``removals_only``, only the
    stages of the Recorder's removals (rename aside, folder fsync, delete: :mod:`posthoc_cli.format.removal`)."""
    from posthoc_cli.format import atomic, container
    from posthoc_cli.record import thinning

    removing = [False]
    remove = thinning.remove_snapshots

    def counted_removal(paths):  # type: ignore[no-untyped-def]
        removing[0] = True
        try:
            return remove(paths)
        finally:
            removing[0] = False

    thinning.remove_snapshots = counted_removal  # type: ignore[assignment]

    def hit() -> bool:
        global _events
        if removals_only and not removing[0]:
            return False
        due = _events == kill_event
        _events += 1
        return due

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def guard(fn):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            if hit():
                die()
            return fn(*args, **kwargs)

        return wrapped

    for name in ("fsync", "link", "unlink", "replace"):
        setattr(os, name, guard(getattr(os, name)))

    write = atomic.AtomicWriter.write

    def torn_write(self, data):  # type: ignore[no-untyped-def]
        if hit():  # half of this tensor's bytes reach the file, then the process dies
            raw = container.tensor_bytes(data) if isinstance(data, torch.Tensor) else memoryview(data).cast("B")
            self._file.write(raw[: raw.nbytes // 2])
            self._file.flush()
            die()
        return write(self, data)

    atomic.AtomicWriter.write = torn_write


def _fill_disk() -> None:
    """Every temp file the atomic writer creates is real, but its bytes go to /dev/full: the kernel answers ENOSPC."""
    import builtins

    from posthoc_cli.format import leftovers

    def open_on_full_disk(path, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).endswith(".tmp") and "x" in mode:
            builtins.open(path, mode, *args, **kwargs).close()
            return builtins.open("/dev/full", "wb")
        return builtins.open(path, mode, *args, **kwargs)

    leftovers.open = open_on_full_disk  # type: ignore[attr-defined]


def _child(command: dict) -> int:
    torch.set_num_threads(1)
    if command.get("fsize_limit") is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(command["fsize_limit"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    if command.get("full_disk"):
        _fill_disk()
    _install_crash_points(command.get("kill_event"), command.get("kill_in") == "removal")
    error, code = None, 0
    if command["cmd"] == "record":
        from posthoc_cli import PosthocError

        try:
            record(
                command["dir"],
                command["steps"],
                snapshot_every=command["snapshot_every"],
                update_every=command.get("update_every", 1),
                snapshot_dtype=command.get("snapshot_dtype", "float32"),
                max_snapshots=command.get("max_snapshots"),
            )
        except PosthocError as e:
            error = f"{type(e).__name__}: {e}"
    elif command["cmd"] == "cli":
        from posthoc_cli.cli.main import main

        sys.argv = ["posthoc-ema", *command["argv"]]
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    if command.get("report"):
        with open(command["report"], "w") as f:
            json.dump({"events": _events, "error": error}, f)
    return code


def _run(command: dict) -> dict:
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 0
        for fd, key in ((1, "stdout"), (2, "stderr")):  # fd 1 is the server's answer pipe: keep it clean
            target = os.open(command.get(key) or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        try:
            code = _child(command)
        except BaseException:
            traceback.print_exc()
            code = 70
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if command.get("kill_after") is not None:
        deadline = started + float(command["kill_after"])
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.001)
        else:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
    else:
        _, status = os.waitpid(pid, 0)
    elapsed = time.monotonic() - started
    if os.WIFSIGNALED(status):
        return {"ended": "killed", "signal": os.WTERMSIG(status), "seconds": elapsed}
    return {"ended": "exit", "code": os.WEXITSTATUS(status), "seconds": elapsed}


def serve() -> None:
    import posthoc_cli  # noqa: F401  (imported once here, so every forked child starts warm)
    import posthoc_cli.cli.main  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_run(json.loads(line))), flush=True)


class Server:
    """The test side: start ``crash_worker.py`` once, send it commands."""

    def __init__(self) -> None:
        import subprocess

        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if not first:
            raise RuntimeError("crash_worker.py failed to start")

    def __call__(self, **command: object) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError("crash_worker.py died")
        return json.loads(answer)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    serve()
