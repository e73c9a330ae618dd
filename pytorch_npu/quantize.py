"""Offline int8 quantization of a TeleChat folder and its accuracy check: the `quantize` and `eval-quant` commands.

w8a16: symmetric int8 weights per output channel (or per group along K) with fp16 scales, for query, key_value,
dense, gate_proj, up_proj and down_proj; embeddings, norms and lm_head stay float, as in the published int8 models.

w8a8 (the scheme Huawei's 300I Pro TeleChat uses): SmoothQuant-style outlier smoothing from real calibration
activations, then per-channel int8 weights and one static activation scale per layer (310P has no per-token scales).
Smoothing divides activation channel j by s_j = max|x_j|^α / max|W_j|^(1-α) and multiplies weight column j by it,
an exact rewrite of the float model: it is folded into the RMSNorm weight before query + key_value and before
gate_proj + up_proj, and into up_proj's rows before down_proj (silu(g)·(u/s) = (silu(g)·u)/s). dense is not smoothed:
its input channels are the attention context, which map onto key_value's per-head interleaved V rows and are shared
between query heads under GQA. Optionally the N linears whose quantization alone moves the next-token distribution
most (KL on the calibration prompts) stay float, like modelslim's disable_level.

Output folder: config.json with a `quantization` section (what the loader needs), the safetensors weights (int8
tensors, scales, float tensors in the source's dtype), tokenizer and generation files, and quant_config.json (the
full record: calibration, smoothing, per-layer sensitivity).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from telechat_ascend.checkpoint import atomic_output_dir, copy_side_files
from telechat_ascend.chips import check_quantization_for_chip
from telechat_ascend.config import TeleChatConfig
from telechat_ascend.errors import TeleChatError
from telechat_ascend.files import read_text
from telechat_ascend.msmodelslim_format import write_msmodelslim
from telechat_ascend.tokenizer import TeleChatTokenizer

from .backend import CALIB_SAMPLES, CALIB_TOKENS, FORMATS
from .device import resolve_device, resolve_dtype
from .pretrained import from_pretrained
from .quant import (QMAX, Int8Linear, check_quantization, quantizable_linears, set_chip,
                    set_module, weight_bytes)

FP16_TINY = torch.finfo(torch.float16).tiny
SENSITIVITY_TOKENS = 512  # calibration tokens scored per candidate layer (one forward pass per quantized linear)


# --- calibration ---------------------------------------------------------------------------------------------------

def read_prompts(path: str | Path, limit: int = CALIB_SAMPLES) -> list[str]:
    """Texts of a jsonl file: one JSON string or object per line, the object with "text", "prompt", "input" (plus its
    "output") or "dialog" (a list of {"role", "content"}), the demo SFT formats."""
    path = Path(path)
    if not path.is_file():
        raise TeleChatError(f"calibration file {path} not found")
    texts = []
    for number, line in enumerate(read_text(path, "calibration file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(_prompt_text(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise TeleChatError(f"{path}:{number}: not a prompt line ({error}); expected a JSON string or an object "
                                f"with text, prompt, input or dialog") from None
        if len(texts) == limit:
            break
    if not texts:
        raise TeleChatError(f"calibration file {path} holds no prompts")
    return texts


def _prompt_text(item) -> str:
    if isinstance(item, str):
        return item
    for key in ("text", "prompt"):
        if key in item:
            return str(item[key])
    if "input" in item:
        return str(item["input"]) + str(item.get("output", ""))
    return "".join(str(turn["content"]) for turn in item["dialog"])


def calibration_ids(tokenizer: TeleChatTokenizer, texts: list[str],
                    max_tokens: int = CALIB_TOKENS) -> list[torch.Tensor]:
    return [torch.tensor(ids[:max_tokens]) for ids in map(tokenizer.encode, texts) if ids]


@torch.no_grad()
def input_absmax(model, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |activation| entering each named linear over the calibration prompts."""
    stats: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            stats[name] = x if name not in stats else torch.maximum(stats[name], x)
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    try:
        for ids in batches:
            model(ids[None].to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _fold(act_max: torch.Tensor, consumers: list, alpha: float) -> torch.Tensor:
    """s for one shared input; multiplies the consumers' weight columns by it and returns it for the producer."""
    w_max = torch.stack([linear.weight.detach().abs().amax(0) for linear in consumers]).amax(0)
    s = (act_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
    for linear in consumers:
        linear.weight.data *= s
    return s


@torch.no_grad()
def smooth(model, act_max: dict[str, torch.Tensor], alpha: float) -> None:
    """Fold the SmoothQuant scales into the float model (an exact rewrite; see the module docstring)."""
    for i, block in enumerate(model.transformer.h):
        prefix = f"transformer.h.{i}."
        attn, mlp = block.self_attention, block.mlp
        block.input_layernorm.weight.data /= _fold(act_max[prefix + "self_attention.query"],
                                                  [attn.query, attn.key_value], alpha)
        block.post_attention_layernorm.weight.data /= _fold(act_max[prefix + "mlp.gate_proj"],
                                                           [mlp.gate_proj, mlp.up_proj], alpha)
        mlp.up_proj.weight.data /= _fold(act_max[prefix + "mlp.down_proj"], [mlp.down_proj], alpha)[:, None]


@torch.no_grad()
def sensitivity(model, names: list[str], make_int8, batches: list[torch.Tensor]) -> dict[str, float]:
    """Per linear, the mean KL(float ‖ quantized) of the next-token distributions with only that linear in int8."""
    batches = _first_tokens(batches, SENSITIVITY_TOKENS)
    reference = [model(ids[None].to(model.device), use_cache=False).logits[0].float().log_softmax(-1)
                 for ids in batches]
    errors = {}
    for name in names:
        linear = model.get_submodule(name)
        set_module(model, name, make_int8(linear, name))
        try:
            kl = [F.kl_div(model(ids[None].to(model.device), use_cache=False).logits[0].float().log_softmax(-1),
                           ref, log_target=True, reduction="sum") for ids, ref in zip(batches, reference)]
        finally:
            set_module(model, name, linear)
        errors[name] = float(sum(kl)) / sum(len(ids) for ids in batches)
    return errors


def _first_tokens(batches: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
    kept = []
    for ids in batches:
        if budget <= 0:
            break
        kept.append(ids[:budget])
        budget -= len(kept[-1])
    return kept


# --- quantization --------------------------------------------------------------------------------------------------

def quantize_model(model, method: str, group_size: int = 0, calibration: list[torch.Tensor] = (),
                   keep_float: int = 0, alpha: float = 0.5) -> dict:
    """Quantize a float TelechatForCausalLM in place, set config.quantization, and return the quant_config record."""
    check_options(method, group_size, keep_float, bool(calibration), alpha)
    names = quantizable_linears(model)
    if not 0 <= keep_float <= len(names):
        raise TeleChatError(f"--keep-float must be between 0 and the {len(names)} quantizable linears, "
                            f"got {keep_float}")
    record = {"method": method, "group_size": group_size, "bits": 8, "symmetric": True,
              "weight_scale": "per group along K" if group_size else "per output channel",
              "calibration": {"prompts": len(calibration), "tokens": sum(len(ids) for ids in calibration)}}

    input_scales = {}
    if method == "w8a8":
        smooth(model, input_absmax(model, names, calibration), alpha)
        act_max = input_absmax(model, names, calibration)
        # fp16-representable, as msModelSlim stores it (in the model's dtype): converting to it is then exact.
        input_scales = {name: float(torch.tensor(float(a.max()) / QMAX).clamp(min=FP16_TINY).half())
                        for name, a in act_max.items()}
        record["smoothing"] = {"alpha": alpha, "folded_into": ["input_layernorm", "post_attention_layernorm",
                                                               "up_proj (for down_proj)"]}
        record["activation_scale"] = "static per tensor, absmax / 127"

    def make_int8(linear, name):
        return Int8Linear.from_float(linear, method, group_size, input_scales.get(name))

    keep = []
    if keep_float:
        errors = sensitivity(model, names, make_int8, calibration)
        worst = set(sorted(names, key=errors.get, reverse=True)[:keep_float])
        keep = [name for name in names if name in worst]
        record["sensitivity"] = {"metric": "mean next-token KL(float || only this layer int8)", "kl": errors}
    for name in names:
        if name not in keep:
            set_module(model, name, make_int8(model.get_submodule(name), name))
    record["float_modules"] = keep
    model.config.quantization = {"method": method, "group_size": group_size, "float_modules": keep}
    return record


def check_options(method: str, group_size: int, keep_float: int, calibrated: bool, alpha: float = 0.5) -> None:
    if method not in ("w8a16", "w8a8"):
        raise TeleChatError(f"unknown quantization method {method!r}: expected w8a16 or w8a8 here (4-bit and GPTQ "
                            f"folders: --method gptq)")
    check_quantization({"method": method, "group_size": group_size})
    if not 0 <= alpha <= 1:  # also refuses nan, which would write NaN weights
        raise TeleChatError(f"--alpha (smoothing strength) must be a number in [0, 1], got {alpha}")
    if keep_float < 0:
        raise TeleChatError(f"--keep-float must be >= 0, got {keep_float}")
    if method == "w8a8" and not calibrated:
        raise TeleChatError("w8a8 needs calibration prompts (--calib FILE.jsonl) for its activation scales")
    if keep_float and not calibrated:
        raise TeleChatError("--keep-float ranks layers by their error on calibration prompts: give --calib FILE.jsonl")


def load_float_model(folder: str | Path):
    """(fp32 model, the checkpoint's float dtype) of a float TeleChat folder, with clear errors for anything else."""
    config = TeleChatConfig.from_file(folder)  # a clear error for a folder that is not TeleChat
    if "quantization" in config.extra:
        raise TeleChatError(f"{folder} is already quantized ({config.extra['quantization'].get('method')}); "
                            "quantize the float model")
    model = from_pretrained(folder, "auto").eval()
    dtype = model.dtype
    return model.float(), dtype


def _cast_float_tensors(model, dtype: torch.dtype) -> None:
    # Back to the checkpoint's dtype for saving; the scales keep theirs (fp16 weight, fp32 activation scales).
    for param in model.parameters():
        param.data = param.data.to(dtype)
    for module in model.modules():
        if isinstance(module, Int8Linear) and module.bias is not None:
            module.bias = module.bias.to(dtype)


def quantize_folder(src: str | Path, out: str | Path, method: str, calib: str | Path | None = None,
                    group_size: int | None = None, keep_float: int = 0, alpha: float = 0.5, soc: str | None = None,
                    force: bool = False, bits: int = 8, damp_percent: float = 0.01, fmt: str = "ours",
                    lm_head: bool = False) -> dict:
    """Quantize the float TeleChat folder `src` into `out`; returns the quant_config record. group_size None: per
    channel for w8a16, 128 (as published) for gptq. fmt "msmodelslim": msModelSlim's layout (MindIE, vllm-ascend)
    instead of ours. lm_head: gptq only, the head quantized too."""
    if fmt not in FORMATS:
        raise TeleChatError(f"unknown --format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "msmodelslim" and (method == "gptq" or group_size or keep_float):
        raise TeleChatError("--format msmodelslim takes --method w8a8 or w8a16 per channel, all linears quantized "
                            "(what vllm-ascend's W8A8 / W8A16 schemes load); not gptq, --group-size or --keep-float")
    if Path(out).exists() and not force:  # checked before the work, not only when the output is written
        raise TeleChatError(f"{out} already exists; pass --force to overwrite it")
    if method == "gptq":
        from .gptq import quantize_folder as gptq_folder
        check_quantization_for_chip(soc, "w8a16" if bits == 8 else "w4a16", group_size or 128, "gptq")
        if keep_float:
            raise TeleChatError("--keep-float does not apply to --method gptq: every linear is quantized")
        return gptq_folder(src, out, bits, calib, 128 if group_size is None else group_size, damp_percent, force,
                           progress=True, lm_head=lm_head)
    if lm_head:
        raise TeleChatError(f"--lm-head applies to --method gptq only; {method} keeps the head float, as the "
                            f"published int8 models do")
    group_size = group_size or 0
    # Everything that can be checked before loading the model is.
    check_options(method, group_size, keep_float, calib is not None, alpha)
    check_quantization_for_chip(soc, method, group_size, fmt)
    texts = read_prompts(calib) if calib else []
    model, dtype = load_float_model(src)
    calibration = calibration_ids(TeleChatTokenizer.from_pretrained(src), texts)
    float_bytes = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    with torch.no_grad():
        record = quantize_model(model, method, group_size, calibration, keep_float, alpha)
    _cast_float_tensors(model, dtype)
    record.update(source=str(src), soc=soc, float_dtype=str(dtype).removeprefix("torch."),
                  bytes={"float_model": float_bytes, **weight_bytes(model)})
    with atomic_output_dir(out if fmt == "ours" else Path(out).with_name(Path(out).name + ".ours"), True) as folder:
        copy_side_files(Path(src), folder)  # the tokenizer; save_pretrained writes config and generation config over
        model.save_pretrained(folder)
        (folder / "quant_config.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if fmt == "msmodelslim":  # one conversion path: ours, then `convert --to msmodelslim`
        ours = Path(out).with_name(Path(out).name + ".ours")
        try:
            write_msmodelslim(ours, out, force)
        finally:
            shutil.rmtree(ours)
    return record


# --- accuracy ------------------------------------------------------------------------------------------------------

@torch.no_grad()
def compare(float_model, int8_model, ids: list[int], seq_len: int = 256) -> dict:
    """Perplexity of both models on `ids` (consecutive windows of seq_len predicted tokens), the share of positions
    where their greedy (argmax) next tokens agree, and the relative L2 error of the int8 logits."""
    nll = {"float": 0.0, "int8": 0.0}
    agree = count = 0
    diff = norm = 0.0
    for start in range(0, len(ids) - 1, seq_len):
        window = torch.tensor(ids[start:start + seq_len + 1])
        inputs, targets = window[:-1][None], window[1:]
        logits_f = float_model(inputs.to(float_model.device), use_cache=False).logits[0].float().cpu()
        logits_q = int8_model(inputs.to(int8_model.device), use_cache=False).logits[0].float().cpu()
        nll["float"] += float(F.cross_entropy(logits_f, targets, reduction="sum"))
        nll["int8"] += float(F.cross_entropy(logits_q, targets, reduction="sum"))
        agree += int((logits_f.argmax(-1) == logits_q.argmax(-1)).sum())
        diff += float((logits_q - logits_f).square().sum())
        norm += float(logits_f.square().sum())
        count += len(targets)
    if not count:
        raise TeleChatError("the evaluation text is shorter than two tokens")
    ppl_f, ppl_q = math.exp(nll["float"] / count), math.exp(nll["int8"] / count)
    return {"tokens": count, "ppl_float": ppl_f, "ppl_int8": ppl_q, "ppl_increase": ppl_q / ppl_f - 1,
            "greedy_agreement": agree / count, "logits_rel_error": math.sqrt(diff / norm)}


def load_for_eval(folder: str | Path, device: str = "cpu", dtype: str | None = None, soc: str | None = None):
    """A float or int8 TeleChat folder ready for evaluation under a chip's dtype policy (`soc`, e.g. "310p": fp16)."""
    target = resolve_device(device)
    model = from_pretrained(folder, resolve_dtype(target, dtype, chip=soc))
    set_chip(model, soc)
    return model.to(target).eval()


# --- command line --------------------------------------------------------------------------------------------------

def run_quantize(args) -> None:
    record = quantize_folder(args.model, args.out, args.method, args.calib, args.group_size, args.keep_float,
                             args.alpha, args.soc, args.force, args.bits, args.damp_percent, args.format,
                             args.lm_head)
    if args.method == "gptq":
        print(f"gptq {args.bits}-bit, group {record['group_size']}: wrote {args.out} ({record['bytes'] / 1e6:.1f} MB "
              f"of weights; {record['linears']} linears{' with the head' if record['lm_head'] else ''}, "
              f"{record['calibration']['tokens']} calibration tokens)")
        return
    sizes = record["bytes"]
    quantized = sizes["int8"] + sizes["scales"] + sizes["float"]
    print(f"{args.method}: wrote {args.out} ({quantized / 1e6:.1f} MB, float model {sizes['float_model'] / 1e6:.1f} "
          f"MB); kept in float: {', '.join(record['float_modules']) or 'none'}")


def run_eval(args) -> None:
    if args.seq_len < 1 or args.max_tokens < 2:
        raise TeleChatError(f"--seq-len must be >= 1 and --max-tokens >= 2, got {args.seq_len} and {args.max_tokens}")
    tokenizer = TeleChatTokenizer.from_pretrained(args.float_model)
    ids = tokenizer.encode(read_text(args.text, "text file (--text)"))[:args.max_tokens]
    if len(ids) < 2:
        raise TeleChatError(f"{args.text}: holds {len(ids)} token(s); perplexity needs at least 2")
    float_model = load_for_eval(args.float_model, args.device, args.dtype, args.soc)
    int8_model = load_for_eval(args.int8_model, args.device, args.dtype, args.soc)
    if not any(isinstance(m, Int8Linear) for m in int8_model.modules()):
        raise TeleChatError(f"{args.int8_model} holds no int8 layers: pass the folder `quantize` wrote")
    # quantize keeps the embedding as it was (GPTQ folders: rounded to fp16, as published): a different one means
    # another float model.
    embeddings = (m.get_input_embeddings().weight.half() for m in (float_model, int8_model))
    if not torch.equal(*embeddings):
        raise TeleChatError(f"{args.int8_model} was not quantized from {args.float_model} (their word embeddings "
                            f"differ): pass the float model that `quantize --model` read")
    result = compare(float_model, int8_model, ids, args.seq_len)
    print(json.dumps(result, indent=2))
