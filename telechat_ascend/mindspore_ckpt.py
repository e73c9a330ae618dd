"""MindSpore `.ckpt` files, read and written one tensor at a time without the MindSpore runtime.

A `.ckpt` is a protobuf `Checkpoint` message: `repeated Value value = 1`, each Value a tag (the parameter name) and
a TensorProto (dims, tensor_type such as "Float32", raw little-endian tensor_content). Because repeated fields
concatenate on the wire, a file is a plain sequence of one-Value `Checkpoint` messages, which is how
`mindspore.save_checkpoint` writes it: tensors over 512 MB are split along axis 0 into several Values with the
same tag and full dims, and `load_checkpoint` joins consecutive Values of one tag. We do the same, so the whole
model never sits in memory and protobuf's 2 GB message limit is never reached.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path
from typing import BinaryIO, Iterator

import ml_dtypes
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from telechat_ascend.errors import TeleChatError

SLICE_BYTES = 512 * 1024 * 1024

# MindSpore's tensor_type strings (mindspore/train/serialization.py `tensor_to_ms_type`).
MS_DTYPES = {
    "Float32": np.dtype(np.float32), "Float16": np.dtype(np.float16), "BFloat16": np.dtype(ml_dtypes.bfloat16),
    "Float64": np.dtype(np.float64), "Int8": np.dtype(np.int8), "UInt8": np.dtype(np.uint8),
    "Int16": np.dtype(np.int16), "UInt16": np.dtype(np.uint16), "Int32": np.dtype(np.int32),
    "UInt32": np.dtype(np.uint32), "Int64": np.dtype(np.int64), "UInt64": np.dtype(np.uint64),
    "Bool": np.dtype(np.bool_),
}
MS_TYPE_NAMES = {dtype: name for name, dtype in MS_DTYPES.items()}


def _message_classes():
    """The three messages of mindspore/ccsrc/utils/checkpoint.proto, in a private pool so that importing
    mindspore's own generated module in the same process cannot clash with them."""
    proto = descriptor_pb2.FileDescriptorProto(name="telechat_ascend_checkpoint.proto", package="telechat_ascend",
                                               syntax="proto2")
    F = descriptor_pb2.FieldDescriptorProto
    tensor = proto.message_type.add(name="TensorProto")
    tensor.field.add(name="dims", number=1, type=F.TYPE_INT64, label=F.LABEL_REPEATED)
    tensor.field.add(name="tensor_type", number=2, type=F.TYPE_STRING, label=F.LABEL_REQUIRED)
    tensor.field.add(name="tensor_content", number=3, type=F.TYPE_BYTES, label=F.LABEL_REQUIRED)
    checkpoint = proto.message_type.add(name="Checkpoint")
    value = checkpoint.nested_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_REQUIRED)
    value.field.add(name="tensor", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=".telechat_ascend.TensorProto")
    checkpoint.field.add(name="value", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                         type_name=".telechat_ascend.Checkpoint.Value")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("telechat_ascend.Checkpoint")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("telechat_ascend.Checkpoint.Value")))


Checkpoint, CheckpointValue = _message_classes()


