"""Loading a TeleChat folder into the transformers model with every tensor accounted for.

transformers fills a missing tensor with fresh random values (and a missing int8 scale with ones) and only warns;
here a missing, unexpected or misshapen tensor is an error that names it, as in the MindSpore backend and the
converter."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from pytorch_npu.modeling_telechat import TelechatForCausalLM
from pytorch_npu.quant import Int8Linear
from telechat_ascend.checkpoint import find_weights
from telechat_ascend.config import TeleChatConfig
from telechat_ascend.errors import TeleChatError
from telechat_ascend.weights import LM_HEAD, some_names


def from_pretrained(folder: str | Path, dtype: torch.dtype | str = torch.float32) -> TelechatForCausalLM:
    folder = Path(folder)
    config = TeleChatConfig.from_file(folder)  # a clear error for a folder that is not TeleChat
    names = find_weights(folder).names() or []
    if config.tied and LM_HEAD in names:
        raise TeleChatError(f"{folder}: the weights hold a separate {LM_HEAD}, but config.json ties the head to the "
                            f"embedding (tie_word_embeddings absent or true); set \"tie_word_embeddings\": false")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warnings about these keys become the error below
    try:
        model, info = TelechatForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True,
                                                          local_files_only=True)  # never the Hub
    except RuntimeError as error:  # load_state_dict's "size mismatch for NAME: copying a param with shape ..."
        if "size mismatch" not in str(error):
            raise
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        raise TeleChatError(f"{folder}: tensor(s) of the wrong shape for config.json: {some_names(lines, 3)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = []
    if info["missing_keys"]:
        problems.append(f"missing tensor(s): {some_names(sorted(info['missing_keys']))}")
    if info["unexpected_keys"]:
        problems.append(f"unexpected tensor(s): {some_names(sorted(info['unexpected_keys']))}")
    if problems:
        raise TeleChatError(f"{folder}: {'; '.join(problems)}")
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            module.check_state(name, folder)
    return model
