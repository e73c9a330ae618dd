"""transformers' view of the shared TeleChatConfig: same fields, same defaults, same validation."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from telechat_ascend.config import TeleChatConfig
from telechat_ascend.errors import TeleChatError

# PretrainedConfig owns these (tie_word_embeddings defaults to True there too, which is what ties the 7B head).
_BASE_FIELDS = {"tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "architectures", "model_type",
                "extra"}
_MODEL_FIELDS = {f.name: f.default for f in dataclasses.fields(TeleChatConfig) if f.name not in _BASE_FIELDS}


class TelechatConfig(PretrainedConfig):
    model_type = "telechat"
    attribute_map = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, rope_fp16_tables: bool = True, **kwargs):
        for name, default in _MODEL_FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        # The published RotaryEmbedding rounds its cos/sin tables to fp16 whatever the model dtype; keeping that
        # (the default) is what makes fp32 logits agree with it to 1e-5. False keeps the tables in fp32.
        self.rope_fp16_tables = rope_fp16_tables
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        kwargs.setdefault("pad_token_id", 3)
        super().__init__(**kwargs)
        core = self.telechat  # validates, naming the field
        if core.apply_residual_connection_post_layernorm or core.embed_layernorm:
            raise TeleChatError("config fields 'apply_residual_connection_post_layernorm' and 'embed_layernorm' must be "
                                "false: no TeleChat release uses them and this backend does not implement them")

    @property
    def telechat(self) -> TeleChatConfig:
        """The shared config, for the derived values (head_dim, kv_heads, RoPE base and mscale)."""
        values = {name: getattr(self, name) for name in _MODEL_FIELDS}
        return TeleChatConfig.from_dict({**values, "tie_word_embeddings": self.tie_word_embeddings})
