"""msModelSlim's int8 folder (what MindIE and vllm-ascend load), to and from this project's int8 folders, in numpy.

An msModelSlim folder: quant_model_weights-0000i-of-0000n.safetensors + quant_model_weights.safetensors.index.json,
quant_model_description.json ({"model_quant_type", "version", "group_size", then every tensor name: "W8A8", "W8A16"
or "FLOAT"}), config.json with "quantize" (MindIE's key) and no quantization section, the tokenizer files. Tensor
names carry the `transformer.` prefix, the module names vLLM's TeleChat layers have. Per quantized linear, with
`dt` the model's float dtype (bfloat16 for a bf16 source, else float16 as on Atlas 300I and in the published
checkpoints; every float tensor is written in it):

| tensor        | W8A8 (static)                                   | W8A16                 |
|---------------|-------------------------------------------------|-----------------------|
| weight        | int8 [N, K]                                     | int8 [N, K]           |
| weight_scale  | dt [N, 1]                                       | dt [N, 1]             |
| weight_offset | dt [N, 1], zeros (symmetric)                    | dt [N, 1], zeros      |
| input_scale   | dt [1]                                          | —                     |
| input_offset  | int8 [1], zero (symmetric)                      | —                     |
| deq_scale     | input_scale · weight_scale in fp32, stored as the fp32 bit pattern in int64 for fp16 models, as fp32 for bf16 | — |
| quant_bias    | int32 [N] = round(bias / deq_scale), zeros without a bias | — |
| bias          | dt [N] where the layer has one (FLOAT)          | dt [N] (FLOAT)        |
Sources: serving-notes.md §5 and vllm-ascend's W8A8 / W8A16 linear schemes (`get_weight`, `get_pertensor_param`,
`get_perchannel_param`), which tests/test_msmodelslim.py reads to check this table.

Our int8 folders store per linear weight int8 [N, K], weight_scale fp16 [N], input_scale fp32 [] (w8a8), bias. The
conversion is exact for fp16 models: our quantizer rounds input_scale to fp16 (see pytorch_npu.quantize), and
deq_scale is the same fp32 product our kernels use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from telechat_ascend.checkpoint import (DTYPES, MSMODELSLIM, ShardedSafetensorsWriter, atomic_output_dir,
                                        copy_side_files, find_weights, parse_size)
from telechat_ascend.config import HF_KEY_PREFIX
from telechat_ascend.errors import TeleChatError
from telechat_ascend.files import read_json_object
from telechat_ascend.weights import canonical_hf_name, hf_name

DESCRIPTION = "quant_model_description.json"
STEM, INDEX = MSMODELSLIM[0].removesuffix(".safetensors"), MSMODELSLIM[1]
TYPES = {"w8a8": "W8A8", "w8a16": "W8A16"}
LINEARS = ("query", "key_value", "dense", "gate_proj", "up_proj", "down_proj")


def is_msmodelslim_folder(folder: str | Path) -> bool:
    return (Path(folder) / DESCRIPTION).is_file()


def encode_deq_scale(deq: np.ndarray, float_dtype: np.dtype) -> np.ndarray:
    """fp32 deq_scale as stored: its bit pattern in int64 for fp16 models (what npu_quant_matmul's int64 scale
    takes there), plain fp32 for bf16 ones."""
    deq = deq.astype(np.float32)
    if float_dtype == np.float16:
        return deq.view(np.int32).astype(np.int64)
    return deq


def decode_deq_scale(stored: np.ndarray) -> np.ndarray:
    if stored.dtype == np.int64:
        return stored.astype(np.int32).view(np.float32)  # the low 32 bits are the fp32 pattern
    return stored.astype(np.float32)


def _float_dtype(weights) -> np.dtype:
    """bf16 for a bf16 folder, else fp16: vllm-ascend's schemes declare their tensors for these two only (MindIE
    and 310P run fp16). Read from the tensors: config.json's torch_dtype can be stale."""
    first = next((array.dtype for _, _, array in weights.tensors() if array.dtype in DTYPES.values()), None)
    return DTYPES["bf16"] if first == DTYPES["bf16"] else DTYPES["fp16"]


# --- ours -> msModelSlim -------------------------------------------------------------------------------------------

