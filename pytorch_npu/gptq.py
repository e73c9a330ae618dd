"""GPTQ folders in the PyTorch backend: loading Tele-AI's published int8/int4 models (AutoGPTQ v1 layout, see
telechat_ascend.gptq_format) onto the int8/int4 layers of pytorch_npu.quant, and writing GPTQ folders with the GPTQ
algorithm (`telechat-ascend quantize --method gptq`).

Loading unpacks each linear's codes once, at load time, into the layer's own integer layout (8-bit: int8 [N, K] with
fp16 group scales, the w8a16 format; 4-bit: two codes per byte, Int4Linear): nothing is dequantized to float.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from safetensors.torch import save_file
from tqdm import tqdm

from telechat_ascend.checkpoint import atomic_output_dir, copy_side_files, find_weights
from telechat_ascend.errors import TeleChatError
from telechat_ascend.gptq_format import BITS, QUANTIZE_CONFIG, GPTQConfig, group_packed, pack_linear
from telechat_ascend.tokenizer import TeleChatTokenizer
from telechat_ascend.config import HF_KEY_PREFIX
from telechat_ascend.weights import LM_HEAD, LM_HEAD_MODULE, canonical_hf_name, detect_hf_prefix, hf_name

from . import quant
from .backend import GPTQ_CALIB_SAMPLES, GPTQ_CALIB_TOKENS
from .configuration_telechat import TelechatConfig
from .quant import load_converted, numpy_to_torch, pack_int4, quantizable_linears


def _model_name(name: str) -> str:
    """The model's (prefixed) name of a checkpoint tensor name, prefixed (12B) or not (7B)."""
    return hf_name(canonical_hf_name(name), HF_KEY_PREFIX)


def load_gptq(model_class, folder: str | Path, dtype: torch.dtype | str = torch.float32):
    """A TelechatForCausalLM with integer layers from the GPTQ folder; float tensors in `dtype` ("auto": the
    config's torch_dtype). Every tensor is accounted for: missing, unexpected and misshapen ones are errors."""
    folder = Path(folder)
    weights = find_weights(folder)
    gptq: GPTQConfig = weights.gptq
    config = TelechatConfig.from_pretrained(folder, local_files_only=True)
    names = weights.names()
    detect_hf_prefix(names)  # a mixture of prefixed and unprefixed keys is an error
    packed_modules = {_model_name(n.rsplit(".", 1)[0]) for n in names if n.endswith(".qweight")}
    with torch.device("meta"):
        linears = quantizable_linears(model_class(config))
    config.quantization = {"method": "w8a16" if gptq.bits == 8 else "w4a16", "group_size": gptq.group_size,
                           "float_modules": [m for m in linears if m not in packed_modules], "lm_head": gptq.lm_head}
    if gptq.lm_head != (LM_HEAD_MODULE in packed_modules):
        raise TeleChatError(f"{folder / QUANTIZE_CONFIG}: lm_head {str(gptq.lm_head).lower()}, but the weights hold "
                            f"{'a packed' if not gptq.lm_head else 'a float'} lm_head: the two disagree")
    state = {}
    for path, item, *array in group_packed(weights.tensors(), str(folder)):
        if array:
            state[_model_name(item)] = numpy_to_torch(array[0])
            continue
        name = _model_name(item.name)
        if name not in linears and name != LM_HEAD_MODULE:
            raise TeleChatError(f"{path}: unexpected quantized tensors {item.name}.qweight (not a linear TeleChat "
                                f"quantizes)")
        codes, scales = item.codes(gptq, str(path))
        codes = torch.from_numpy(codes)
        state[name + ".weight"] = pack_int4(codes) if gptq.bits == 4 else codes
        state[name + ".weight_scale"] = torch.from_numpy(scales)
    return load_converted(model_class, config, state, dtype, folder)


# --- the GPTQ algorithm --------------------------------------------------------------------------------------------

