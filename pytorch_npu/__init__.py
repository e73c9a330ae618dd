"""TeleChat on PyTorch: a transformers model with torch-npu fused ops (Atlas 800T A2, Atlas 300I Pro), CUDA and CPU.

Importing the model (`from pytorch_npu import TelechatForCausalLM`, or `import pytorch_npu.modeling_telechat`)
registers model_type "telechat" with transformers' Auto classes, so `AutoModelForCausalLM.from_pretrained(folder)`
loads any TeleChat folder without trust_remote_code. The package itself imports nothing heavy: the
`telechat-ascend` CLI reads pytorch_npu.backend without loading torch.
"""

from telechat_ascend.backends import lazy_exports

# All from modeling_telechat, whose import is what registers the Auto classes.
__all__ = ["TelechatConfig", "TelechatForCausalLM", "TelechatModel"]
__getattr__ = lazy_exports(__name__, dict.fromkeys(__all__, "pytorch_npu.modeling_telechat"))
