"""Loading and saving the MindSpore model: a MindSpore checkpoint from the shared converter, or an HF folder
converted in memory one tensor at a time (the same name table and checks as `telechat-ascend convert`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor

from mindspore_impl.model import TelechatForCausalLM
from telechat_ascend.checkpoint import MS_CKPT, atomic_output_dir, copy_side_files
from telechat_ascend.convert import ConvertedTensors
from telechat_ascend.errors import TeleChatError
from telechat_ascend.mindspore_ckpt import CkptWriter

COMPUTE_DTYPES = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}


def from_pretrained(path: str | Path, dtype: str = "fp32", rope_fp16_tables: bool | None = None) -> TelechatForCausalLM:
    """A TeleChat model folder (MindSpore or HF, any published layout) as a MindSpore model computing in `dtype`.
    Parameters stay float32 (master weights); fp16/bf16 apply to activations and matmuls."""
    if dtype not in COMPUTE_DTYPES:
        raise TeleChatError(f"unknown dtype {dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
    tensors = ConvertedTensors(path, to="mindspore", dtype="fp32")
    config = tensors.config
    if rope_fp16_tables is not None:
        config = dataclasses.replace(config, rope_fp16_tables=rope_fp16_tables)
    model = TelechatForCausalLM(config, COMPUTE_DTYPES[dtype])
    parameters = {name: Parameter(Tensor(np.ascontiguousarray(array)), name=name) for name, array in tensors}
    not_loaded, unused = ms.load_param_into_net(model, parameters, strict_load=True)
    if not_loaded or unused:  # the converter already checked the names against config.json, so this is a bug
        raise TeleChatError(f"{path}: parameters not loaded: {not_loaded}; unused: {unused}")
    model.source_folder = tensors.folder
    return model


def save_pretrained(model: TelechatForCausalLM, folder: str | Path, force: bool = False) -> Path:
    """A MindSpore checkpoint folder: mindspore_model.ckpt (MindFormers names) and config.json, plus the tokenizer
    and generation_config.json of the folder the model was loaded from."""
    with atomic_output_dir(folder, force) as out:
        writer = CkptWriter(out / MS_CKPT)
        for parameter in model.get_parameters():
            writer.add(parameter.name, parameter.asnumpy())
        writer.close()
        source = getattr(model, "source_folder", None)
        if source is not None:
            copy_side_files(source, out)
        config = model.config.to_dict()
        (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(folder)
