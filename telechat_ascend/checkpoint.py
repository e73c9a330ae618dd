"""Checkpoint folders: read HF and MindSpore TeleChat weights one shard at a time, write sharded safetensors,
and publish an output folder only when it is complete.

Tensors travel as numpy arrays (bf16 through ml_dtypes), so the bytes of every dtype pass through unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np
from safetensors import TensorSpec, serialize_file

from telechat_ascend.errors import TeleChatError
from telechat_ascend.files import inside, read_json
from telechat_ascend.gptq_format import (QUANTIZE_CONFIG, GPTQConfig, is_gptq_folder, read_quantize_config,
                                         weight_file_candidates)
from telechat_ascend.mindspore_ckpt import CkptWriter, read_ckpt

DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16)}
# Everything a model folder needs beside its weights. Modeling .py files are deliberately not copied: nothing here
# runs remote code.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "specail_tokens_map.json")

HF_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
HF_BIN = ("pytorch_model.bin", "pytorch_model.bin.index.json")
MSMODELSLIM = ("quant_model_weights.safetensors", "quant_model_weights.safetensors.index.json")
MS_CKPT = "mindspore_model.ckpt"
MS_SAFETENSORS = ("mindspore_model.safetensors", "param_name_map.json")


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise TeleChatError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or a byte count")
    number, unit = float(match[1]), (match[2] or "B").upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(number * (1024 if "I" in unit else 1000) ** power)


def cast(array: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """Floating tensors to `dtype` (round to nearest even); integers and same-dtype tensors untouched."""
    if dtype is None or array.dtype == dtype or not _is_float(array.dtype):
        return array
    return array.astype(dtype)


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


# ---- reading ---------------------------------------------------------------------------------------------------------

@dataclass
class WeightFiles:
    """The weight files of a model folder and which tensor lives in which file."""
    folder: Path
    format: str  # "safetensors", "bin" (HF) or "ckpt", "ms-safetensors" (MindSpore)
    files: list[Path]
    weight_map: dict[str, Path] | None  # None for a single file whose keys are only known by reading it
    gptq: GPTQConfig | None = None  # a GPTQ folder (quantize_config.json): packed linears, see gptq_format

    @property
    def is_mindspore(self) -> bool:
        return self.format in ("ckpt", "ms-safetensors")

    def names(self) -> list[str] | None:
        """Tensor names without reading tensor data, where the format allows (not for a .ckpt)."""
        if self.weight_map is not None:
            return list(self.weight_map)
        if self.format in ("safetensors", "ms-safetensors"):
            return [tensor.name for path in self.files for tensor in _safetensors_header(path)]
        if self.format == "bin":
            return [name for path in self.files for name in _load_torch_file(path)]
        return None

    def tensors(self) -> Iterator[tuple[Path, str, np.ndarray]]:
        """(file, name, array) one tensor at a time, one file at a time."""
        for path in self.files:
            expected = None if self.weight_map is None else [n for n, p in self.weight_map.items() if p == path]
            for name, array in _read_file(path, self.format, expected):
                yield path, name, array


def find_weights(path: str | Path) -> WeightFiles:
    """Locates the weights of an HF or MindSpore TeleChat folder (or a lone .ckpt / .safetensors / .bin file)."""
    path = Path(path)
    if not path.exists():
        raise TeleChatError(f"{path}: no such file or folder")
    if path.is_file():
        kind = {".ckpt": "ckpt", ".safetensors": "safetensors", ".bin": "bin"}.get(path.suffix)
        if kind is None:
            raise TeleChatError(f"{path}: not a checkpoint file (.ckpt, .safetensors or .bin)")
        if kind == "safetensors" and path.name.startswith("mindspore_model"):
            kind = "ms-safetensors"
        return WeightFiles(path.parent, kind, [path], None)
    if is_gptq_folder(path):
        gptq = read_quantize_config(path)
        files = weight_file_candidates(path)
        if not files:
            raise TeleChatError(f"{path}: {QUANTIZE_CONFIG} is here but no GPTQ weights (gptq_model-*.safetensors or "
                                f".bin, or the model_file_base_name it names)")
        return WeightFiles(path, files[0].suffix[1:], files[:1], None, gptq)
    candidates = [
        ("ckpt", MS_CKPT, None),
        ("ms-safetensors", MS_SAFETENSORS[0], MS_SAFETENSORS[1]),
        ("safetensors", *HF_SAFETENSORS),
        ("bin", *HF_BIN),
        ("safetensors", *MSMODELSLIM),
    ]
    for kind, single, index in candidates:
        if index and (path / index).is_file():
            return _from_index(path, kind, path / index)
        if (path / single).is_file():
            return WeightFiles(path, kind, [path / single], None)
    raise TeleChatError(f"{path}: no weights found (looked for {MS_CKPT}, {MS_SAFETENSORS[1]}, "
                        f"{', '.join(HF_SAFETENSORS + HF_BIN)})")


def _from_index(folder: Path, kind: str, index: Path) -> WeightFiles:
    data = read_json(index, "weight index")
    weight_map = data.get("weight_map", data) if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise TeleChatError(f"{index}: expected a 'weight_map' of tensor name -> file name")
    files: list[Path] = []
    for file_name in dict.fromkeys(weight_map.values()):
        shard = inside(folder, file_name, index)
        if not shard.is_file():
            raise TeleChatError(f"{index}: names shard {file_name}, which does not exist in {folder}")
        files.append(shard)
    return WeightFiles(folder, kind, files, {name: folder / f for name, f in weight_map.items()})


# safetensors dtype codes (the format's spec) as numpy dtypes; bf16 and fp8 through ml_dtypes.
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class _StoredTensor:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file


def _safetensors_header(path: Path) -> list[_StoredTensor]:
    """The tensors of a safetensors file in storage order, checked against the file's size.

    Read by hand rather than with `safe_open` because conversion then maps one tensor at a time (see
    `_read_safetensors`); the library still writes every file we produce."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(8)
            header_size = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
            if header_size is None or 8 + header_size > size:
                raise TeleChatError(f"{path}: unreadable safetensors file (truncated header)")
            header = json.loads(file.read(header_size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TeleChatError(f"{path}: unreadable safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise TeleChatError(f"{path}: unreadable safetensors file (header is not a JSON object)")
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise TeleChatError(f"{path}: unreadable safetensors file (bad header entry for tensor {name})") from None
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise TeleChatError(f"{path}: unreadable safetensors file (tensor {name}: {end - begin} bytes for shape "
                                f"{list(shape)} of {entry['dtype']})")
        if 8 + header_size + end > size:
            raise TeleChatError(f"{path}: unreadable safetensors file (truncated: tensor {name} ends at byte "
                                f"{8 + header_size + end}, the file has {size})")
        tensors.append(_StoredTensor(name, dtype, shape, 8 + header_size + begin))
    return sorted(tensors, key=lambda t: t.offset)


def _read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Each tensor as a read-only memory map of its own bytes: no copy is made to convert it unchanged, and the
    pages are released when the caller drops the array, so memory holds one tensor, not the file."""
    for tensor in _safetensors_header(path):
        if math.prod(tensor.shape) == 0:
            yield tensor.name, np.empty(tensor.shape, tensor.dtype)
        else:
            yield tensor.name, np.memmap(path, tensor.dtype, "r", offset=tensor.offset, shape=tensor.shape)


def _read_file(path: Path, kind: str, expected: list[str] | None) -> Iterator[tuple[str, np.ndarray]]:
    if kind == "ckpt":
        yield from read_ckpt(path)
        return
    if kind == "bin":
        state = _load_torch_file(path)
        names = list(state)
    else:
        names = [tensor.name for tensor in _safetensors_header(path)]
    if expected is not None and set(expected) - set(names):
        missing = sorted(set(expected) - set(names))
        raise TeleChatError(f"{path}: the index places {missing[0]}"
                            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} here, but the file lacks it")
    if kind == "bin":
        for name in names:
            yield name, _torch_to_numpy(path, name, state.pop(name))
    else:
        yield from _read_safetensors(path)


def _load_torch_file(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise TeleChatError(f"{path}: reading pytorch .bin weights needs torch (pip install 'telechat-ascend[torch]')") from None
    try:
        # weights_only refuses any pickle that is not plain tensors and containers; mmap keeps the shard on disk,
        # which only the zip format (torch >= 1.6) allows: a legacy file is read whole instead.
        mmap = zipfile.is_zipfile(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError... for a bad file
        raise TeleChatError(f"{path}: unreadable pytorch weights file ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict):
        raise TeleChatError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


def _torch_to_numpy(path: Path, name: str, tensor) -> np.ndarray:
    import torch
    if not isinstance(tensor, torch.Tensor):
        raise TeleChatError(f"{path}: entry {name} is a {type(tensor).__name__}, not a tensor")
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bf16: move the bits through int16
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


# ---- writing ---------------------------------------------------------------------------------------------------------

class ShardedSafetensorsWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own)
    and an index. Holds at most one shard in memory.

    HF layout: model-0000i-of-0000N.safetensors + model.safetensors.index.json, or model.safetensors alone (always
    numbered, with the index, when `numbered`, as msModelSlim writes).
    MindSpore layout: mindspore_model-…safetensors + param_name_map.json (name -> file), MindFormers' name.
    """

    def __init__(self, folder: Path, stem: str, index_name: str, max_shard_bytes: int, metadata: dict[str, str],
                 hf_index: bool, numbered: bool = False):
        self.folder, self.stem, self.index_name, self.numbered = folder, stem, index_name, numbered
        self.max_shard_bytes, self.metadata, self.hf_index = max_shard_bytes, metadata, hf_index
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = np.ascontiguousarray(array)
        self._pending_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _flush(self) -> None:
        number = len(self._shards) + 1
        specs = {name: TensorSpec(dtype=a.dtype.name, shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes)
                 for name, a in self._pending.items()}
        serialize_file(specs, self.folder / f"{self.stem}-{number:05d}.partial", self.metadata)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        weight_map = {}
        for number, names in enumerate(self._shards, start=1):
            final = (f"{self.stem}.safetensors" if count == 1 and not self.numbered
                     else f"{self.stem}-{number:05d}-of-{count:05d}.safetensors")
            (self.folder / f"{self.stem}-{number:05d}.partial").rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        if count > 1 or self.numbered or not self.hf_index:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map} if self.hf_index else weight_map
            (self.folder / self.index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def hf_writer(folder: Path, max_shard_bytes: int) -> ShardedSafetensorsWriter:
    return ShardedSafetensorsWriter(folder, "model", HF_SAFETENSORS[1], max_shard_bytes, {"format": "pt"}, hf_index=True)


def mindspore_writer(folder: Path, fmt: str, max_shard_bytes: int):
    if fmt == "ckpt":
        return CkptWriter(folder / MS_CKPT)
    if fmt == "safetensors":
        stem = MS_SAFETENSORS[0].removesuffix(".safetensors")
        return ShardedSafetensorsWriter(folder, stem, MS_SAFETENSORS[1], max_shard_bytes, {"format": "ms"},
                                        hf_index=False)
    raise TeleChatError(f"unknown MindSpore checkpoint format {fmt!r}; choose ckpt or safetensors")


def copy_side_files(src_folder: Path, dst_folder: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src_folder / name).is_file():
            shutil.copy2(src_folder / name, dst_folder / name)
            copied.append(name)
    return copied


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling folder that becomes `dst` only if the block finishes; on any error it is removed,
    so no half-written checkpoint is ever visible at `dst`. An existing `dst` is replaced only with force=True, and
    only after the new folder is complete."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise TeleChatError(f"{dst} is a file, not a folder; choose another output path")
    if dst.exists() and not force:
        raise TeleChatError(f"{dst} already exists; pass --force to overwrite it")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(dst.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}-", dir=dst.parent))
    except OSError as error:
        raise TeleChatError(f"{dst}: cannot write there ({error.strerror})") from None
    try:
        yield tmp
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if error.errno in WRITE_ERRNOS:  # a full disk or quota, a read-only file system: nothing was published
            raise TeleChatError(f"{dst}: writing failed ({error.strerror}); nothing was written there") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, dst)


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)
_PARTIAL = re.compile(r"\..+\.(?:partial|replaced)-(\d+)(?:-.*)?")


def remove_stale_partials(folder: Path, everything: bool = False) -> list[Path]:
    """Deletes the hidden `.NAME.partial-PID-*` / `.NAME.replaced-PID` folders in `folder` that a killed writer left
    behind: those whose process no longer runs on this host, or all of them (`everything`, for a caller that holds
    the folder's lock, such as a trainer; its own `.NAME.partial` staging folders carry no pid)."""
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _PARTIAL.fullmatch(path.name)
        staging = path.name.startswith(".") and path.name.endswith(".partial")
        if not (match or (everything and staging)):
            continue
        if not everything and match and _process_alive(int(match[1])):
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish_dir(tmp: Path, dst: Path) -> None:
    """Makes the finished folder `tmp` (a sibling of `dst`) appear as `dst`, replacing any old `dst` only once the
    new one is in place."""
    _apply_umask(tmp)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.replaced-{os.getpid()}")
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(dst)


def _apply_umask(folder: Path) -> None:
    """mkdtemp and the safetensors writer create private (0700/0600) entries; give the published folder the
    permissions an ordinary mkdir and open would have."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
