"""TeleChat as a MindSpore Cell with Ascend fused ops: model, checkpoint loading, generation (training: msrun)."""

from mindspore_impl.model import TelechatForCausalLM
from mindspore_impl.pretrained import from_pretrained, save_pretrained

__all__ = ["TelechatForCausalLM", "from_pretrained", "save_pretrained"]
