"""The one dtype table: safetensors codes, item size and float-ness without torch, torch's dtypes on demand.

Reading headers, scanning a folder and the ``inspect`` report need only how many
bytes an element takes and whether it is averaged (floating point), so that is
a plain table here and importing this module costs nothing. Code that handles
tensor data asks for the matching torch dtype, which imports torch on first use.

>>> SAFETENSORS_DTYPES["BF16"].itemsize, SAFETENSORS_DTYPES["BF16"].is_floating_point
(2, True)
>>> unit_roundoff("float16")  # half the gap between 1 and the next float16
0.00048828125
>>> torch_dtype("BF16")  # doctest: +SKIP
torch.bfloat16
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from .errors import InvalidValueError, spelled

if TYPE_CHECKING:  # annotations only: torch is imported where tensor data is handled
    import torch


class DType(NamedTuple):
    """What a safetensors dtype code means, as far as the file format needs to know."""

    itemsize: int  # bytes per element
    is_floating_point: bool  # floating-point tensors are averaged, the others are copied
    fraction_bits: int  # stored mantissa bits of a float (0 for the others): its rounding error
    torch_name: str  # the attribute of the torch module, e.g. "bfloat16"


# Every code the safetensors format defines that torch can hold; other codes make a header invalid.
SAFETENSORS_DTYPES: dict[str, DType] = {
    "F64": DType(8, True, 52, "float64"),
    "F32": DType(4, True, 23, "float32"),
    "F16": DType(2, True, 10, "float16"),
    "BF16": DType(2, True, 7, "bfloat16"),
    "F8_E4M3": DType(1, True, 3, "float8_e4m3fn"),
    "F8_E5M2": DType(1, True, 2, "float8_e5m2"),
    "I64": DType(8, False, 0, "int64"),
    "I32": DType(4, False, 0, "int32"),
    "I16": DType(2, False, 0, "int16"),
    "I8": DType(1, False, 0, "int8"),
    "U64": DType(8, False, 0, "uint64"),
    "U32": DType(4, False, 0, "uint32"),
    "U16": DType(2, False, 0, "uint16"),
    "U8": DType(1, False, 0, "uint8"),
    "BOOL": DType(1, False, 0, "bool"),
}


# Storage dtypes of averaged tensors, by the name used in records and on the command line.
FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# Accumulation dtypes of synthesis, by name.
ACCUMULATE = {"float32": "F32", "float64": "F64"}


def unit_roundoff(dtype: str) -> float:
    """Relative rounding error of storing a value as the float ``dtype``, a storage name or a code
    (``"float16"`` or ``"F16"``: 2⁻¹¹)."""
    info = SAFETENSORS_DTYPES[FLOAT_DTYPES.get(dtype, dtype)]
    if not info.is_floating_point:
        raise ValueError(f"{dtype} is not a floating-point dtype")
    return 2.0 ** -(info.fraction_bits + 1)


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors code → torch dtype (imports torch)."""
    import torch

    return {code: getattr(torch, info.torch_name) for code, info in SAFETENSORS_DTYPES.items()}


@functools.cache
def torch_codes() -> dict[torch.dtype, str]:
    """torch dtype → safetensors code (imports torch)."""
    return {dtype: code for code, dtype in torch_dtypes().items()}


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors code (imports torch)."""
    return torch_dtypes()[code]


@functools.cache
def storage_names() -> dict[torch.dtype, str]:
    """torch dtype → storage name, for the storage dtypes (``torch.float16`` → ``"float16"``; imports torch)."""
    return {torch_dtype(code): name for name, code in FLOAT_DTYPES.items()}


def choose(option: str, value: str, table: Mapping[str, str]) -> str:
    """``table[value]``, or :class:`InvalidValueError` naming the choices (``dtype='int8' is not supported``)."""
    if value not in table:
        raise InvalidValueError(f"{spelled(f'{option}={value!r}', f'--{option} {value!r}')} is not supported", f"use one of {', '.join(table)}")
    return table[value]


__all__ = [
    "ACCUMULATE", "FLOAT_DTYPES", "SAFETENSORS_DTYPES", "DType", "choose", "storage_names", "torch_codes", "torch_dtype",
    "torch_dtypes", "unit_roundoff",
]
