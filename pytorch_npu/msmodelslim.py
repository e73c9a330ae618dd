"""msModelSlim folders (MindIE's and vllm-ascend's int8 format, see telechat_ascend.msmodelslim_format) in the
PyTorch backend: loaded onto the int8 layers of pytorch_npu.quant, with nothing dequantized."""

from __future__ import annotations

from pathlib import Path

import torch

from telechat_ascend.msmodelslim_format import read_msmodelslim

from .configuration_telechat import TelechatConfig
from .quant import load_converted, numpy_to_torch


def load_msmodelslim(model_class, folder: str | Path, dtype: torch.dtype | str = torch.float32):
    folder = Path(folder)
    config = TelechatConfig.from_pretrained(folder, local_files_only=True)
    config.quantization, tensors = read_msmodelslim(folder)
    state = {name: numpy_to_torch(array) for name, array in tensors}
    return load_converted(model_class, config, state, dtype, folder)