def quantize_columns(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                     damp_percent: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2022) of one linear: (signed codes int8 [N, K], fp16 scales [N, K / group_size]).

    Columns are quantized in order; each one's rounding error is spread over the columns not yet quantized through
    the inverse Hessian H⁻¹ of the layer's inputs (H = Σ xᵀx over the calibration tokens, dampened by damp_percent
    of its mean diagonal), using the upper Cholesky factor of H⁻¹, whose row i is H_F⁻¹[i, i:] / √H_F⁻¹[i, i] for
    the columns F still free, and applied lazily per block of columns. Scales are symmetric per (row, group of
    inputs), taken from the error-updated weights when the group starts, and rounded to fp16 before use, so that
    code · stored scale is exactly what a loader computes."""
    w = weight.detach().float().clone()
    n, k = w.shape
    if k % group_size:
        raise TeleChatError(f"group_size {group_size} does not divide the input size {k}")
    block = group_size * max(1, 128 // group_size)  # whole groups per block, so a group's scale sees its updates
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: nothing to compensate, quantized as zero
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp_percent * torch.mean(torch.diag(h)) * torch.eye(k)
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise TeleChatError("the calibration Hessian is not positive definite even after dampening; give more "
                            "calibration prompts or a larger damp_percent") from None
    maxq, zero = 2 ** bits - 1, 2 ** (bits - 1)
    codes = torch.zeros(n, k, dtype=torch.int8)
    scales = torch.zeros(n, k // group_size, dtype=torch.float16)
    for start in range(0, k, block):
        stop = min(start + block, k)
        w1, u1 = w[:, start:stop].clone(), u[start:stop, start:stop]
        errors = torch.zeros_like(w1)
        for i in range(stop - start):
            column = start + i
            if column % group_size == 0:
                g = column // group_size
                absmax = w1[:, i:i + group_size].abs().amax(1)
                scales[:, g] = (2 * absmax / maxq).clamp(min=torch.finfo(torch.float16).tiny).half()
                scale = scales[:, g].float()
            q = torch.clamp(torch.round(w1[:, i] / scale) + zero, 0, maxq)
            codes[:, column] = (q - zero).to(torch.int8)
            error = (w1[:, i] - scale * (q - zero)) / u1[i, i]
            w1[:, i:] -= error[:, None] * u1[i, i:][None, :]
            errors[:, i] = error
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return codes, scales


SEQUENTIAL = (("self_attention.query", "self_attention.key_value"), ("self_attention.dense",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))  # AutoGPTQ's true_sequential order


class _BlockDone(Exception):
    """Raised after the block being quantized ran: the layers above it are not needed for its Hessians."""


def _hessians(model, linears: dict, last, calibration: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: Σ xᵀx} of each linear's inputs over the calibration prompts, running the model only up to the module
    `last` (the block being quantized, or the head)."""
    hessians = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}

    def accumulate(name):
        def hook(module, args):
            x = args[0].reshape(-1, module.in_features).float()
            hessians[name] += x.T @ x
        return hook

    def stop(module, args, output):
        raise _BlockDone

    handles = [m.register_forward_pre_hook(accumulate(name)) for name, m in linears.items()]
    handles.append(last.register_forward_hook(stop))
    try:
        for ids in calibration:
            try:
                model(ids[None].to(model.device), use_cache=False)
            except _BlockDone:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hessians


