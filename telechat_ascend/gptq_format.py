"""GPTQ folders as Tele-AI publish them (AutoGPTQ's v1 format), in numpy: the quantize_config.json rules, the
packing of the integer codes, and dequantization (for `convert`).

Per quantized linear `<m>` (query, key_value, dense, gate_proj, up_proj, down_proj of every layer):
    <m>.qweight  int32 [K·bits/32, N]  code of input row r·(32/bits)+j of column n at bit offset bits·j
    <m>.qzeros   int32 [K/group, N·bits/32]  the zero of (group, column), packed along the column axis, stored
                                           as zero − 1 (v1's quirk: symmetric 8-bit stores 127 for a zero of 128)
    <m>.scales   fp16  [K/group, N]
    <m>.g_idx    int32 [K]  group of each input row: i // group unless desc_act reordered them
    <m>.bias     fp16  [N]  dense and down_proj
W[n, k] = scales[g, n] · (code[k, n] − zero[g, n]) with g = g_idx[k]. Embeddings and norms stay fp16, and so does
lm_head unless quantize_config.json sets GPTQModel's `lm_head: true` (then lm_head is packed like the others too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from telechat_ascend.errors import TeleChatError
from telechat_ascend.files import read_json_object

QUANTIZE_CONFIG = "quantize_config.json"
PACKED = ("qweight", "qzeros", "scales", "g_idx")
BITS = (4, 8)


@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int
    damp_percent: float = 0.01
    desc_act: bool = False
    true_sequential: bool = True
    lm_head: bool = False  # GPTQModel's field: the output head is quantized too (AutoGPTQ never does)

    @property
    def zero(self) -> int:
        """The zero point of symmetric codes: the middle of 0 .. 2^bits − 1."""
        return 1 << (self.bits - 1)

    def to_json(self, file_base_name: str) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "damp_percent": self.damp_percent,
                "desc_act": self.desc_act, "sym": True, "true_sequential": self.true_sequential,
                "model_name_or_path": None, "model_file_base_name": file_base_name,
                **({"lm_head": True} if self.lm_head else {})}  # the published layout has no such field


def is_gptq_folder(folder: str | Path) -> bool:
    return (Path(folder) / QUANTIZE_CONFIG).is_file()


def read_quantize_config(folder: str | Path) -> GPTQConfig:
    """The folder's quantize_config.json, refusing by field name what the loaders here do not run."""
    path = Path(folder) / QUANTIZE_CONFIG
    data = read_json_object(path, "GPTQ quantize config")
    bits, group, sym = data.get("bits"), data.get("group_size", -1), data.get("sym", True)
    if bits not in BITS or type(bits) is not int:
        raise TeleChatError(f"{path}: bits {bits!r} is not supported; the kernels here run 4 or 8 bits")
    if type(group) is not int or group <= 0 or group % 32:
        raise TeleChatError(f"{path}: group_size {group!r} is not supported; give a positive multiple of 32 (the "
                            f"published folders use 128; -1, one group per row, is not run here)")
    if sym is not True:
        raise TeleChatError(f"{path}: sym {sym!r}: asymmetric GPTQ is not supported (the NPU and CPU kernels here "
                            f"take symmetric codes); quantize with sym true")
    fmt = data.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise TeleChatError(f"{path}: checkpoint_format {fmt!r} is not supported; only AutoGPTQ's v1 'gptq' layout")
    method = data.get("quant_method", "gptq")
    if method != "gptq":
        raise TeleChatError(f"{path}: quant_method {method!r}; this is not a GPTQ folder")
    damp = data.get("damp_percent", 0.01)
    if not isinstance(damp, (int, float)) or not 0 < damp < 1:
        raise TeleChatError(f"{path}: damp_percent {damp!r} must be a number in (0, 1)")
    lm_head = data.get("lm_head", False)
    if type(lm_head) is not bool:
        raise TeleChatError(f"{path}: lm_head {lm_head!r} must be true or false")
    return GPTQConfig(bits, group, float(damp), bool(data.get("desc_act", False)),
                      bool(data.get("true_sequential", True)), lm_head)


def weight_file_candidates(folder: Path) -> list[Path]:
    """The weight files of a GPTQ folder: AutoGPTQ's `gptq_model-<b>bit-<g>g` (or quantize_config's
    model_file_base_name) as .safetensors or .bin."""
    data = read_json_object(folder / QUANTIZE_CONFIG, "GPTQ quantize config")
    base = data.get("model_file_base_name")
    stems = [base] if isinstance(base, str) and base and Path(base).name == base else []  # a name, not a path
    stems += sorted({p.name.rsplit(".", 1)[0] for p in folder.glob("gptq_model-*")})
    return [folder / f"{stem}.{ext}" for stem in stems for ext in ("safetensors", "bin")
            if (folder / f"{stem}.{ext}").is_file()]


# --- packing -------------------------------------------------------------------------------------------------------

def unpack(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """uint8 codes from int32 words packing 32/bits codes each along `axis` (0: rows, as qweight; 1: columns, as
    qzeros), the lowest bits first."""
    per_word = 32 // bits
    words = np.ascontiguousarray(packed).view(np.uint32)
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    if axis == 0:
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return codes.reshape(-1, words.shape[1]).astype(np.uint8)
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1).astype(np.uint8)


