"""TeleChat as a MindSpore Cell, with the MindFormers research/telechat parameter names, so its checkpoints load into
MindFormers and the shared converter maps them 1:1 to HF.

The math is the PyTorch backend's (pytorch_npu/modeling_telechat.py) and the published one: pre-norm blocks with
RMSNorm (fp32 statistics), the per-head interleaved `wk_v` ([K_0; V_0; K_1; V_1; ...] rows), rotate_half RoPE with the
NTK base and mscale, biases on `wo` and `w2` only, SwiGLU, dropout after each residual branch.

Ascend fused ops (rms_norm, rotary_position_embedding, flash_attention_score, incre_flash_attention, swiglu) are
chosen once, from the device target, when the Cell is built: a failed kernel selection on CPU poisons the next op, so
never try/except them. RoPE tables are built on the host (telechat_ascend.rope) and passed in, which keeps the graph
free of Python arithmetic on lengths.

Dropout is keyed where the masks can be (CPU, GPU): each mask element is a hash of (the row's key, the dropout site,
the element's index), and the trainer derives row keys from (seed, step, dataset row). MindSpore's random kernels
keep a state no API saves, so keyed masks are what makes a resumed run equal an uninterrupted one, and what makes the
masks independent of how a global batch is split over workers and accumulation steps. On Ascend the device's
kernels draw them (flash attention draws its own), and without keys so does ops.dropout.

Attention masks come from `segment_ids` [B, T] over all keys (cache included): 0 is padding, and a query sees an
earlier key only within its own segment, so left-padded batches (segments 0/1) and packed training rows (1, 2, 3 ...)
are one mechanism.
"""

from __future__ import annotations

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from telechat_ascend.config import TeleChatConfig
from telechat_ascend.rope import rope_tables

MASKED = -1e9  # added to masked scores; finite, so a row with no visible key (padding) stays NaN-free


def uses_fused_ops() -> bool:
    return ms.get_context("device_target") == "Ascend"


UINT32 = 0xFFFFFFFF