@torch.no_grad()
def quantize_model(model, calibration: list[torch.Tensor], config: GPTQConfig, progress=None
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ of every quantizable linear of a float TelechatForCausalLM, block by block and, within a block, in
    SEQUENTIAL order (all at once with true_sequential false), each Hessian from the inputs the layer gets with the
    layers before it already quantized; then the head if config.lm_head. The model's weights are replaced by their
    dequantized values as it goes; returns {module name: (codes, scales)}."""
    if not calibration:
        raise TeleChatError("GPTQ needs calibration prompts (--calib FILE.jsonl)")
    steps = SEQUENTIAL if config.true_sequential else (sum(SEQUENTIAL, ()),)
    groups = [({f"transformer.h.{index}.{name}": block.get_submodule(name) for name in step}, block)
              for index, block in enumerate(model.transformer.h) for step in steps]
    if config.lm_head:
        groups.append(({LM_HEAD_MODULE: model.lm_head}, model.lm_head))
    result = {}
    for linears, last in groups:
        hessians = _hessians(model, linears, last, calibration)
        for name, linear in linears.items():
            codes, scales = quantize_columns(linear.weight, hessians[name], config.bits, config.group_size,
                                             config.damp_percent)
            linear.weight.copy_(quant.dequantize_weight(codes, scales))
            result[name] = codes, scales
            if progress:
                progress.update(1)
    return result


def write_folder(model, quantized: dict, config: GPTQConfig, src: Path, out: Path, force: bool = False) -> Path:
    """The published layout: gptq_model-<b>bit-<g>g.safetensors (AutoGPTQ's name for its safetensors output),
    quantize_config.json naming it, config.json (torch_dtype float16) and the tokenizer files. Float tensors in
    fp16 as published, under the source's key prefix; a tied head stored once."""
    base = f"gptq_model-{config.bits}bit-{config.group_size}g"
    prefix = detect_hf_prefix(find_weights(src).names() or [HF_KEY_PREFIX])
    tied = model.config.tie_word_embeddings
    tensors = {}
    for name, tensor in model.state_dict().items():
        module, _, field = name.rpartition(".")
        stored = hf_name(canonical_hf_name(name), prefix)
        if tied and name == LM_HEAD:
            continue
        if module in quantized and field == "weight":
            packed = pack_linear(stored.rpartition(".")[0], *(t.numpy() for t in quantized[module]), config)
            tensors.update({key: torch.from_numpy(value) for key, value in packed.items()})
        else:
            tensors[stored] = tensor.detach().to(torch.float16).contiguous()
    with atomic_output_dir(out, force) as folder:
        copy_side_files(src, folder)
        save_file(tensors, folder / f"{base}.safetensors", metadata={"format": "pt"})
        model_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        model_config["torch_dtype"] = "float16"
        (folder / "config.json").write_text(json.dumps(model_config, indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
        (folder / QUANTIZE_CONFIG).write_text(json.dumps(config.to_json(base), indent=2) + "\n", encoding="utf-8")
    return Path(out)


def quantize_folder(src: str | Path, out: str | Path, bits: int, calib: str | Path, group_size: int = 128,
                    damp_percent: float = 0.01, force: bool = False, progress: bool = False,
                    lm_head: bool = False) -> dict:
    """`telechat-ascend quantize --method gptq`: the float folder `src` as a GPTQ folder `out` (with lm_head, the
    head quantized too: GPTQModel's `lm_head: true`); returns a record of what was done for the command to print."""
    from .quantize import calibration_ids, load_float_model, read_prompts
    config = GPTQConfig(bits, group_size, damp_percent, lm_head=lm_head)
    check_gptq_options(config)
    if calib is None:
        raise TeleChatError("gptq needs calibration prompts (--calib FILE.jsonl): its Hessians come from them")
    texts = read_prompts(calib, GPTQ_CALIB_SAMPLES)
    src = Path(src)
    model, _ = load_float_model(src)
    if lm_head and model.config.tie_word_embeddings:
        raise TeleChatError(f"--lm-head: {src} ties its head to the word embeddings (config.json tie_word_embeddings "
                            f"absent or true), which stay fp16; quantizing the head would store it twice")
    linears = quantizable_linears(model) + ([LM_HEAD_MODULE] if lm_head else [])
    for name in linears:
        if model.get_submodule(name).in_features % group_size:
            raise TeleChatError(f"--group-size {group_size} does not divide the input size of {name} "
                                f"({model.get_submodule(name).in_features})")
    calibration = calibration_ids(TeleChatTokenizer.from_pretrained(src), texts, GPTQ_CALIB_TOKENS)
    with tqdm(total=len(linears), unit="linear", desc="gptq", disable=not progress) as bar:
        quantized = quantize_model(model, calibration, config, bar)
    write_folder(model, quantized, config, src, Path(out), force)
    return {"bits": bits, "group_size": group_size, "linears": len(quantized), "lm_head": lm_head,
            "calibration": {"prompts": len(calibration), "tokens": sum(len(ids) for ids in calibration)},
            "bytes": sum(f.stat().st_size for f in Path(out).glob("gptq_model-*"))}


def check_gptq_options(config: GPTQConfig) -> None:
    if config.bits not in BITS:
        raise TeleChatError(f"--bits must be 4 or 8 for GPTQ, got {config.bits}")
    if config.group_size <= 0 or config.group_size % 32:
        raise TeleChatError(f"--group-size must be a positive multiple of 32 for GPTQ (the published folders use "
                            f"128), got {config.group_size}")
    if not 0 < config.damp_percent < 1:
        raise TeleChatError(f"--damp-percent must be in (0, 1), got {config.damp_percent}")
