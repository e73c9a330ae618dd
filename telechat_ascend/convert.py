"""HF ⇄ MindSpore weight conversion, one tensor at a time.

Every direction is the same loop: read a tensor, look it up in the name table (`weights.tensor_specs`), check its
shape against config.json, cast if asked, write it under its new name. Peak memory is one tensor plus, for
safetensors output, the shard being assembled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from telechat_ascend.checkpoint import (DTYPES, atomic_output_dir, cast, copy_side_files, find_weights, hf_writer,
                                        mindspore_writer, parse_size)
from telechat_ascend.config import TeleChatConfig
from telechat_ascend.errors import TeleChatError
from telechat_ascend.files import read_json_object
from telechat_ascend.gptq_format import float_names, group_packed
from telechat_ascend.msmodelslim_format import DESCRIPTION, STEM, write_msmodelslim
from telechat_ascend.weights import LM_HEAD, TensorSpec, check_names, check_shape, detect_hf_prefix, hf_name, \
    tensor_specs

DEFAULT_SHARD_SIZE = "2GB"
TARGETS = ("mindspore", "hf", "msmodelslim")  # msmodelslim: from an int8 folder of `quantize`
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
    if to == "msmodelslim":
        out = write_msmodelslim(src, dst, force, max_shard_size)
        written = [n for n in read_json_object(out / DESCRIPTION, "description") if "." in n]
        return ConversionReport(output=out, tensors=len(written), bytes=sum(f.stat().st_size for f in
                                                                            out.glob("*.safetensors")),
                                side_files=[f.name for f in out.iterdir() if not f.name.startswith(STEM)])
    if fmt not in MINDSPORE_FORMATS:
        raise TeleChatError(f"unknown format {fmt!r}; choose one of {', '.join(MINDSPORE_FORMATS)}")
    shard_bytes = parse_size(max_shard_size)
    conversion = ConvertedTensors(src, to, dtype)
    if Path(dst).resolve() in (conversion.src.resolve(), conversion.folder.resolve()):
        raise TeleChatError(f"{dst} is the source itself; write the conversion to another folder")
    report = ConversionReport(output=Path(dst))
    with atomic_output_dir(dst, force) as out:
        writer = mindspore_writer(out, fmt, shard_bytes) if to == "mindspore" else hf_writer(out, shard_bytes)
        for name, array in tqdm(conversion, total=len(conversion.plan), unit="tensor", disable=not progress,
                                desc=f"convert to {to}"):
            writer.add(name, array)
            report.tensors += 1
            report.bytes += array.nbytes
        writer.close()
        report.skipped_training_state = conversion.skipped_training_state
        report.side_files = copy_side_files(conversion.folder, out)
    return report


class ConvertedTensors:
    """The tensors of the TeleChat checkpoint `src` under the names of `to` ("mindspore" or "hf"), cast to `dtype`,
    one at a time, each checked against config.json; iterating to the end also checks that none is missing. The
    converter writes them to disk; the MindSpore backend loads an HF folder through them."""

    def __init__(self, src: str | Path, to: str, dtype: str | None = None):
        if to not in TARGETS[:2]:
            raise TeleChatError(f"unknown target {to!r}; choose one of {', '.join(TARGETS[:2])}")
        if dtype is not None and dtype not in DTYPES:
            raise TeleChatError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.src = Path(src)
        if not self.src.exists():
            raise TeleChatError(f"{self.src}: no such file or folder")
        self.folder = self.src if self.src.is_dir() else self.src.parent
        self.config = TeleChatConfig.from_file(self.folder)
        self.weights = find_weights(self.src)
        names = self.weights.names()
        if self.weights.gptq and names is not None:
            names = float_names(names)
        self.plan = _name_plan(self.config, self.weights.is_mindspore, names, str(self.src), to)
        self.dtype = DTYPES[dtype] if dtype else None
        self.skipped_training_state: list[str] = []

    def __iter__(self):
        seen: set[str] = set()
        for path, name, array in self._source_tensors():
            if name not in self.plan:
                if self.weights.is_mindspore and _TRAINING_STATE.fullmatch(name):
                    self.skipped_training_state.append(name)
                    continue
                raise TeleChatError(f"{path}: unexpected tensor {name} (not part of a TeleChat model with this "
                                    f"config.json)")
            if name in seen:
                raise TeleChatError(f"{path}: tensor {name} appears twice")
            seen.add(name)
            spec, out_name = self.plan[name]
            check_shape(name, array.shape, spec.shape, str(path))
            if array.dtype not in DTYPES.values():
                raise TeleChatError(f"{path}: tensor {name} is {array.dtype}; TeleChat weights are float32, float16 "
                                    f"or bfloat16")
            yield out_name, cast(array, self.dtype)
        check_names(list(seen), list(self.plan), str(self.src))

    def _source_tensors(self):
        """The source's tensors; a GPTQ folder's packed linears dequantized to float (fp16 unless asked)."""
        if not self.weights.gptq:
            yield from self.weights.tensors()
            return
        for path, item, *array in group_packed(self.weights.tensors(), str(self.src)):
            if array:
                yield path, item, array[0]
            else:
                weight = item.dequantize(self.weights.gptq, str(path)).astype(self.dtype or np.float16)
                yield path, f"{item.name}.weight", weight


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
