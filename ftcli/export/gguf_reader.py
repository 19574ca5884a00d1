"""A GGUF file read back for `ftcli export --check`: its metadata, and its weights as llama.cpp computes with them.

gguf's own GGUFReader builds a numpy view for every string of the vocabulary and merges, seconds for a 49k-token
vocabulary, so the header is parsed here (the format: github.com/ggml-org/ggml/blob/master/docs/gguf.md), string
arrays with one pass of plain reads. A tensor's bytes are read from the file, copied to the device that runs the
check's model and dequantized there (ftcli/export/dequantize.py). Tensors are found by the names the writer gave
them (gguf_file.gguf_names), and hold the weights in the writer's layout (gguf_file.gguf_weight).
"""

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from ftcli.errors import FtcliError
from ftcli.export.dequantize import dequantize, tensor_bytes
from ftcli.export.gguf_file import gguf_names

_SCALARS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
            V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
DEFAULT_ALIGNMENT = 32


@dataclass
class TensorInfo:
    qtype: Q
    shape: tuple[int, ...]  # numpy order: rows first, as the Hugging Face weight
    offset: int  # from the start of the file


@dataclass
class StoredWeight:
    """One tensor of the file: its type and its values as stored (llama.cpp's layout), in float32."""

    qtype: Q
    values: torch.Tensor


class GgufFile:
    """The key-value metadata (`fields`, arrays as lists) and the tensor table of one GGUF file. The header is
    parsed through a map of the file that is closed before the constructor returns, and each tensor is read when
    asked for: no handle stays open while the check runs."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped, \
                    memoryview(mapped) as view:
                self.fields, self.tensors = _Header(view).read()
        except (struct.error, ValueError) as error:  # a read past the end, an unknown type code, an empty file
            raise FtcliError(f"{path} is not a GGUF file the export check can read: its header is cut short or "
                             f"damaged ({error}). Export it again with --overwrite.") from None

    def token(self, index: int) -> Optional[str]:
        """The vocabulary's text for a token id; None for an id the vocabulary does not have."""
        tokens = self.fields.get("tokenizer.ggml.tokens", [])
        return tokens[index] if 0 <= index < len(tokens) else None

    def values(self, name: str, device: torch.device) -> torch.Tensor:
        """The tensor's values as llama.cpp dequantizes them, float32, in numpy order, on `device`."""
        info = self.tensors[name]
        raw = torch.empty(tensor_bytes(info.qtype, info.shape), dtype=torch.uint8)
        with self.path.open("rb") as file:
            file.seek(info.offset)
            read = file.readinto(raw.numpy())  # fewer bytes in a truncated file: dequantize names it
        return dequantize(raw[:read].to(device), info.qtype, info.shape)


class _Header:
    """A pass over a GGUF header, from the magic to the aligned start of the tensor data."""

    def __init__(self, view: memoryview):
        self._view = view  # slices of a memoryview cost less than numpy's, for 100k strings
        self._position = 0

    def read(self) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
        if self._view[:4] != b"GGUF":
            raise ValueError("it does not start with GGUF")
        self._position = 8  # magic and version
        tensor_count, field_count = self._read("<Q"), self._read("<Q")
        fields: dict[str, Any] = {}
        for _ in range(field_count):
            key = self._string()
            fields[key] = self._value(V(self._read("<I")))
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise ValueError(f"general.alignment is {alignment!r}")
        start = -(-self._position // alignment) * alignment
        return fields, {name: TensorInfo(qtype, shape, start + offset) for name, qtype, shape, offset in infos}

    def _read(self, fmt: str):
        value = struct.unpack_from(fmt, self._view, self._position)[0]
        self._position += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._read("<Q")
        text = str(self._view[self._position:self._position + length], "utf-8", errors="replace")
        self._position += length
        return text

    def _value(self, kind: V):
        if kind == V.STRING:
            return self._string()
        if kind == V.ARRAY:
            item_kind, count = V(self._read("<I")), self._read("<Q")
            if item_kind in _SCALARS:  # numbers in one read
                dtype = np.dtype(_SCALARS[item_kind])
                values = np.frombuffer(self._view, dtype, count, self._position).tolist()
                self._position += count * dtype.itemsize
                return values
            return [self._value(item_kind) for _ in range(count)]
        return self._read(_SCALARS[kind])

    def _tensor_info(self) -> tuple[str, Q, tuple[int, ...], int]:
        name = self._string()
        dims = [self._read("<Q") for _ in range(self._read("<I"))]
        qtype = Q(self._read("<I"))
        return name, qtype, tuple(reversed(dims)), self._read("<Q")


def stored_weights(file: GgufFile, config, hf_names: list[str],
                   device: torch.device) -> Iterator[tuple[str, StoredWeight]]:
    """Every weight in `hf_names` as the file stores it, by Hugging Face name, one at a time, on `device`."""
    for hf_name, gguf_name in gguf_names(config, hf_names).items():
        if gguf_name not in file.tensors:
            raise FtcliError(f"{file.path} has no tensor {gguf_name} (the model's {hf_name}), so llama.cpp cannot load "
                             "it. Export the file again with --overwrite.")
        yield hf_name, StoredWeight(file.tensors[gguf_name].qtype, file.values(gguf_name, device))
