"""TeleChat (1B / 7B / 12B / 12B-V2) as a transformers model, with torch-npu fused ops chosen by device (ops.py).

The math is the published TeleChat forward: pre-norm blocks with RMSNorm (fp32 statistics), one fused `key_value`
projection whose rows are interleaved per head ([K_0; V_0; K_1; V_1; ...]), rotate_half RoPE with the NTK-aware base
and mscale, biases on `dense` and `down_proj` only, a SwiGLU MLP, and dropout after each residual branch.

Two deliberate departures, both invisible below 8192 tokens: positions come from `position_ids` (so left-padded
batches and decoding past position 8191 are right, where the published code slices a fixed 8192-row table), and the
NTK regime is chosen from the whole sequence (cache included) rather than from the current call alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from pytorch_npu import ops, quant
from pytorch_npu.chat import chat
from pytorch_npu.configuration_telechat import TelechatConfig
from telechat_ascend.gptq_format import is_gptq_folder
from telechat_ascend.msmodelslim_format import is_msmodelslim_folder


class TelechatRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class TelechatLinear(nn.Linear):
    """nn.Linear whose product runs on the kernel ops.linear picks for the device (the state dict is nn.Linear's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class TelechatRotaryEmbedding(nn.Module):
    """cos/sin [B, S, 1, D] for the given positions, duplicated halves ([θ, θ]) as rotate_half expects.

    The same steps as telechat_ascend.rope (which the MindSpore backend uses), but on the positions' device, so that
    decoding needs no host round trip per token."""

    def __init__(self, config: TelechatConfig):
        super().__init__()
        self.core = config.telechat
        self.fp16_tables = config.telechat.fp16_rope_tables

    def forward(self, position_ids: torch.Tensor, total_length: int | list[int], dtype: torch.dtype):
        """total_length: the sequence length whose NTK regime applies, or one per row (rows of different lengths
        decoded together, as the serving engine does)."""
        if isinstance(total_length, list):  # row by row, each exactly as a batch of one would be rotated
            rows = [self(position_ids[i:i + 1], n, dtype) for i, n in enumerate(total_length)]
            return tuple(torch.cat(tables) for tables in zip(*rows))
        base, mscale = self.core.rope_scaling(total_length)
        dim = self.core.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=position_ids.device).float() / dim))
        freqs = position_ids.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        cos, sin = emb.cos(), emb.sin()
        if self.fp16_tables:
            cos, sin = cos.half(), sin.half()
        return (mscale * cos).to(dtype), (mscale * sin).to(dtype)


class TelechatCacheLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views into buffers with room to spare, so a decoding step writes its
    one position in place instead of copying the whole cache (DynamicLayer's torch.cat moves every cached token per
    step and layer: as much memory traffic as attention itself). The buffers are [B, S, N, D], the layout attention
    reads, shown as DynamicLayer's [B, N, S, D]; they grow GROWTH positions beyond what is needed. Whatever replaces
    `keys` with a new tensor (beam reordering, batch selection) is copied into fresh buffers at the next update; with
    gradients enabled, updates concatenate as DynamicLayer does, since autograd cannot follow in-place writes."""

    GROWTH = 256

    def update(self, key_states, value_states, cache_kwargs=None):
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            return super().update(key_states, value_states, cache_kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states)
            self.key_buffer = self.value_buffer = None
        cached = self.get_seq_length()
        total = cached + key_states.shape[-2]
        if self.key_buffer is None or self.keys._base is not self.key_buffer or total > self.key_buffer.shape[1]:
            self.key_buffer = self._grown(self.keys, key_states, cached, total + self.GROWTH)
            self.value_buffer = self._grown(self.values, value_states, cached, total + self.GROWTH)
        self.key_buffer[:, cached:total] = key_states.transpose(1, 2)
        self.value_buffer[:, cached:total] = value_states.transpose(1, 2)
        self.keys = self.key_buffer[:, :total].transpose(1, 2)
        self.values = self.value_buffer[:, :total].transpose(1, 2)
        return self.keys, self.values

    @staticmethod
    def _grown(held: torch.Tensor, new: torch.Tensor, cached: int, capacity: int) -> torch.Tensor:
        batch, heads, _, dim = new.shape
        buffer = new.new_empty(batch, capacity, heads, dim)
        if cached:
            buffer[:, :cached] = held.transpose(1, 2)
        return buffer


class TelechatCache(DynamicCache):
    """A DynamicCache of TelechatCacheLayers: what forward() starts when asked for a cache and given none."""

    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = TelechatCacheLayer


class TelechatAttention(nn.Module):
    def __init__(self, config: TelechatConfig, layer_idx: int):
        super().__init__()
        core = config.telechat
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = core.n_head, core.kv_heads, core.head_dim
        self.query = TelechatLinear(core.hidden_size, core.hidden_size, bias=False)
        self.key_value = TelechatLinear(core.hidden_size, 2 * self.num_kv_heads * self.head_dim, bias=False)
        self.dense = TelechatLinear(core.hidden_size, core.hidden_size, bias=True)
        self.attention_dropout = core.attention_dropout

    def forward(self, x, cos, sin, mask, cache: Cache | None):
        batch, length, _ = x.shape
        q = self.query(x).view(batch, length, self.num_heads, self.head_dim)
        # Per-head interleaved rows: each KV head's 2·head_dim outputs are its K then its V.
        k, v = self.key_value(x).view(batch, length, self.num_kv_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q, k = ops.rotary(q, cos, sin), ops.rotary(k, cos, sin)
        if cache is not None:  # the cache stores [B, N, S, D]
            k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        dropout = self.attention_dropout if self.training else 0.0
        # Causal over absolute positions: with a cache the new queries come last (bottom-right aligned).
        context = ops.attention(q, k, v, mask, scale=self.head_dim ** -0.5, dropout_p=dropout, causal=True)
        return self.dense(context)


class TelechatMLP(nn.Module):
    def __init__(self, config: TelechatConfig):
        super().__init__()
        self.gate_proj = TelechatLinear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.up_proj = TelechatLinear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.down_proj = TelechatLinear(config.ffn_hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class TelechatBlock(GradientCheckpointingLayer):
    def __init__(self, config: TelechatConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = TelechatRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.self_attention = TelechatAttention(config, layer_idx)
        self.post_attention_layernorm = TelechatRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = TelechatMLP(config)
        self.hidden_dropout = config.hidden_dropout

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self._dropout(self.self_attention(self.input_layernorm(x), cos, sin, mask, cache))
        return x + self._dropout(self.mlp(self.post_attention_layernorm(x)))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        # F.dropout is a Python call even where it drops nothing (inference, p = 0): 24 of them per decoded token.
        return F.dropout(x, self.hidden_dropout, True) if self.training and self.hidden_dropout else x


class TelechatPreTrainedModel(PreTrainedModel):
    config_class = TelechatConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TelechatBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, TelechatRMSNorm):
            module.weight.data.fill_(1.0)


class TelechatModel(TelechatPreTrainedModel):
    def __init__(self, config: TelechatConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(TelechatBlock(config, i) for i in range(config.n_layer))
        self.ln_f = TelechatRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.rotary_emb = TelechatRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.word_embeddings = embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, rope_length: int | None = None, **kwargs) -> BaseModelOutputWithPast:
        """rope_length: the sequence length whose NTK regime (base, mscale) the rotary tables use, when it is longer
        than cache + input; a prompt prefilled in chunks passes its whole length, so that every chunk is rotated as
        one forward over the prompt would rotate it; a list gives each row its own (rows of different lengths).
        attention_mask: [B, total] segment ids (0 = padding), or a bool [B, 1, length, total] mask, True where a
        query must not see a key (the serving engine's rows, whose cached lengths differ)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = TelechatCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        total = past + length
        if attention_mask is None:
            attention_mask = torch.ones(batch, total, dtype=torch.bool, device=x.device)
        if position_ids is None:
            # Left padding: a row's first real token is position 0, as generate() numbers it.
            position_ids = ((attention_mask != 0).long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        cos, sin = self.rotary_emb(position_ids, rope_length if isinstance(rope_length, list)
                                   else max(total, rope_length or 0), x.dtype)
        if attention_mask.shape[-1] != total:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, but cache and input hold "
                             f"{total}")
        mask = attention_mask if attention_mask.dim() == 4 else _segment_mask(attention_mask, length)
        for block in self.h:
            x = block(x, cos, sin, mask, past_key_values if use_cache else None)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(x),
                                       past_key_values=past_key_values if use_cache else None)


