"""RoPE cos/sin tables by the published TeleChat rule, in numpy, for backends that build them on the host."""

from __future__ import annotations

import numpy as np

from telechat_ascend.config import TeleChatConfig


def rope_tables(config: TeleChatConfig, position_ids: np.ndarray, total_length: int,
                fp16_tables: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """float32 cos, sin of shape position_ids.shape + (head_dim,), duplicated halves ([θ, θ]) as rotate_half expects.

    The NTK base and mscale come from `total_length` (config.rope_scaling). The frequencies are computed in float32,
    and with fp16_tables the tables are rounded to fp16 and multiplied by mscale into fp16, as the published
    RotaryEmbedding does."""
    base, mscale = config.rope_scaling(total_length)
    dim = config.head_dim
    inv_freq = (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    freqs = np.asarray(position_ids, dtype=np.float32)[..., None] * inv_freq
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)
    if fp16_tables:  # round, scale in float32 (torch's opmath for fp16), round again
        return tuple(
            (np.float32(mscale) * t.astype(np.float16).astype(np.float32)).astype(np.float16).astype(np.float32)
            for t in (cos, sin))
    return np.float32(mscale) * cos, np.float32(mscale) * sin


def position_rope_tables(config: TeleChatConfig, length: int, fp16_tables: bool = True
                         ) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [length, head_dim] where row p is what the published code rotates the token at position p with when
    it decodes that token: the NTK regime of a (p + 1)-token sequence. Rows below training_seqlen share one regime.
    A table for engines that index rotations by position alone (vLLM)."""
    shared = min(length, config.training_seqlen)
    tables = [rope_tables(config, np.arange(shared), shared, fp16_tables)]
    tables += [rope_tables(config, np.array([p]), p + 1, fp16_tables) for p in range(shared, length)]
    return tuple(np.concatenate(parts) for parts in zip(*tables))
