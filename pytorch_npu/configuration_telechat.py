"""transformers' view of the shared TeleChatConfig: same fields, same defaults, same validation."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from telechat_ascend.config import TeleChatConfig

# PretrainedConfig owns these (tie_word_embeddings defaults to True there too, which is what ties the 7B head).
_BASE_FIELDS = {"tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "architectures", "model_type",
                "extra"}
_MODEL_FIELDS = {f.name: f.default for f in dataclasses.fields(TeleChatConfig) if f.name not in _BASE_FIELDS}


class TelechatConfig(PretrainedConfig):
    model_type = "telechat"
    attribute_map = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, **kwargs):
        for name, default in _MODEL_FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        kwargs.setdefault("pad_token_id", 3)
        # transformers 4 defaults it to True itself; transformers 5 (vLLM's) leaves it unset.
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
        self.telechat  # validates, naming the field

    @property
    def telechat(self) -> TeleChatConfig:
        """The shared config, for the derived values (head_dim, kv_heads, RoPE base and mscale)."""
        # transformers 5 drops None-valued fields when a config crosses processes (vLLM's workers).
        values = {name: getattr(self, name, default) for name, default in _MODEL_FIELDS.items()}
        return TeleChatConfig.from_dict({**values, "tie_word_embeddings": self.tie_word_embeddings})
