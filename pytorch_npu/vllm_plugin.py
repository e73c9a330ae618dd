"""The vLLM plugin: in every process vLLM starts (the `vllm.general_plugins` entry point calls `register`), it makes a
published TeleChat v1 folder load as it is, without trust_remote_code:

- config.json's `model_type: telechat` parses with our TelechatConfig (transformers' AutoConfig);
- `TelechatTokenizer`, the class the 1B/12B tokenizer_config.json names, is ours (transformers' AutoTokenizer); the
  7B's BloomTokenizerFast is transformers' own;
- the architecture `TelechatForCausalLM` is our vLLM model (`pytorch_npu.vllm_telechat`, imported lazily);
- chat completions render with the v1 chat template (telechat_ascend/assets/chat_template.jinja).

vLLM runs on transformers 5 while our main environment pins 4.57, so nothing here imports our transformers model:
only the shared core, the config class (plain PretrainedConfig) and vLLM.
"""

from __future__ import annotations

import re
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizer

from pytorch_npu.configuration_telechat import TelechatConfig
from telechat_ascend.tokenizer import TeleChatTokenizer

ARCHITECTURE = "TelechatForCausalLM"  # what every published v1 config.json names
MODEL_CLASS = "pytorch_npu.vllm_telechat:TelechatForCausalLM"
CHAT_TEMPLATE = Path(__file__).parent.parent / "telechat_ascend" / "assets" / "chat_template.jinja"


class VllmTelechatConfig(TelechatConfig):
    """TelechatConfig as vLLM reads it: the length it may serve by default is `seq_length` (12B, 7B) or, where a
    config has none (1B), its `training_seqlen`; the KV head count is explicit (v1 configs leave it out: one per
    query head), since vLLM takes a present None for a value."""

    def __init__(self, **kwargs):
        # Defined so that transformers 5, which replaces the __init__ of config subclasses lacking one, keeps ours.
        super().__init__(**kwargs)
        self.num_key_value_heads = self.telechat.kv_heads
        self.max_position_embeddings = self.seq_length or self.training_seqlen


class TelechatTokenizer(PreTrainedTokenizer):
    """The SentencePiece tokenizer of the 1B and 12B folders for transformers 5, encoding exactly as the project's
    tokenizer (telechat_ascend.tokenizer, the published slow tokenizer's split), except that the chat markers
    `<_user>` and `<_bot>` are split points too: a chat rendered to text by the template then tokenizes segment by
    segment, as the published chat() builds its ids (whole, SentencePiece would put a `▁` before the first marker)."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs):
        self.core = TeleChatTokenizer.from_pretrained(Path(vocab_file).parent)
        self.sp = self.core.backend
        self._markers = {self.sp.id_to_piece(i) for i in (self.core.user_id, self.core.bot_id)}
        self._marker_re = re.compile("(" + "|".join(map(re.escape, self._markers)) + ")")
        self.vocab_file = vocab_file
        for key in ("add_bos_token", "add_eos_token", "sp_model_kwargs", "use_fast"):
            kwargs.pop(key, None)  # the published defaults (false, false, {}) are the only behaviour
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str, **kwargs) -> list[str]:
        pieces = []
        for segment in self._marker_re.split(text):
            if segment in self._markers:
                pieces.append(segment)
            elif segment:
                pieces.extend(self.sp.id_to_piece(i) for i in self.core.encode(segment))
        return pieces

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.core.decode([self.sp.piece_to_id(t) for t in tokens])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        target = Path(save_directory) / f"{filename_prefix + '-' if filename_prefix else ''}tokenizer.model"
        target.write_bytes(self.sp.serialized_model_proto())
        return (str(target),)


def register() -> None:
    """Called by vLLM in each of its processes; idempotent."""
    from vllm import ModelRegistry
    from vllm.transformers_utils.chat_templates.registry import (get_chat_template_fallback_path,
                                                                register_chat_template_fallback_path)

    AutoConfig.register("telechat", VllmTelechatConfig, exist_ok=True)
    AutoTokenizer.register(VllmTelechatConfig, slow_tokenizer_class=TelechatTokenizer, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    if get_chat_template_fallback_path("telechat", "") != CHAT_TEMPLATE:
        register_chat_template_fallback_path("telechat", CHAT_TEMPLATE)
