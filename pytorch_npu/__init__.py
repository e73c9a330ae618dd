"""TeleChat on PyTorch: a transformers model with torch-npu fused ops (Atlas 800T A2, Atlas 300I Pro), CUDA and CPU.

Importing this package registers model_type "telechat" with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(folder)` loads any TeleChat folder without trust_remote_code.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from pytorch_npu.configuration_telechat import TelechatConfig
from pytorch_npu.modeling_telechat import TelechatForCausalLM, TelechatModel

AutoConfig.register("telechat", TelechatConfig)
AutoModelForCausalLM.register(TelechatConfig, TelechatForCausalLM)

__all__ = ["TelechatConfig", "TelechatForCausalLM", "TelechatModel"]
