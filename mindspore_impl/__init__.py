"""TeleChat as a MindSpore Cell with Ascend fused ops: model, checkpoint loading, generation (training: msrun).
The package imports MindSpore only when one of these names is used (the CLI reads mindspore_impl.backend alone)."""

from telechat_ascend.backends import lazy_exports

__all__ = ["TelechatForCausalLM", "from_pretrained", "save_pretrained"]
__getattr__ = lazy_exports(__name__, {"TelechatForCausalLM": "mindspore_impl.model",
                                      "from_pretrained": "mindspore_impl.pretrained",
                                      "save_pretrained": "mindspore_impl.pretrained"})
