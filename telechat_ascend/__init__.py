"""Shared core of telechat-ascend: config, checkpoints and converters, tokenizer. Imports neither torch nor
mindspore; each backend (`pytorch_npu`, `mindspore_impl`) is optional."""

from telechat_ascend.config import PRESETS, TeleChatConfig
from telechat_ascend.convert import convert_checkpoint
from telechat_ascend.errors import TeleChatError

__all__ = ["PRESETS", "TeleChatConfig", "TeleChatError", "convert_checkpoint"]