def write_msmodelslim(src: str | Path, out: str | Path, force: bool = False, max_shard_size: str | int = "4GB") -> Path:
    """Our int8 folder `src` (`telechat-ascend quantize`, per-channel w8a16 or w8a8) as an msModelSlim folder."""
    src = Path(src)
    config = read_json_object(src / "config.json", "config")
    quantization = config.get("quantization")
    if not isinstance(quantization, dict) or quantization.get("method") not in TYPES:
        raise TeleChatError(f"{src}: not an int8 folder of `telechat-ascend quantize` (config.json has no w8a16 / "
                            f"w8a8 quantization section); quantize the float model first")
    method = quantization["method"]
    if quantization.get("group_size", 0):
        raise TeleChatError(f"{src}: group_size {quantization['group_size']}: vllm-ascend's W8A16 takes per-channel "
                            f"scales only ([N, 1]); quantize with --group-size 0 for the msModelSlim format")
    weights = find_weights(src)
    float_dtype = _float_dtype(weights)
    kind = TYPES[method]
    names = weights.names()
    modules = {n.rsplit(".", 1)[0] for n in names if n.endswith(".weight_scale")}
    needed = {m: {f for f in ("weight", "weight_scale", "input_scale", "bias") if f"{m}.{f}" in names} for m in modules}
    description = {"model_quant_type": kind, "version": "1.0.0", "group_size": 0}
    pending: dict[str, dict[str, np.ndarray]] = {}
    with atomic_output_dir(out, force) as folder:
        writer = ShardedSafetensorsWriter(folder, STEM, INDEX, parse_size(max_shard_size), {"format": "pt"},
                                          hf_index=True, numbered=True)

        def add(name: str, array: np.ndarray, scheme: str) -> None:
            name = hf_name(canonical_hf_name(name), HF_KEY_PREFIX)
            writer.add(name, array)
            description[name] = scheme

        for path, name, array in weights.tensors():
            module, _, field = name.rpartition(".")
            if module not in modules:
                add(name, array.astype(float_dtype) if array.dtype in DTYPES.values() else array, "FLOAT")
                continue
            pending.setdefault(module, {})[field] = np.asarray(array)
            if set(pending[module]) == needed[module]:
                for tensor_name, value, scheme in _msmodelslim_linear(module, pending.pop(module), method,
                                                                      float_dtype, str(path)):
                    add(tensor_name, value, scheme)
        writer.close()
        copy_side_files(src, folder)
        del config["quantization"]
        config.update(quantize=method, torch_dtype="bfloat16" if float_dtype == DTYPES["bf16"] else "float16")
        (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return Path(out)


def _msmodelslim_linear(module: str, t: dict[str, np.ndarray], method: str, dt: np.dtype, source: str):
    kind = TYPES[method]
    weight, scale = t["weight"], t["weight_scale"].astype(np.float32)
    n = weight.shape[0]
    if weight.dtype != np.int8 or scale.shape != (n,):
        raise TeleChatError(f"{source}: {module}: expected int8 weight [N, K] and per-channel weight_scale [N], got "
                            f"{weight.dtype} {list(weight.shape)} and {list(scale.shape)}")
    yield f"{module}.weight", weight, kind
    yield f"{module}.weight_scale", scale.astype(dt)[:, None], kind
    yield f"{module}.weight_offset", np.zeros((n, 1), dt), kind
    if method == "w8a8":
        input_scale = np.float32(t["input_scale"].reshape(()))
        deq = (input_scale * scale).astype(np.float32)
        bias = t["bias"].astype(np.float32) if "bias" in t else np.zeros(n, np.float32)
        yield f"{module}.input_scale", np.array([input_scale], dtype=dt), kind
        yield f"{module}.input_offset", np.zeros(1, np.int8), kind
        yield f"{module}.deq_scale", encode_deq_scale(deq, dt), kind
        yield f"{module}.quant_bias", np.round(bias / deq).astype(np.int32), kind
    if "bias" in t:
        yield f"{module}.bias", t["bias"].astype(dt), "FLOAT"


# --- msModelSlim -> ours -------------------------------------------------------------------------------------------

def read_msmodelslim(folder: str | Path) -> tuple[dict, Iterator[tuple[str, np.ndarray]]]:
    """(config.json `quantization` section, our-format tensors named with the transformer. prefix) of an
    msModelSlim folder; refuses by name what our int8 layers do not compute (offsets, groups, mixed schemes)."""
    folder = Path(folder)
    description = read_json_object(folder / DESCRIPTION, "msModelSlim description")
    kind = description.get("model_quant_type")
    methods = {v: k for k, v in TYPES.items()}
    if kind not in methods:
        raise TeleChatError(f"{folder / DESCRIPTION}: model_quant_type {kind!r} is not supported; this backend runs "
                            f"W8A8 (static) and W8A16")
    entries = {k: v for k, v in description.items() if k not in ("model_quant_type", "version", "group_size",
                                                                   "metadata", "optional")}
    bad = sorted({v for v in entries.values() if v not in (kind, "FLOAT")}, key=str)
    if bad:
        name = next(k for k, v in entries.items() if v == bad[0])
        raise TeleChatError(f"{folder / DESCRIPTION}: {name} is {bad[0]!r} in a {kind} model; mixed schemes are not "
                            f"supported")
    if description.get("group_size", 0):
        raise TeleChatError(f"{folder / DESCRIPTION}: group_size {description['group_size']}: per-group W8A16 is not "
                            f"read here (per channel only)")
    files = find_weights(folder)
    quantized = {n.rsplit(".", 1)[0] for n, v in entries.items() if v == kind and n.endswith(".weight")}
    float_modules = sorted({n.rsplit(".", 1)[0] for n in entries if n.endswith(".weight")
                            and n.rsplit(".", 2)[-2] in LINEARS} - quantized)
    quantization = {"method": methods[kind], "group_size": 0, "float_modules": float_modules}
    return quantization, _our_tensors(files, quantized, methods[kind])


def _our_tensors(weights, quantized: set[str], method: str):
    pending: dict[str, dict[str, np.ndarray]] = {}
    fields = {"w8a8": {"weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "deq_scale",
                       "quant_bias"},
              "w8a16": {"weight", "weight_scale", "weight_offset"}}[method]
    has_bias = {n.rsplit(".", 1)[0] for n in (weights.names() or []) if n.endswith(".bias")}
    for path, name, array in weights.tensors():
        module, _, field = name.rpartition(".")
        if module not in quantized:
            yield name, np.asarray(array)
            continue
        pending.setdefault(module, {})[field] = np.asarray(array)
        if set(pending[module]) >= fields | ({"bias"} if module in has_bias else set()):
            yield from _our_linear(module, pending.pop(module), method, str(path))
    if pending:
        module, parts = next(iter(pending.items()))
        raise TeleChatError(f"{weights.folder}: {module} lacks {', '.join(sorted(fields - set(parts)))}")


def _our_linear(module: str, t: dict[str, np.ndarray], method: str, source: str):
    where = f"{source}: {module}"
    weight = t["weight"]
    n = weight.shape[0]
    if weight.dtype != np.int8:
        raise TeleChatError(f"{where}.weight is {weight.dtype}; W8A8 / W8A16 weights are int8")
    if t["weight_scale"].shape != (n, 1):
        raise TeleChatError(f"{where}.weight_scale has shape {list(t['weight_scale'].shape)}, expected [{n}, 1] (per "
                            f"channel)")
    if np.any(t["weight_offset"].astype(np.float32) != 0):
        raise TeleChatError(f"{where}.weight_offset is not zero: asymmetric weights are not supported")
    scale = t["weight_scale"].astype(np.float32)[:, 0]
    yield f"{module}.weight", weight
    yield f"{module}.weight_scale", scale.astype(np.float16)
    bias = t["bias"].astype(np.float32) if "bias" in t else None
    if method == "w8a8":
        if np.any(t["input_offset"] != 0):
            raise TeleChatError(f"{where}.input_offset is {int(t['input_offset'].reshape(-1)[0])}: asymmetric "
                                f"activations are not supported")
        input_scale = np.float32(t["input_scale"].astype(np.float32).reshape(-1)[0])
        deq = decode_deq_scale(t["deq_scale"])
        if not np.allclose(deq, input_scale * scale, rtol=1e-6, atol=0):
            raise TeleChatError(f"{where}.deq_scale is not input_scale · weight_scale (the folder is inconsistent)")
        yield f"{module}.input_scale", np.array(input_scale, dtype=np.float32)
        if bias is None and np.any(t["quant_bias"]):
            bias = t["quant_bias"].astype(np.float32) * deq
    if "bias" in t:
        yield f"{module}.bias", t["bias"]
    elif bias is not None:  # only quant_bias was stored: bias = quant_bias · deq_scale
        yield f"{module}.bias", bias