def pack(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """The inverse of unpack: int32 words of 32/bits codes along `axis`."""
    per_word = 32 // bits
    codes = codes.astype(np.uint32)
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    if axis == 0:
        grouped = codes.reshape(-1, per_word, codes.shape[1]) << shifts[None, :, None]
        words = np.bitwise_or.reduce(grouped, axis=1)
    else:
        grouped = codes.reshape(codes.shape[0], -1, per_word) << shifts[None, None, :]
        words = np.bitwise_or.reduce(grouped, axis=2)
    return np.ascontiguousarray(words).view(np.int32)


@dataclass
class PackedLinear:
    """One linear's GPTQ tensors, checked against each other and the config."""
    name: str  # module name, e.g. transformer.h.0.mlp.up_proj
    qweight: np.ndarray
    qzeros: np.ndarray
    scales: np.ndarray
    g_idx: np.ndarray | None

    def codes(self, config: GPTQConfig, source: str) -> tuple[np.ndarray, np.ndarray]:
        """(signed codes int8 [N, K] = code − zero, fp16 scales [N, K/group]) in the nn.Linear layout; the zeros
        must be the symmetric ones and g_idx the plain i // group (not reordered)."""
        bits, group = config.bits, config.group_size
        where = f"{source}: {self.name}"
        words_k, n = self.qweight.shape
        k = words_k * 32 // bits
        if self.qweight.dtype != np.int32 or self.qzeros.dtype != np.int32:
            raise TeleChatError(f"{where}.qweight/.qzeros must be int32, got {self.qweight.dtype}/{self.qzeros.dtype}")
        if k % group:
            raise TeleChatError(f"{where}: input size {k} is not a multiple of group_size {group}")
        expected = {"qzeros": (k // group, n * bits // 32), "scales": (k // group, n)}
        for field, shape in expected.items():
            if getattr(self, field).shape != shape:
                raise TeleChatError(f"{where}.{field} has shape {list(getattr(self, field).shape)}, expected "
                                    f"{list(shape)} for qweight {list(self.qweight.shape)} at {bits} bits, "
                                    f"group_size {group} (quantize_config.json)")
        if self.g_idx is not None:
            if self.g_idx.shape != (k,) or not np.array_equal(self.g_idx, np.arange(k) // group):
                raise TeleChatError(f"{where}.g_idx is not i // group_size: desc_act reordered the input rows "
                                    f"(quantize_config.json desc_act {config.desc_act}); reordered groups are not "
                                    f"supported, quantize with desc_act false")
        stored = unpack(self.qzeros, bits, axis=1).astype(np.int32) + 1  # v1 stores zero − 1
        stored &= (1 << bits) - 1  # v1 stores 2^bits − 1 + 1 wrapped: a zero of 0 comes back as 2^bits
        if not np.all(stored == config.zero):
            value = int(stored.flat[np.flatnonzero(stored != config.zero)[0]])
            raise TeleChatError(f"{where}.qzeros holds zero {value}, not the symmetric {config.zero}: an asymmetric "
                                f"checkpoint under quantize_config.json sym true; asymmetric GPTQ is not supported")
        codes = unpack(self.qweight, bits, axis=0).astype(np.int16) - config.zero  # [K, N]
        return codes.T.astype(np.int8), np.ascontiguousarray(self.scales.T).astype(np.float16)

    def dequantize(self, config: GPTQConfig, source: str) -> np.ndarray:
        """fp32 [N, K]: scale · (code − zero)."""
        codes, scales = self.codes(config, source)
        n, k = codes.shape
        return (codes.reshape(n, -1, config.group_size) * scales.astype(np.float32)[..., None]).reshape(n, k)


def pack_linear(name: str, codes: np.ndarray, scales: np.ndarray, config: GPTQConfig) -> dict[str, np.ndarray]:
    """The published tensors of one linear from signed codes int8 [N, K] (code − zero) and scales [N, K/group]."""
    n, k = codes.shape
    unsigned = (codes.astype(np.int16) + config.zero).astype(np.uint8).T  # [K, N]
    zeros = np.full((k // config.group_size, n), config.zero - 1, dtype=np.uint8)
    return {f"{name}.qweight": pack(unsigned, config.bits, axis=0),
            f"{name}.qzeros": pack(zeros, config.bits, axis=1),
            f"{name}.scales": np.ascontiguousarray(scales.T).astype(np.float16),
            f"{name}.g_idx": (np.arange(k) // config.group_size).astype(np.int32)}


def group_packed(tensors, source: str):
    """From a stream of (path, name, array), PackedLinear for each quantized linear once all its tensors have come,
    and (path, name, array) for every other tensor. Tensors of a module may come in any order."""
    partial: dict[str, dict[str, np.ndarray]] = {}
    for path, name, array in tensors:
        module, _, field = name.rpartition(".")
        if field not in PACKED:
            yield path, name, array
            continue
        parts = partial.setdefault(module, {})
        parts[field] = array
        if all(f in parts for f in PACKED):
            del partial[module]
            yield path, PackedLinear(module, parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"])
    for module, parts in partial.items():
        missing = [f for f in PACKED if f not in parts and f != "g_idx"]
        if missing:
            raise TeleChatError(f"{source}: {module} has {', '.join(sorted(parts))} but no {', '.join(missing)}")
        yield source, PackedLinear(module, parts["qweight"], parts["qzeros"], parts["scales"], None)


def float_names(names: list[str]) -> list[str]:
    """The names a GPTQ folder's tensors have in the float model: <m>.weight for each packed linear."""
    out = []
    for name in names:
        module, _, field = name.rpartition(".")
        if field == "qweight":
            out.append(f"{module}.weight")
        elif field not in PACKED:
            out.append(name)
    return out
