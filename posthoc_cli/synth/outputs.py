"""Where a synthesized EMA goes: one safetensors file, or a Hugging Face sharded folder.

The Hugging Face layout (``--max-shard-size``) is a folder holding
``model-00001-of-0000N.safetensors`` … and ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``), or
``model.safetensors`` alone when everything fits in one shard, as
``huggingface_hub`` writes it. Shards hold the tensors in file order, cut where
the next tensor would overflow the limit (a tensor above the limit sits alone);
their headers carry ``"format": "pt"`` (its loader requires it) beside our
``posthoc_ema`` record.

A folder appears only when complete: it is built as a hidden temporary folder
beside its final name and renamed into place, so a failed or killed run leaves
no index and no shard under a final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..dtypes import SAFETENSORS_DTYPES
from ..errors import InvalidValueError, OutputError, arg
from ..format.atomic import AtomicWriter, fsync_dir, output_error
from ..format.container import tensor_bytes
from ..format.leftovers import hold, remove_leftovers

if TYPE_CHECKING:  # planning an output needs no torch (light commands import this module)
    import torch

# Decimal units, as huggingface_hub's parse_size_to_int reads them ("5GB" = 5·10⁹ bytes).
SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
_OURS = r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?"  # what --force may replace

Layout = list[tuple[str, str, tuple[int, ...]]]  # (name, dtype code, shape), in file order


def parse_size(size: str | int) -> int:
    """Bytes from ``"5GB"``, ``"500MB"``, ``"20KB"``, ``"1.5TB"`` (decimal units) or a plain count.

    >>> parse_size("500MB")
    500000000
    """
    text = str(size).strip()
    unit = text[-2:].upper()
    number = text[:-2] if unit in SIZE_UNITS else text
    try:
        value = float(number) if unit in SIZE_UNITS else int(number)
    except ValueError:
        value = -1
    result = int(value * SIZE_UNITS.get(unit, 1)) if math.isfinite(value) else -1
    if not result > 0:
        raise InvalidValueError(
            f"{arg('max_shard_size', size)} is not a size", "give bytes or a number with KB, MB, GB or TB, e.g. 5GB"
        )
    return result


def _nbytes(code: str, shape: tuple[int, ...]) -> int:
    n = SAFETENSORS_DTYPES[code].itemsize
    for d in shape:
        n *= d
    return n


def shard_layouts(layout: Layout, max_bytes: int) -> list[Layout]:
    """Cut ``layout`` into consecutive shards of at most ``max_bytes`` of tensor data each.

    A tensor larger than the limit gets a shard of its own. Order is kept, so the
    shards' data one after another is the file order of a single output.

    >>> [len(s) for s in shard_layouts([("a", "F32", (4,)), ("b", "F32", (4,))], 20)]
    [1, 1]
    """
    shards: list[Layout] = []
    current: Layout = []
    size = 0
    for item in layout:
        n = _nbytes(item[1], item[2])
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    if current or not shards:
        shards.append(current)
    return shards


@dataclass(frozen=True)
class OutFile:
    """One safetensors file of an output: its name, tensors and header metadata."""

    name: str
    layout: Layout
    metadata: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(code, shape) for _, code, shape in self.layout)


@dataclass(frozen=True)
class Output:
    """One target's output: a file (``folder`` false), or a Hugging Face folder of shards."""

    path: Path
    files: list[OutFile]
    folder: bool

    @property
    def index(self) -> dict[str, object] | None:
        """The ``model.safetensors.index.json`` document, when there are several shards."""
        if len(self.files) < 2:
            return None
        weight_map = {name: f.name for f in self.files for name, _, _ in f.layout}
        return {"metadata": {"total_size": sum(f.nbytes for f in self.files)}, "weight_map": weight_map}


def single_file(path: Path, layout: Layout, metadata: dict[str, str]) -> Output:
    return Output(path, [OutFile(path.name, layout, metadata)], folder=False)


def hf_folder(path: Path, layout: Layout, metadata: dict[str, str], max_bytes: int) -> Output:
    """The Hugging Face sharded layout of one output in folder ``path``."""
    shards = shard_layouts(layout, max_bytes)
    meta = {"format": "pt", **metadata}
    if len(shards) == 1:
        return Output(path, [OutFile(SINGLE_NAME, shards[0], meta)], folder=True)
    n = len(shards)
    return Output(path, [OutFile(_SHARD_NAME.format(k + 1, n), s, meta) for k, s in enumerate(shards)], folder=True)