class CkptWriter:
    """Appends tensors to a .ckpt file as MindSpore does.

    Records are framed by hand rather than through protobuf so that tensor bytes go straight to the file: from the
    array, or, for a tensor that is still a file mapping of its source (an unchanged safetensors tensor), by the
    kernel as `cp` copies (fields are written in field-number order, exactly as protobuf serialises them).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "wb", buffering=0)  # unbuffered: sendfile writes at the fd's position

    def add(self, name: str, array: np.ndarray) -> None:
        if array.dtype not in MS_TYPE_NAMES:
            raise TeleChatError(f"tensor {name}: dtype {array.dtype} has no MindSpore checkpoint type")
        mapped = isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.flags.c_contiguous
        if not mapped:
            array = np.ascontiguousarray(array)
        dims = b"".join(_key(1, 0) + _varint(d) for d in array.shape)
        tensor_type = _length_delimited(2, MS_TYPE_NAMES[array.dtype].encode())
        tag = _length_delimited(1, name.encode())
        for start, length in _slices(array):
            content_head = _key(3, 2) + _varint(length)
            tensor_size = len(dims) + len(tensor_type) + len(content_head) + length
            value_head = tag + _key(2, 2) + _varint(tensor_size)
            _write_all(self._file, _key(1, 2) + _varint(len(value_head) + tensor_size) + value_head + dims
                       + tensor_type + content_head)
            if mapped:
                _copy_from_source_file(array, start, length, self._file)
            else:
                _write_all(self._file, memoryview(array.reshape(-1).view(np.uint8))[start:start + length])

    def close(self) -> None:
        self._file.close()


def _slices(array: np.ndarray) -> list[tuple[int, int]]:
    """(byte offset, byte length) of the parts MindSpore splits a tensor into: np.array_split along axis 0 into
    ceil(nbytes / 512 MB) parts."""
    if array.nbytes <= SLICE_BYTES:
        return [(0, array.nbytes)]
    rows, row_bytes = array.shape[0], array.nbytes // array.shape[0]
    parts = math.ceil(array.nbytes / SLICE_BYTES)
    bounds = [k * (rows // parts) + min(k, rows % parts) for k in range(parts + 1)]
    return [(begin * row_bytes, (end - begin) * row_bytes) for begin, end in zip(bounds, bounds[1:])]


def _write_all(file, data) -> None:
    view = memoryview(data)
    while view:
        view = view[file.write(view):]


def _copy_from_source_file(array: np.memmap, start: int, length: int, out) -> None:
    with open(array.filename, "rb") as source:
        offset = array.offset + start
        end = offset + length
        try:
            while offset < end:
                copied = os.sendfile(out.fileno(), source.fileno(), offset, end - offset)
                if copied == 0:
                    raise TeleChatError(f"{array.filename}: ends before byte {end}")
                offset += copied
        except OSError:  # no in-kernel copy for these files: finish from the mapping
            _write_all(out, memoryview(array.reshape(-1).view(np.uint8))[offset - array.offset:start + length])


def _key(field_number: int, wire_type: int) -> bytes:
    return _varint(field_number << 3 | wire_type)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _key(field_number, 2) + _varint(len(payload)) + payload


def read_ckpt(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) in file order, joining the slices of split tensors; reads one Value at a time."""
    path = Path(path)
    pending_name, pending_parts, pending_meta = None, [], None
    with open(path, "rb") as file:
        while True:
            offset = file.tell()
            key = file.read(1)
            if not key:
                break
            if key != _key(1, 2):
                raise TeleChatError(f"{path}: not a MindSpore checkpoint (unexpected byte {key[0]:#x} at offset {offset})")
            length = _read_varint(file, path)
            payload = file.read(length)
            if len(payload) != length:
                raise TeleChatError(f"{path}: truncated at offset {offset} (a tensor record needs {length} bytes, "
                                    f"{len(payload)} remain)")
            try:
                value = CheckpointValue.FromString(payload)
            except Exception as error:  # protobuf's DecodeError and upb's errors share no public base class
                raise TeleChatError(f"{path}: corrupt tensor record at offset {offset}: {error}") from None
            if not value.HasField("tensor"):
                raise TeleChatError(f"{path}: parameter {value.tag} is not a dense tensor (map tensors are unsupported)")
            meta = (tuple(value.tensor.dims), value.tensor.tensor_type)
            if value.tag != pending_name and pending_name is not None:
                yield pending_name, _assemble(path, pending_name, pending_parts, *pending_meta)
                pending_parts = []
            pending_name, pending_meta = value.tag, meta
            pending_parts.append(value.tensor.tensor_content)
    if pending_name is not None:
        yield pending_name, _assemble(path, pending_name, pending_parts, *pending_meta)


def _assemble(path: Path, name: str, parts: list[bytes], dims: tuple[int, ...], type_name: str) -> np.ndarray:
    if type_name not in MS_DTYPES:
        raise TeleChatError(f"{path}: tensor {name} has unsupported type {type_name!r}")
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    dtype = MS_DTYPES[type_name]
    if dims == (0,):  # MindSpore writes scalars with dims [0]
        dims = ()
    if len(data) != math.prod(dims) * dtype.itemsize:
        raise TeleChatError(f"{path}: tensor {name} holds {len(data)} bytes, but shape {list(dims)} of {type_name} "
                            f"needs {math.prod(dims) * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype).reshape(dims)


def _read_varint(file: BinaryIO, path: Path) -> int:
    result, shift = 0, 0
    while True:
        byte = file.read(1)
        if not byte:
            raise TeleChatError(f"{path}: truncated inside a record header")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
