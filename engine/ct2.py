"""CTranslate2 model files: read the variables of a `model.bin`, and write a copy of one with
some of them replaced (how a bundle's Whisper decoder adapter reaches CTranslate2).

The layout (CTranslate2's binary version 6, `ctranslate2/specs/model_spec.py`): a header, then
each variable as name, rank, dims, dtype id, byte count and raw bytes, then aliases. Replacing a
variable by an array of the same dtype and shape keeps every byte offset.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ModelError

BINARY_VERSION = 6
DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")  # by CTranslate2's type id


@dataclass(frozen=True)
class Variable:
    dtype: str
    shape: tuple[int, ...]
    offset: int  # of its bytes in the file
    nbytes: int


def read_index(data: bytes | mmap.mmap, *, source: str = "model.bin") -> dict[str, Variable]:
    """Every variable of a `model.bin`'s bytes (aliases are left out)."""
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal pos
        n = take("H")
        value = bytes(data[pos : pos + n - 1]).decode("utf-8")
        pos += n
        return value

    try:
        version = take("I")
        if version != BINARY_VERSION:
            raise ModelError(
                f"{source}: CTranslate2 binary version {version}, expected {BINARY_VERSION}"
            )
        text()  # the spec's name
        take("I")  # its revision
        index = {}
        for _ in range(take("I")):
            name = text()
            shape = tuple(take("I") for _ in range(take("B")))
            dtype = DTYPES[take("B")]
            nbytes = take("I")
            index[name] = Variable(dtype, shape, pos, nbytes)
            pos += nbytes
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise ModelError(f"{source} is not a CTranslate2 model file ({exc})") from exc
    return index


def read_array(data: bytes | mmap.mmap, var: Variable) -> np.ndarray:
    """A variable's values (a read-only view of `data`); bfloat16 is not supported."""
    if var.dtype == "bfloat16":
        raise ModelError("bfloat16 CTranslate2 variables are not supported")
    dtype = np.dtype(var.dtype)
    return np.frombuffer(data, dtype, var.nbytes // dtype.itemsize, var.offset).reshape(var.shape)


def write_patched(
    data: bytes, dst: Path, new: dict[str, np.ndarray], *, source: str = "model.bin"
) -> None:
    """Write the `model.bin` bytes `data` (read from `source`) to `dst` with the variables in
    `new` replaced (same shape; cast to the variable's dtype). `dst` appears complete or not at
    all."""
    data = bytearray(data)
    index = read_index(data, source=source)
    for name, values in new.items():
        var = index.get(name)
        if var is None:
            raise ModelError(f"{source} has no variable {name!r}")
        if tuple(values.shape) != var.shape:
            raise ModelError(f"{name}: shape {tuple(values.shape)}, {source} has {var.shape}")
        data[var.offset : var.offset + var.nbytes] = np.ascontiguousarray(
            values, dtype=var.dtype
        ).tobytes()
    dst = Path(dst)
    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dst)