def _segment_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor | None:
    """Bool [B, 1, length, total], True where a query must not see a key. attention_mask doubles as segment ids:
    0 is padding, and with packed training rows (1, 2, 3, ...) a query sees only keys of its own sample. None when
    every key is visible (an all-ones mask), so kernels can take their fast path; causality is added by the kernel."""
    if bool((attention_mask == 1).all()):
        return None
    keys = attention_mask[:, None, :]
    queries = attention_mask[:, -length:, None]
    return ((queries != keys) | (keys == 0))[:, None]


class TelechatForCausalLM(TelechatPreTrainedModel, GenerationMixin):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: TelechatConfig):
        super().__init__(config)
        self.transformer = TelechatModel(config)
        self.lm_head = TelechatLinear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "quantization", None):  # an int8 folder written by `telechat-ascend quantize`
            quant.replace_linears(self, config.quantization)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers does, and also GPTQ folders (quantize_config.json: Tele-AI's int8/int4 releases, see
        pytorch_npu.gptq) and msModelSlim folders (quant_model_description.json: MindIE's and vllm-ascend's int8,
        see pytorch_npu.msmodelslim), onto the integer layers of pytorch_npu.quant."""
        folder = Path(pretrained_model_name_or_path)
        if is_gptq_folder(folder):
            from pytorch_npu.gptq import load_gptq as load
        elif is_msmodelslim_folder(folder):
            from pytorch_npu.msmodelslim import load_msmodelslim as load
        else:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = load(cls, folder, kwargs.get("dtype", kwargs.get("torch_dtype", torch.float32)))
        if kwargs.get("output_loading_info"):  # load_gptq accounts for every tensor or raises
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() would start a plain DynamicCache; without one, forward() starts a TelechatCache.
        return False

    def chat(self, tokenizer, question: str, history: list[dict] | None = None, generation_config=None,
             stream: bool = False, **generate_kwargs):
        """(answer, history) as the published chat() returns them; see pytorch_npu.chat."""
        return chat(self, tokenizer, question, history, generation_config, stream, **generate_kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers does, except that generation_config.json is written as it is: the published files set
        temperature, top_k and top_p beside do_sample=false (they apply once sampling is turned on), a mix that
        transformers refuses to save."""
        generation_config, self.generation_config = self.generation_config, GenerationConfig()
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.generation_config = generation_config
        if kwargs.get("is_main_process", True):
            generation_config.to_json_file(Path(save_directory) / "generation_config.json")

    def set_output_embeddings(self, embeddings: nn.Linear) -> None:
        self.lm_head = embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, loss_mask=None, use_cache=None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """`labels` as in transformers (shifted inside, -100 ignored); `loss_mask` (1 = counts) zeroes further
        positions of `labels`, for SFT data that marks answers with a mask rather than with -100."""
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                               rope_length=kwargs.get("rope_length"))
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            if loss_mask is not None:
                labels = labels.masked_fill(~loss_mask.to(torch.bool), -100)
            # Position t predicts token t + 1: shift the labels, not the logits (a slice of the logits would be
            # copied forward and zero-filled backward, each as large as the logits themselves).
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


AutoConfig.register("telechat", TelechatConfig)
AutoModelForCausalLM.register(TelechatConfig, TelechatForCausalLM)
