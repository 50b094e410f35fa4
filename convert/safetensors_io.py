"""Reading HF safetensors checkpoints tensor by tensor (memory-mapped), with FP8 block dequantisation.

The safetensors format is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then the raw little-endian data. We parse it ourselves so that FP8
(F8_E4M3 / F8_E5M2) tensors map onto ml_dtypes and each tensor is read from a memory map only when asked for.
Pickle checkpoints (`*.bin`, `*.pt`) are refused: loading them would execute arbitrary code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read as asked; the message names the file or tensor."""


def read_config(directory) -> dict:
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected an HF checkpoint directory with config.json)")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; an HF checkpoint directory needs its config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 << 20:
            raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype = info["dtype"]
            count = int(np.prod(info["shape"], dtype=np.int64))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r} ({e})") from e
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if end - begin != count * np.dtype(DTYPES[dtype]).itemsize or data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} lies outside the file or has the wrong byte size (truncated or corrupt download?)"
            )
    return header, data_start


class SafetensorsCheckpoint:
    """All tensors of an HF checkpoint directory (single `model.safetensors` or sharded with an index)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{directory}: not a directory")
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if pickles:
                raise CheckpointError(
                    f"{directory}: only pickle checkpoints ({', '.join(pickles)}); jaxlm reads safetensors only, since "
                    "unpickling runs arbitrary code. Convert them once with transformers "
                    "(model.save_pretrained(dir, safe_serialization=True)) in a sandbox you trust."
                )
            raise CheckpointError(f"{directory}: no *.safetensors files")
        index = self.directory / "model.safetensors.index.json"
        self._where: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index}: corrupt index ({e})") from e
            for name, fname in weight_map.items():
                self._where[name] = self.directory / fname
            absent = sorted({p.name for p in self._where.values() if not p.is_file()})
            if absent:
                raise CheckpointError(f"{index} names shard(s) that are missing: {absent}")
        else:
            for f in files:
                for name in _read_header(f)[0]:
                    if name != "__metadata__":
                        self._where[name] = f
        self._headers: dict[Path, tuple[dict, int]] = {}

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _info(self, name: str) -> tuple[Path, dict, int]:
        if name not in self._where:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is missing")
        path = self._where[name]
        if path not in self._headers:
            self._headers[path] = _read_header(path)
        header, start = self._headers[path]
        if name not in header:
            raise CheckpointError(f"{path}: tensor {name!r} is listed in the index but absent from the file")
        return path, header[name], start

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self._info(name)[1]["dtype"]])

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (no copy until used)."""
        path, info, start = self._info(name)
        begin, _ = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)

    def read_float(self, name: str, block_size=(128, 128)) -> np.ndarray:
        """float32 tensor; FP8 weights are multiplied by their `<name>_scale_inv` per block."""
        w = self.read(name)
        if w.dtype in FP8_DTYPES:
            scale_name = name + "_scale_inv"
            if scale_name not in self:
                raise CheckpointError(
                    f"{self.directory}: FP8 tensor {name!r} has no {scale_name!r}; an FP8 checkpoint needs its block scales"
                )
            return dequantize_fp8(w, self.read(scale_name), block_size, name=name)
        return np.asarray(w, dtype=np.float32)


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block_size=(128, 128), *, name: str = "weight") -> np.ndarray:
    """W[i, j] * scale_inv[i // bm, j // bn] in float32; edge blocks may be partial (e.g. 576 rows = 4.5 blocks)."""
    bm, bn = block_size
    m, n = w.shape
    grid = (-(-m // bm), -(-n // bn))
    scale_inv = np.asarray(scale_inv, np.float32)
    if scale_inv.shape != grid:
        raise CheckpointError(
            f"{name}: weight {w.shape} with {bm}x{bn} blocks needs weight_scale_inv of shape {grid}, got {scale_inv.shape}"
        )
    scales = np.repeat(np.repeat(scale_inv, bm, axis=0), bn, axis=1)[:m, :n]
    return np.asarray(w, dtype=np.float32) * scales


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path):
    """Write into a fresh temporary sibling of out_dir; on success it replaces out_dir in one rename, on any
    failure it is deleted, so an interrupted conversion never leaves a half-written OUT_DIR."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
