"""Next-token choice from logits, as transformers' logits processors and generate() make it: shared by the MindSpore
backend's generation and the serving engine (which serves every backend), in numpy."""

from __future__ import annotations

import numpy as np


def process_logits(logits: np.ndarray, rows: np.ndarray, do_sample: bool, temperature: float, top_k: int,
                   top_p: float, repetition_penalty: float) -> np.ndarray:
    """float32 scores [B, V] after transformers' processors, -inf where a token is filtered out."""
    scores = logits.astype(np.float32).copy()
    if repetition_penalty != 1.0:
        for scores_row, ids in zip(scores, rows):
            seen = scores_row[ids]
            scores_row[ids] = np.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
    if not do_sample:
        return scores
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = np.sort(scores, axis=-1)[:, -min(top_k, scores.shape[-1])][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:  # drop the low tail whose total probability is at most 1 - top_p
        order = np.argsort(scores, axis=-1, kind="stable")
        ascending = np.take_along_axis(scores, order, -1)
        probs = np.exp(ascending - ascending.max(-1, keepdims=True))
        tail = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1) <= 1 - top_p
        tail[:, -1] = False  # keep at least one token
        remove = np.empty_like(tail)
        np.put_along_axis(remove, order, tail, -1)
        scores = np.where(remove, -np.inf, scores)
    return scores


def choose_tokens(scores: np.ndarray, do_sample: bool, rng: np.random.Generator) -> np.ndarray:
    """int32 [B]: the argmax of each row, or a draw from its softmax (scores from process_logits)."""
    if not do_sample:
        return scores.argmax(-1).astype(np.int32)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int32)
