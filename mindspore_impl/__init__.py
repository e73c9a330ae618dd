"""TeleChat as a MindSpore Cell with Ascend fused ops: model, checkpoint loading, generation (training: msrun).
The package imports MindSpore only when one of these names is used (the CLI reads mindspore_impl.backend alone)."""

_LAZY = {"TelechatForCausalLM": "mindspore_impl.model", "from_pretrained": "mindspore_impl.pretrained",
         "save_pretrained": "mindspore_impl.pretrained"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mindspore_impl' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
