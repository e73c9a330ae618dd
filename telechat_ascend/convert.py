"""HF ⇄ MindSpore weight conversion, one tensor at a time.

Every direction is the same loop: read a tensor, look it up in the name table (`weights.tensor_specs`), check its
shape against config.json, cast if asked, write it under its new name. Peak memory is one tensor plus, for
safetensors output, the shard being assembled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from telechat_ascend.checkpoint import (DTYPES, atomic_output_dir, cast, copy_side_files, find_weights, hf_writer,
                                        mindspore_writer, parse_size)
from telechat_ascend.config import TeleChatConfig
from telechat_ascend.errors import TeleChatError
from telechat_ascend.weights import LM_HEAD, TensorSpec, check_names, check_shape, detect_hf_prefix, hf_name, \
    tensor_specs

DEFAULT_SHARD_SIZE = "2GB"
TARGETS = ("mindspore", "hf")
MINDSPORE_FORMATS = ("ckpt", "safetensors")

# What a MindFormers training checkpoint holds besides the weights: optimizer moments, loss-scale and step counters.
# Conversion drops them (and says how many); anything else unknown is an error.
_TRAINING_STATE = re.compile(
    r"(adam_[mv]|moment[12]|accu_grads|exp_avg|exp_avg_sq)\..+"
    r"|global_step|learning_rate|current_iterator_step|last_overflow_iterator_step|epoch_num|step_num"
    r"|loss_scale|scale_sense|beta1_power|beta2_power")


@dataclass
class ConversionReport:
    output: Path
    tensors: int = 0
    bytes: int = 0
    skipped_training_state: list[str] = field(default_factory=list)
    side_files: list[str] = field(default_factory=list)


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, dtype: str | None = None, fmt: str = "ckpt",
                       force: bool = False, max_shard_size: str | int = DEFAULT_SHARD_SIZE,
                       progress: bool = False) -> ConversionReport:
    """Converts the TeleChat checkpoint folder `src` (HF or MindSpore, any published layout) into `dst`.

    to="mindspore": MindFormers research/telechat names, as one .ckpt (fmt="ckpt") or sharded safetensors.
    to="hf": HF names (the source's key prefix when it is HF, else the prefix the config's release uses), as sharded
    safetensors; this also turns pytorch .bin folders into safetensors.
    """
    if to not in TARGETS:
        raise TeleChatError(f"unknown target {to!r}; choose one of {', '.join(TARGETS)}")
    if fmt not in MINDSPORE_FORMATS:
        raise TeleChatError(f"unknown format {fmt!r}; choose one of {', '.join(MINDSPORE_FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise TeleChatError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    src = Path(src)
    if not src.exists():
        raise TeleChatError(f"{src}: no such file or folder")
    src_folder = src if src.is_dir() else src.parent
    config = TeleChatConfig.from_file(src_folder)
    weights = find_weights(src)
    plan = _name_plan(config, weights.is_mindspore, weights.names(), str(src), to)
    shard_bytes = parse_size(max_shard_size)

    report = ConversionReport(output=Path(dst))
    with atomic_output_dir(dst, force) as out:
        if to == "mindspore":
            writer = mindspore_writer(out, fmt, shard_bytes)
        else:
            writer = hf_writer(out, shard_bytes)
        seen: set[str] = set()
        for path, name, array in tqdm(weights.tensors(), total=len(plan), unit="tensor", disable=not progress,
                                      desc=f"convert to {to}"):
            if name not in plan:
                if weights.is_mindspore and _TRAINING_STATE.fullmatch(name):
                    report.skipped_training_state.append(name)
                    continue
                raise TeleChatError(f"{path}: unexpected tensor {name} (not part of a TeleChat model with this "
                                    f"config.json)")
            if name in seen:
                raise TeleChatError(f"{path}: tensor {name} appears twice")
            seen.add(name)
            spec, out_name = plan[name]
            check_shape(name, array.shape, spec.shape, str(path))
            array = cast(array, DTYPES[dtype] if dtype else None)
            writer.add(out_name, array)
            report.tensors += 1
            report.bytes += array.nbytes
        check_names(list(seen), list(plan), str(src))
        writer.close()
        report.side_files = copy_side_files(src_folder, out)
    return report


def _name_plan(config: TeleChatConfig, from_mindspore: bool, names: list[str] | None, source: str,
               to: str) -> dict[str, tuple[TensorSpec, str]]:
    """source name -> (spec, output name) for every tensor the config implies; checks the source's names when they
    can be known before reading (every format but .ckpt, whose names are checked while streaming)."""
    specs = tensor_specs(config)
    if from_mindspore:
        source_names = {spec.ms_name: spec for spec in specs}
        hf_prefix = config.hf_key_prefix
        names = None if names is None else [n for n in names if not _TRAINING_STATE.fullmatch(n)]
    else:
        hf_prefix = detect_hf_prefix(names)
        source_names = {hf_name(spec.hf_name, hf_prefix): spec for spec in specs}
    if names is not None:
        check_names(names, list(source_names), source, _tying_hint(config, names))
    return {name: (spec, spec.ms_name if to == "mindspore" else hf_name(spec.hf_name, hf_prefix))
            for name, spec in source_names.items()}


def _tying_hint(config: TeleChatConfig, names: list[str]) -> str:
    has_head = LM_HEAD in names  # the same name in HF and MindFormers
    if config.tied and has_head:
        return (" (config.json ties lm_head to the embeddings — tie_word_embeddings is absent or true — but the "
                "checkpoint has its own lm_head)")
    if not config.tied and not has_head:
        return " (config.json sets tie_word_embeddings false, but the checkpoint has no lm_head)"
    return ""
