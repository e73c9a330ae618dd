"""TeleChatConfig: one model description for both backends, read from and written to HF `config.json`.

Field names are the HF ones, so a published config.json loads as it is. Fields the published modeling code never
reads (`logn`, `offset_alibi`, `auto_map`, ...) are kept verbatim in `extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from telechat_ascend.errors import TeleChatError
from telechat_ascend.files import read_json_object

HF_KEY_PREFIX = "transformer."


@dataclass
class TeleChatConfig:
    vocab_size: int = 120000
    hidden_size: int = 5120
    n_layer: int = 38
    n_head: int = 32
    ffn_hidden_size: int = 12288
    # Absent from every v1 config (one KV head per query head); TeleChat2-115B sets 8 (GQA).
    num_key_value_heads: int | None = None
    layer_norm_epsilon: float = 1e-5
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    training_seqlen: int = 8192
    # Absent from the 7B and 12B configs: their modeling files hard-code it (see `rope_base_seqlen`).
    base_seqlen: int | None = None
    # Absent from the 7B config, where transformers' PretrainedConfig default (True) ties the head.
    tie_word_embeddings: bool | None = None
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 3
    unk_token_id: int = 0
    apply_residual_connection_post_layernorm: bool = False
    embed_layernorm: bool = False
    flash_attn: bool = True
    use_cache: bool = True
    # Read only by chat() for the prompt budget; absent from the 1B config.
    seq_length: int | None = None
    # Ours, absent from the published configs (None: true). The published RotaryEmbedding rounds its cos/sin tables
    # to fp16 whatever the model dtype; keeping that is what makes fp32 logits agree with it to 1e-5. False keeps
    # the tables in fp32.
    rope_fp16_tables: bool | None = None
    model_type: str = "telechat"
    architectures: list[str] = field(default_factory=lambda: ["TelechatForCausalLM"])
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "n_layer", "n_head", "ffn_hidden_size", "training_seqlen"):
            _check_positive_int(name, getattr(self, name))
        for name in ("num_key_value_heads", "base_seqlen", "seq_length"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.hidden_size % self.n_head:
            raise TeleChatError(
                f"config field 'hidden_size' ({self.hidden_size}) must be divisible by 'n_head' ({self.n_head})")
        if self.head_dim % 2:
            raise TeleChatError(f"config fields 'hidden_size'/'n_head' give an odd head_dim ({self.head_dim}); "
                                "rotary embeddings need an even one")
        if self.n_head % self.kv_heads:
            raise TeleChatError(f"config field 'n_head' ({self.n_head}) must be a multiple of "
                                f"'num_key_value_heads' ({self.kv_heads})")
        for name in ("tie_word_embeddings", "rope_fp16_tables", "apply_residual_connection_post_layernorm",
                     "embed_layernorm", "flash_attn", "use_cache"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TeleChatError(f"config field '{name}' must be true or false, got {value!r}")
        for name in ("apply_residual_connection_post_layernorm", "embed_layernorm"):
            if getattr(self, name):
                raise TeleChatError(f"config field '{name}' is true: no TeleChat release uses it and neither backend "
                                    f"implements it; set it to false")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise TeleChatError(f"config field '{name}' must be a number in [0, 1), got {value!r}")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or not self.layer_norm_epsilon > 0:
            raise TeleChatError(f"config field 'layer_norm_epsilon' must be positive, got {self.layer_norm_epsilon!r}")
        if self.model_type != "telechat":
            raise TeleChatError(f"config field 'model_type' is {self.model_type!r}, not 'telechat'")

    # ---- derived values -------------------------------------------------------------------------------------------

    @property
    def fp16_rope_tables(self) -> bool:
        return self.rope_fp16_tables is not False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.n_head

    @property
    def tied(self) -> bool:
        return True if self.tie_word_embeddings is None else self.tie_word_embeddings

    @property
    def hf_key_prefix(self) -> str:
        """How the published checkpoints name their tensors: 7B (the tied release) unprefixed, the others under
        `transformer.`. Loaders accept both; writers follow the release the config resembles."""
        return "" if self.tied else HF_KEY_PREFIX

    @property
    def rope_base_seqlen(self) -> int:
        """The published 7B modeling file hard-codes 4096 and the 12B one 8192; later configs carry the value."""
        if self.base_seqlen is not None:
            return self.base_seqlen
        return 4096 if self.tied else 8192

    def rope_scaling(self, seq_len: int) -> tuple[float, float]:
        """NTK-aware (base, mscale) for a forward call over `seq_len` positions, by the published rule.

        The effective length never drops below training_seqlen, so the 7B (base_seqlen 4096 < 8192) always runs
        with alpha 3, base ~30527.7, at every length up to 8192.
        """
        effective = max(seq_len, self.training_seqlen)
        context = math.log2(effective / self.rope_base_seqlen) + 1
        alpha = max(2 ** math.ceil(context) - 1, 1)
        base = 10000.0 * alpha ** (self.head_dim / (self.head_dim - 2))
        ratio = effective / self.training_seqlen
        mscale = 1.0 if ratio <= 1 else 0.1 * math.log(ratio) + 1.0
        return base, mscale

    def block_linear_weights(self) -> int:
        """Weights of one block's linear layers (query, key_value, dense, gate, up, down), biases not included."""
        h, f = self.hidden_size, self.ffn_hidden_size
        kv_rows = 2 * self.kv_heads * self.head_dim
        return h * h + kv_rows * h + h * h + 3 * f * h

    def num_parameters(self) -> int:
        h, v = self.hidden_size, self.vocab_size
        block = (self.block_linear_weights()
                 + 2 * h          # input and post-attention norms
                 + 2 * h)         # dense and down_proj biases
        return v * h * (1 if self.tied else 2) + self.n_layer * block + h

    # ---- HF config.json -------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TeleChatConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        model_fields = {k: v for k, v in values.items() if k in known}
        extra = {k: v for k, v in values.items() if k not in known}
        return cls(**model_fields, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        values = {k: v for k, v in values.items() if v is not None}
        return {**values, **self.extra}

    @classmethod
    def from_file(cls, path: str | Path) -> "TeleChatConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        values = read_json_object(path, "config.json")
        try:
            return cls.from_dict(values)
        except TeleChatError as error:
            raise TeleChatError(f"{path}: {error}") from None

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def preset(cls, name: str) -> "TeleChatConfig":
        if name not in PRESETS:
            raise TeleChatError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[name]
        return dataclasses.replace(preset, architectures=list(preset.architectures), extra=dict(preset.extra))

    @classmethod
    def load(cls, preset_or_path: str | Path) -> "TeleChatConfig":
        """A preset name, a config.json, or a model folder holding one."""
        if str(preset_or_path) in PRESETS:
            return cls.preset(str(preset_or_path))
        return cls.from_file(preset_or_path)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TeleChatError(f"config field '{name}' must be a positive integer, got {value!r}")


_12B = TeleChatConfig(vocab_size=120000, hidden_size=5120, n_layer=38, n_head=32, ffn_hidden_size=12288,
                      tie_word_embeddings=False, seq_length=8192)
_TINY = dict(vocab_size=4096, hidden_size=256, n_layer=2, n_head=4, ffn_hidden_size=688, seq_length=1024)

PRESETS: dict[str, TeleChatConfig] = {
    "1B": TeleChatConfig(vocab_size=120000, hidden_size=2048, n_layer=16, n_head=32, ffn_hidden_size=5460,
                         tie_word_embeddings=False, base_seqlen=8192),
    "7B": TeleChatConfig(vocab_size=160256, hidden_size=4096, n_layer=30, n_head=32, ffn_hidden_size=12288,
                         hidden_dropout=0.1, attention_dropout=0.1, seq_length=8192),
    "12B": _12B,
    "12B-V2": _12B,
    # A few million parameters, for tests and the CPU demo; `tiny` follows the 12B conventions (untied head,
    # prefixed keys, base_seqlen 8192) and `tiny-7B` the 7B ones (tied head, unprefixed keys, base_seqlen 4096).
    "tiny": TeleChatConfig(**_TINY, tie_word_embeddings=False),
    "tiny-7B": TeleChatConfig(**_TINY, hidden_dropout=0.1, attention_dropout=0.1),
}

# generation_config.json per preset: the published 7B / 12B / 12B-V2 values; 1B and the tiny presets use the 12B
# SentencePiece id layout (our tiny tokenizer reproduces it).
_12B_GENERATION = dict(max_length=8192, do_sample=False, use_cache=True, temperature=0.3, top_k=5, top_p=0.85,
                       repetition_penalty=1.01, pad_token_id=3, bos_token_id=1, eos_token_id=2,
                       user_token_id=20, bot_token_id=21)
GENERATION_PRESETS: dict[str, dict[str, Any]] = {
    "1B": _12B_GENERATION,
    "7B": {**_12B_GENERATION, "max_length": 4096, "repetition_penalty": 1.03, "bos_token_id": 160132,
           "eos_token_id": 160133, "user_token_id": 160130, "bot_token_id": 160131},
    "12B": _12B_GENERATION,
    "12B-V2": {**_12B_GENERATION, "repetition_penalty": 1.003},
    "tiny": {**_12B_GENERATION, "max_length": 1024},
    "tiny-7B": {**_12B_GENERATION, "max_length": 1024},
}