def lowbias32(x):
    """Wellons' lowbias32 integer hash of uint32 values held in int64 (MindSpore has no uint32 arithmetic on CPU and
    no right shift: floor division by 2^k shifts non-negative values)."""
    x = x ^ (x // 2 ** 16)
    x = (x * 0x7FEB352D) & UINT32
    x = x ^ (x // 2 ** 15)
    x = (x * 0x846CA68B) & UINT32
    return x ^ (x // 2 ** 16)


def keyed_dropout(x, p: float, row_keys, site: int):
    """Dropout whose mask is a pure function of the inputs: element i of row b is kept when
    lowbias32((lowbias32(key_b ^ salt) + i) mod 2^32) >= p·2^32, with i the element's flat index within its row and
    salt = (site + 1)·0x9E3779B9 mod 2^32 setting apart the model's dropout sites. Kept values are scaled by
    1/(1-p)."""
    b = x.shape[0]
    per_row = x.size // b
    salt = (site + 1) * 0x9E3779B9 & UINT32
    row_seeds = lowbias32(row_keys.astype(ms.int64) ^ salt).reshape(b, 1)
    bits = lowbias32((ops.arange(0, per_row, dtype=ms.int64).reshape(1, per_row) + row_seeds) & UINT32)
    keep = (bits >= int(p * 2 ** 32)).reshape(x.shape)
    return ops.select(keep, x / (1.0 - p), ops.zeros_like(x))


def dropout(x, p: float, training: bool, row_keys, site: int, device_kernels: bool):
    if not training or p == 0:
        return x
    if device_kernels or row_keys is None:
        return ops.dropout(x, p=p)
    return keyed_dropout(x, p, row_keys, site)


class Linear(nn.Cell):
    """y = x Wᵀ (+ b), W stored [out, in] like torch and MindFormers; computes in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, std: float):
        super().__init__()
        self.weight = Parameter(initializer(Normal(std), (out_features, in_features), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (out_features,), ms.float32), name="bias") if bias else None
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        y = self.matmul(x.reshape(-1, x.shape[-1]), self.weight.astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias.astype(x.dtype)
        return y.reshape(x.shape[:-1] + (-1,))


class RMSNorm(nn.Cell):
    def __init__(self, hidden_size: int, eps: float, fused: bool):
        super().__init__()
        self.weight = Parameter(initializer("ones", (hidden_size,), ms.float32), name="weight")
        self.eps, self.fused = eps, fused

    def construct(self, x):
        if self.fused:
            return ops.rms_norm(x, self.weight.astype(x.dtype), self.eps)[0]
        xf = x.astype(ms.float32)
        normed = xf * ops.rsqrt(ops.mean(ops.square(xf), -1, keep_dims=True) + self.eps)
        return self.weight.astype(x.dtype) * normed.astype(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return ops.concat((-x[..., half:], x[..., :half]), -1)


class Attention(nn.Cell):
    def __init__(self, config: TeleChatConfig, fused: bool, dropout_site: int):
        super().__init__()
        h, std = config.hidden_size, config.initializer_range
        self.n_head, self.n_kv, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.scale = self.head_dim ** -0.5
        self.wq = Linear(h, h, False, std)
        self.wk_v = Linear(h, 2 * self.n_kv * self.head_dim, False, std)
        self.wo = Linear(h, h, True, std)
        self.attention_dropout, self.dropout_site = config.attention_dropout, dropout_site
        self.fused = fused
        self.scores_matmul, self.context_matmul = ops.BatchMatMul(), ops.BatchMatMul()  # primitives: shardable

    def construct(self, x, cos, sin, bias, past_k=None, past_v=None, dropout_keys=None):
        b, s, _ = x.shape
        q = self.wq(x).reshape(b, s, self.n_head, self.head_dim)
        kv = self.wk_v(x).reshape(b, s, self.n_kv, 2 * self.head_dim)  # per KV head: its K, then its V
        k, v = kv[..., :self.head_dim], kv[..., self.head_dim:]
        q, k = self._rotary(q, cos, sin), self._rotary(k, cos, sin)
        if past_k is not None:
            k, v = ops.concat((past_k, k), 1), ops.concat((past_v, v), 1)
        if self.fused:
            context = self._fused_attention(q, k, v, bias)
        else:
            context = self._attention(q, k, v, bias, dropout_keys)
        return self.wo(context), k, v

    def _rotary(self, x, cos, sin):
        if self.fused:
            return ops.rotary_position_embedding(x, cos, sin, 0)  # mode 0 = rotate_half, layout BSND with BS1D tables
        return x * cos + rotate_half(x) * sin

    def _attention(self, q, k, v, bias, dropout_keys):
        groups = self.n_head // self.n_kv
        q = q.transpose(0, 2, 1, 3)
        k = ops.repeat_interleave(k, groups, 2).transpose(0, 2, 3, 1) if groups > 1 else k.transpose(0, 2, 3, 1)
        v = ops.repeat_interleave(v, groups, 2).transpose(0, 2, 1, 3) if groups > 1 else v.transpose(0, 2, 1, 3)
        scores = self.scores_matmul(q, k).astype(ms.float32) * self.scale + bias
        probs = ops.softmax(scores, -1).astype(q.dtype)
        probs = dropout(probs, self.attention_dropout, self.training, dropout_keys, self.dropout_site, False)
        out = self.context_matmul(probs, v).transpose(0, 2, 1, 3)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def _fused_attention(self, q, k, v, bias):
        b, s = q.shape[0], q.shape[1]
        masked = (bias < 0).astype(ms.uint8)  # 1 = discard
        if s == 1 and not self.training:
            out = ops.incre_flash_attention(q.reshape(b, 1, -1), k.reshape(b, k.shape[1], -1),
                                            v.reshape(b, v.shape[1], -1), attn_mask=masked, num_heads=self.n_head,
                                            input_layout="BSH", scale_value=self.scale,
                                            num_key_value_heads=self.n_kv)
        else:
            keep = 1.0 - self.attention_dropout if self.training else 1.0
            out = ops.flash_attention_score(q, k, v, self.n_head, attn_mask=masked, keep_prob=keep,
                                            scalar_value=self.scale, input_layout="BSND", sparse_mode=0)
        return out.reshape(b, s, -1)


class FeedForward(nn.Cell):
    def __init__(self, config: TeleChatConfig, fused: bool):
        super().__init__()
        h, f, std = config.hidden_size, config.ffn_hidden_size, config.initializer_range
        self.w1 = Linear(h, f, False, std)  # gate
        self.w3 = Linear(h, f, False, std)  # up
        self.w2 = Linear(f, h, True, std)  # down
        self.fused = fused

    def construct(self, x):
        if self.fused:
            return self.w2(ops.swiglu(ops.concat((self.w1(x), self.w3(x)), -1), -1))
        return self.w2(ops.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Cell):
    """Dropout sites 3i (attention probabilities), 3i + 1 and 3i + 2 (the two residual branches) for layer i."""

    def __init__(self, config: TeleChatConfig, fused: bool, index: int):
        super().__init__()
        self.hidden_dropout, self.fused, self.dropout_site = config.hidden_dropout, fused, 3 * index
        self.attention_norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon, fused)
        self.attention = Attention(config, fused, self.dropout_site)
        self.ffn_norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon, fused)
        self.feed_forward = FeedForward(config, fused)

    def construct(self, x, cos, sin, bias, past_k=None, past_v=None, dropout_keys=None):
        attention, k, v = self.attention(self.attention_norm(x), cos, sin, bias, past_k, past_v, dropout_keys)
        x = x + dropout(attention, self.hidden_dropout, self.training, dropout_keys, self.dropout_site + 1,
                        self.fused)
        mlp = self.feed_forward(self.ffn_norm(x))
        return x + dropout(mlp, self.hidden_dropout, self.training, dropout_keys, self.dropout_site + 2,
                           self.fused), k, v


class Embedding(nn.Cell):
    def __init__(self, vocab_size: int, hidden_size: int, std: float):
        super().__init__()
        self.embedding_weight = Parameter(initializer(Normal(std), (vocab_size, hidden_size), ms.float32),
                                          name="embedding_weight")
        self.gather = ops.Gather()

    def construct(self, input_ids):
        return self.gather(self.embedding_weight, input_ids, 0)


class TelechatModel(nn.Cell):
    def __init__(self, config: TeleChatConfig, fused: bool):
        super().__init__()
        self.tok_embeddings = Embedding(config.vocab_size, config.hidden_size, config.initializer_range)
        self.layers = nn.CellList([DecoderLayer(config, fused, i) for i in range(config.n_layer)])
        self.norm_out = RMSNorm(config.hidden_size, config.layer_norm_epsilon, fused)


class TelechatForCausalLM(nn.Cell):
    """`construct(input_ids, cos, sin, segment_ids, labels=None, loss_mask=None, dropout_keys=None)`: logits
    [B, S, V], or the mean loss over positions whose label is not -100 (labels aligned with input_ids, shifted inside,
    as in transformers). dropout_keys ([B] int, one per row) key the dropout masks in training.
    `forward` and `decode_step` build cos/sin and segment ids from plain arrays; generation is in generate.py."""

    def __init__(self, config: TeleChatConfig, compute_dtype=ms.float32):
        super().__init__()
        self.config, self.compute_dtype = config, compute_dtype
        fused = uses_fused_ops()
        self.model = TelechatModel(config, fused)
        self.lm_head = None if config.tied else Linear(config.hidden_size, config.vocab_size, False,
                                                       config.initializer_range)
        self.matmul_head = ops.MatMul(transpose_b=True)

    def shard(self, data_parallel: int, model_parallel: int) -> None:
        """Tensor-parallel strategies for MindSpore (semi-)auto parallel, Megatron's layout: wq, wk_v, w1, w3 and the
        head split their output rows (wk_v in whole KV heads, since its rows are grouped per head), wo and w2 their
        input columns, attention runs head-parallel; matmuls are also split over the batch (data_parallel). The
        embedding splits its vocabulary rows like the head (MindFormers' vocab_emb_dp: false), so that a tied
        embedding and head (7B), one parameter, has one layout. Operators without a strategy get theirs by sharding
        propagation (mindspore_impl/train.py). Without a parallel context strategies have no effect."""
        dp, mp = data_parallel, model_parallel
        self.model.tok_embeddings.gather.shard(((mp, 1), (1, 1)))
        for layer in self.model.layers:
            attention, mlp = layer.attention, layer.feed_forward
            for column_parallel in (attention.wq, attention.wk_v, mlp.w1, mlp.w3):
                column_parallel.matmul.shard(((dp, 1), (mp, 1)))
            for row_parallel in (attention.wo, mlp.w2):
                row_parallel.matmul.shard(((dp, mp), (1, mp)))
            attention.scores_matmul.shard(((dp, mp, 1, 1), (dp, mp, 1, 1)))
            attention.context_matmul.shard(((dp, mp, 1, 1), (dp, mp, 1, 1)))
        self.matmul_head.shard(((dp, 1), (mp, 1)))

    def construct(self, input_ids, cos, sin, segment_ids, labels=None, loss_mask=None, dropout_keys=None):
        x = self.model.tok_embeddings(input_ids).astype(self.compute_dtype)
        bias = self._attention_bias(segment_ids, input_ids.shape[1])
        cos, sin = cos.astype(self.compute_dtype), sin.astype(self.compute_dtype)
        for layer in self.model.layers:
            x, _, _ = layer(x, cos, sin, bias, None, None, dropout_keys)
        logits = self._logits(self.model.norm_out(x))
        if labels is None:
            return logits
        return self._loss(logits, labels, loss_mask)

    def decode(self, input_ids, cos, sin, segment_ids, past):
        """One step with a cache: past is a list of (k, v) per layer ([B, P, N, D], BSND); returns logits, past."""
        x = self.model.tok_embeddings(input_ids).astype(self.compute_dtype)
        bias = self._attention_bias(segment_ids, input_ids.shape[1])
        cos, sin = cos.astype(self.compute_dtype), sin.astype(self.compute_dtype)
        present = []
        for layer, (past_k, past_v) in zip(self.model.layers, past):
            x, k, v = layer(x, cos, sin, bias, past_k, past_v)
            present.append((k, v))
        return self._logits(self.model.norm_out(x)), present

    def _attention_bias(self, segment_ids, length):
        """[B, 1, S, T] additive bias: 0 where a query may see a key (same segment, not later, not padding)."""
        total = segment_ids.shape[1]
        query_index = ops.arange(total - length, total).reshape(length, 1)
        key_index = ops.arange(0, total).reshape(1, total)
        causal = (key_index <= query_index).reshape(1, length, total)
        query_segments = segment_ids[:, total - length:].reshape(-1, length, 1)
        key_segments = segment_ids.reshape(-1, 1, total)
        visible = ops.logical_and(ops.logical_and(causal, query_segments == key_segments), key_segments > 0)
        return ops.select(visible, ops.zeros_like(visible, dtype=ms.float32),
                          ops.full_like(visible, MASKED, dtype=ms.float32)).reshape(-1, 1, length, total)

    def _logits(self, hidden):
        b, s, h = hidden.shape
        head = self.model.tok_embeddings.embedding_weight if self.lm_head is None else self.lm_head.weight
        logits = self.matmul_head(hidden.reshape(b * s, h), head.astype(hidden.dtype))
        return logits.reshape(b, s, -1).astype(ms.float32)

    def _loss(self, logits, labels, loss_mask):
        targets = labels[:, 1:]
        if loss_mask is not None:
            targets = ops.select(loss_mask[:, 1:] > 0, targets, ops.full_like(targets, -100))
        logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        targets = targets.reshape(-1)
        weights = (targets != -100).astype(ms.float32)
        log_probs = ops.log_softmax(logits, -1)
        picked = ops.gather_elements(log_probs, 1, ops.maximum(targets, 0).reshape(-1, 1)).reshape(-1)
        return -(picked * weights).sum() / ops.maximum(weights.sum(), 1.0)

    # ---- host-side helpers -------------------------------------------------------------------------------------

    def rope(self, position_ids: np.ndarray, total_length: int) -> tuple[Tensor, Tensor]:
        cos, sin = rope_tables(self.config, position_ids, total_length, self.config.fp16_rope_tables)
        return Tensor(cos[:, :, None, :]), Tensor(sin[:, :, None, :])

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, loss_mask=None):
        """construct() from numpy-like inputs: attention_mask doubles as segment ids (0 = padding)."""
        input_ids = np.asarray(input_ids, dtype=np.int32)
        segments = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
        if position_ids is None:
            position_ids = default_position_ids(segments)
        cos, sin = self.rope(position_ids, input_ids.shape[1])
        optional = [None if a is None else Tensor(np.asarray(a, np.int32)) for a in (labels, loss_mask)]
        return self(Tensor(input_ids), cos, sin, Tensor(segments), *optional)


def default_position_ids(segment_ids: np.ndarray) -> np.ndarray:
    """Positions counting from 0 at each row's first non-padding token (left padding), as generate() numbers them."""
    return np.maximum(np.cumsum(segment_ids != 0, axis=-1) - 1, 0).astype(np.int32)