def check_folder(path: Path, force: bool) -> None:
    """Refuse an output folder that exists (unless empty, or ``force`` and it holds model weights only)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"{path} is a file, but {arg('max_shard_size')} writes a folder", f"pass a folder as {arg('out')}")
    try:
        names = [entry.name for entry in os.scandir(path)]
    except OSError as e:
        raise output_error(path, e) from e
    if not names:
        return
    if not force:
        raise OutputError(f"{path} already exists", f"use {arg('force', True)} to replace it, or choose another {arg('out')}")
    others = sorted(n for n in names if not re.fullmatch(_OURS, n) or not (path / n).is_file())
    if others:
        raise OutputError(
            f"{path} holds other files than model weights ({', '.join(others[:3])}); {arg('force', True)} replaces only a folder of weights",
            "write to a new folder and copy the other files next to the weights",
        )


def make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return those created, deepest first, for :func:`remove_folders`."""
    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    try:
        for f in reversed(missing):
            _new_folder(f, f)  # made meanwhile by another process: fine
    except BaseException:  # an error or Ctrl-C half-way: the folders made so far go again (empty ones only)
        remove_folders(missing)
        raise
    return missing


def remove_folders(created: list[Path]) -> None:
    """Remove the folders :func:`make_folders` created, those still empty."""
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _new_folder(path: Path, output: Path) -> bool:
    """Create ``path``; False when it exists already. Other failures are reported for ``output``."""
    try:
        path.mkdir()
    except FileExistsError:
        return False
    except OSError as e:
        raise output_error(output, e) from e
    return True


class OutputWriter:
    """Writes one :class:`Output`: tensor data in file order through :meth:`write`, then :meth:`commit`.

    Nothing appears under a final name before :meth:`commit`; :meth:`abort`
    removes every temporary file or folder.

    >>> w = OutputWriter(single_file(Path("ema.safetensors"), [("w", "F32", (2,))], {}))  # doctest: +SKIP
    >>> w.write(torch.ones(2)); w.commit()  # doctest: +SKIP
    """

    def __init__(self, output: Output, *, force: bool = False) -> None:
        self.output, self.force = output, force
        self._temp: Path | None = None
        self.writers: list[AtomicWriter] = []
        self._current = 0
        self._left = output.files[0].nbytes
        self._held: int | None = None  # the temp folder's lock, so that other runs never take it for a leftover
        remove_leftovers(output.path.parent)
        try:
            if output.folder:
                self._temp = _temp_folder(output.path)
                self._held = hold(self._temp)
                folder = self._temp
                self.writers = [AtomicWriter(folder / f.name, f.layout, f.metadata) for f in output.files]
            else:
                f = output.files[0]
                self.writers = [AtomicWriter(output.path, f.layout, f.metadata, overwrite=force)]
        except BaseException:
            self.abort()
            raise

    def write(self, data: torch.Tensor) -> None:
        """Append the next bytes of tensor data; they flow from one shard into the next."""
        raw = tensor_bytes(data)
        while raw.nbytes:
            while self._left == 0:
                self._current += 1
                self._left = self.output.files[self._current].nbytes
            take = min(self._left, raw.nbytes)
            self.writers[self._current].write(raw[:take])
            self._left -= take
            raw = raw[take:]

    def reserve(self) -> list[tuple[Path, int, int]]:
        """``(temp file, data offset, bytes)`` per file, sized in full for positioned writes."""
        return [(w.tmp, w.reserve(), f.nbytes) for w, f in zip(self.writers, self.output.files)]

    def commit(self) -> Path:
        """Make the output durable and visible under its final name."""
        for writer in self.writers:
            writer.commit()
        if self._temp is None:
            return self.output.path
        index = self.output.index
        try:
            if index is not None:
                with open(self._temp / INDEX_NAME, "x") as f:
                    json.dump(index, f, indent=2)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
            fsync_dir(self._temp)
            _place(self._temp, self.output.path, self.force)
        except OSError as e:
            self.abort()
            raise output_error(self.output.path, e) from e
        except BaseException:
            self.abort()
            raise
        self._temp = None
        self._release()
        fsync_dir(self.output.path.parent)
        return self.output.path

    def abort(self) -> None:
        """Drop every temporary file (and folder); final names are left as they were."""
        for writer in self.writers:
            writer.abort()
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None
        self._release()

    def _release(self) -> None:
        if self._held is not None:
            os.close(self._held)
            self._held = None


def _temp_folder(final: Path, suffix: str = ".tmp") -> Path:
    # Unique per run (two runs never share one), hidden, and on the same file system as the final name;
    # made with mkdir (not mkdtemp, whose 0700 would stay on the output) so the umask applies.
    for _ in range(100):
        temp = final.with_name(f".{final.name}.{secrets.token_hex(4)}{suffix}")
        if _new_folder(temp, final):
            return temp
    raise OutputError(f"cannot create a temporary folder beside {final}", "remove the hidden .*.tmp folders there")


def _place(temp: Path, final: Path, force: bool) -> None:
    """Rename ``temp`` to ``final``; an existing ``final`` (checked by :func:`check_folder`) is replaced."""
    try:
        os.rename(temp, final)  # also replaces an empty folder, atomically
        return
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    check_folder(final, force)  # may have changed since the run started
    old = _temp_folder(final, ".old")
    os.rename(final, old / final.name)  # between the two renames the final name is absent, never partial
    os.rename(temp, final)
    with contextlib.suppress(OSError):
        shutil.rmtree(old)
