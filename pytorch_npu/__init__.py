"""TeleChat on PyTorch: a transformers model with torch-npu fused ops (Atlas 800T A2, Atlas 300I Pro), CUDA and CPU.

Importing the model (`from pytorch_npu import TelechatForCausalLM`, or `import pytorch_npu.modeling_telechat`)
registers model_type "telechat" with transformers' Auto classes, so `AutoModelForCausalLM.from_pretrained(folder)`
loads any TeleChat folder without trust_remote_code. The package itself imports nothing heavy: the
`telechat-ascend` CLI reads pytorch_npu.backend without loading torch.
"""

_LAZY = {"TelechatConfig": "pytorch_npu.configuration_telechat", "TelechatForCausalLM": "pytorch_npu.modeling_telechat",
         "TelechatModel": "pytorch_npu.modeling_telechat"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pytorch_npu' has no attribute {name!r}")
    import importlib
    import pytorch_npu.modeling_telechat  # noqa: F401  (registers with the Auto classes)
    return getattr(importlib.import_module(_LAZY[name]), name)
