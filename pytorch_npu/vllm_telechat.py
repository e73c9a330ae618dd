"""TeleChat v1 (1B / 7B / 12B / 12B-V2) as a vLLM model, on vLLM's own layers: parallel linears (tensor parallelism
and vLLM's quantization methods), paged Attention, RMSNorm, RotaryEmbedding and the parallel vocabulary layers.

The math is the published forward, as in modeling_telechat.py: pre-norm blocks, the per-head interleaved
`key_value` projection ([K_0; V_0; K_1; V_1; ...] rows, so tensor parallelism splits it by whole heads and it loads
unchanged, packed GPTQ tensors included), biases on `dense` and `down_proj` only, SwiGLU, tied head for the 7B.

RoPE: row p of the cos/sin table is the rotation the published code gives the token at position p when it is
decoded, under the NTK regime (base, mscale) of a (p + 1)-token sequence, with its fp16-rounded tables. Up to the
training length that regime is the same for every row, so prompts and decoding there are exactly the published
ones (the 7B's base_seqlen 4096 quirk included: base ~30527.7). Beyond it the published code rotates a whole prompt
under the regime of the prompt's length; a table indexed by position cannot, because vLLM batches sequences of
every length in one step and chunks and caches prefixes. Rotating each token by its own position keeps decoding
exact and makes a token's rotation independent of batching, chunking and prefix caching; only prompt tokens past
the training length are rotated differently (the README gives the measured difference).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from telechat_ascend.config import HF_KEY_PREFIX, TeleChatConfig
from telechat_ascend.errors import TeleChatError
from telechat_ascend.rope import position_rope_tables
from telechat_ascend.weights import is_lm_head

# Checkpoint name -> (our parameter, shard) for the two MLP inputs vLLM runs as one GEMM.
STACKED = {".mlp.gate_proj.": (".mlp.gate_up_proj.", 0), ".mlp.up_proj.": (".mlp.gate_up_proj.", 1)}


class TelechatRotaryEmbedding(RotaryEmbedding):
    """vLLM's RotaryEmbedding (and its fused kernels) over TeleChat's table: see the module docstring."""

    def __init__(self, core: TeleChatConfig, max_positions: int, dtype: torch.dtype):
        self.core = core
        super().__init__(core.head_dim, core.head_dim, max_positions, base=core.rope_scaling(1)[0],
                         is_neox_style=True, dtype=dtype)

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        cos, sin = position_rope_tables(self.core, self.max_position_embeddings, self.core.fp16_rope_tables)
        half = self.head_size // 2  # vLLM keeps one half of each: [cos(θ) | sin(θ)]
        return torch.from_numpy(np.concatenate([cos[:, :half], sin[:, :half]], axis=-1))


class TelechatAttention(nn.Module):
    def __init__(self, vllm_config: VllmConfig, core: TeleChatConfig, rotary: TelechatRotaryEmbedding, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        if core.n_head % tp or core.kv_heads % tp:
            raise TeleChatError(f"tensor parallel size {tp} must divide n_head ({core.n_head}) and the number of "
                                f"KV heads ({core.kv_heads})")
        quant = vllm_config.quant_config
        self.heads, self.kv_heads, self.head_dim = core.n_head // tp, core.kv_heads // tp, core.head_dim
        self.query = ColumnParallelLinear(core.hidden_size, core.hidden_size, bias=False, quant_config=quant,
                                          prefix=f"{prefix}.query")
        self.key_value = ColumnParallelLinear(core.hidden_size, 2 * core.kv_heads * core.head_dim, bias=False,
                                              quant_config=quant, prefix=f"{prefix}.key_value")
        self.dense = RowParallelLinear(core.hidden_size, core.hidden_size, bias=True, quant_config=quant,
                                       prefix=f"{prefix}.dense")
        self.rotary_emb = rotary
        self.attn = Attention(self.heads, self.head_dim, self.head_dim ** -0.5, num_kv_heads=self.kv_heads,
                              cache_config=vllm_config.cache_config, quant_config=quant, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, _ = self.query(x)
        kv, _ = self.key_value(x)
        kv = kv.view(-1, self.kv_heads, 2, self.head_dim)  # each head's K rows, then its V rows
        k = kv[:, :, 0].reshape(-1, self.kv_heads * self.head_dim)
        v = kv[:, :, 1].reshape(-1, self.kv_heads * self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.dense(self.attn(q, k, v))
        return out


class TelechatMLP(nn.Module):
    def __init__(self, vllm_config: VllmConfig, core: TeleChatConfig, prefix: str):
        super().__init__()
        quant = vllm_config.quant_config
        self.gate_up_proj = MergedColumnParallelLinear(core.hidden_size, [core.ffn_hidden_size] * 2, bias=False,
                                                       quant_config=quant, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(core.ffn_hidden_size, core.hidden_size, bias=True, quant_config=quant,
                                           prefix=f"{prefix}.down_proj")
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act(gate_up))
        return out


class TelechatBlock(nn.Module):
    def __init__(self, vllm_config: VllmConfig, core: TeleChatConfig, rotary: TelechatRotaryEmbedding, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(core.hidden_size, eps=core.layer_norm_epsilon)
        self.self_attention = TelechatAttention(vllm_config, core, rotary, f"{prefix}.self_attention")
        self.post_attention_layernorm = RMSNorm(core.hidden_size, eps=core.layer_norm_epsilon)
        self.mlp = TelechatMLP(vllm_config, core, f"{prefix}.mlp")

    def forward(self, positions, x, residual):
        """The residual stream travels beside x so that RMSNorm adds and normalizes in one fused step."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attention(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0})
class TelechatModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        core = vllm_config.model_config.hf_config.telechat
        self.word_embeddings = VocabParallelEmbedding(core.vocab_size, core.hidden_size,
                                                      quant_config=vllm_config.quant_config)
        # One table for all layers (as vLLM's get_rope shares one): it is the same everywhere, and at 12B's 8192
        # positions a copy per layer would cost 38 builds and ~200 MB.
        rotary = TelechatRotaryEmbedding(core, vllm_config.model_config.max_model_len, vllm_config.model_config.dtype)
        self.h = nn.ModuleList(TelechatBlock(vllm_config, core, rotary, f"{prefix}.h.{i}")
                               for i in range(core.n_layer))
        self.ln_f = RMSNorm(core.hidden_size, eps=core.layer_norm_epsilon)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for block in self.h:
            x, residual = block(positions, x, residual)
        x, _ = self.ln_f(x, residual)
        return x


class TelechatForCausalLM(nn.Module):
    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.core = vllm_config.model_config.hf_config.telechat
        self.quant_config = vllm_config.quant_config
        self.transformer = TelechatModel(vllm_config=vllm_config, prefix=_join(prefix, "transformer"))
        self.lm_head = ParallelLMHead(self.core.vocab_size, self.core.hidden_size,
                                      quant_config=vllm_config.quant_config, prefix=_join(prefix, "lm_head"))
        if self.core.tied:
            self.lm_head = self.lm_head.tie_weights(self.transformer.word_embeddings)
        self.logits_processor = LogitsProcessor(self.core.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        return self.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint tensors with or without the `transformer.` prefix (12B / 7B); the tied head (7B) is stored
        once, as the embedding. Anything else is an error naming the tensor; vLLM itself reports what is missing."""
        params = dict(self.named_parameters())
        loaded = set()
        # vLLM's quantization configs name the checkpoint tensors their kernels do not take: GPTQ's g_idx, for one,
        # since desc_act false (the published folders) is all its CPU and Marlin kernels run. A vLLM without the
        # hook gets every tensor, as before it.
        checkpoint_mapper = getattr(self.quant_config, "get_checkpoint_weight_mapper", None)
        if checkpoint_mapper is not None:
            weights = checkpoint_mapper().apply(weights)
        for name, tensor in weights:
            if not (is_lm_head(name) or name.startswith(HF_KEY_PREFIX)):
                name = HF_KEY_PREFIX + name
            if is_lm_head(name) and self.core.tied:
                raise TeleChatError(f"checkpoint holds {name}, but config.json ties the head to the embedding "
                                    f"(tie_word_embeddings is absent or true)")
            shard = None
            for source, (target, index) in STACKED.items():
                if source in name:
                    name, shard = name.replace(source, target), index
            if name not in params:
                raise TeleChatError(f"checkpoint tensor {name} is not part of TeleChat with this config.json")
            param = params[name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(name)
        return loaded


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
