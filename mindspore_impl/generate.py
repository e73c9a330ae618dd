"""Generation with a KV cache for the MindSpore model: a prefill over the (left-padded) prompts, then one token per
step. Logits are processed on the host exactly as transformers does (repetition penalty over every id of the row,
then temperature, top-k and top-p when sampling), so greedy decoding gives the PyTorch backend's tokens."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from mindspore import Tensor

from mindspore_impl.model import TelechatForCausalLM, default_position_ids
from telechat_ascend.chat import GENERATION_DEFAULTS, IncrementalDecoder, chat_prompt, check_generation, extend_history
from telechat_ascend.errors import TeleChatError
from telechat_ascend.sampling import choose_tokens, process_logits
from telechat_ascend.tokenizer import TeleChatTokenizer


def generate(model: TelechatForCausalLM, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
             pad_id: int, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed: int = 0) -> Iterator[np.ndarray]:
    """Yields the next token of every row ([B] ids) step by step; a finished row (eos seen) yields pad_id."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TeleChatError("generate: every prompt needs at least one token")
    width = max(map(len, prompts))
    rows = np.array([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=np.int32)
    segments = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int32)
    positions = default_position_ids(segments)
    rng = np.random.default_rng(seed)
    model.set_train(False)
    past = [(None, None)] * model.config.n_layer
    step_ids, step_positions = rows, positions
    finished = np.zeros(len(prompts), dtype=bool)
    for _ in range(max_new_tokens):
        cos, sin = model.rope(step_positions, segments.shape[1])
        logits, past = model.decode(Tensor(step_ids), cos, sin, Tensor(segments), past)
        scores = process_logits(logits.asnumpy()[:, -1], rows, do_sample, temperature, top_k, top_p,
                                repetition_penalty)
        tokens = choose_tokens(scores, do_sample, rng)
        tokens = np.where(finished, pad_id, tokens)
        yield tokens
        if eos_id is not None:
            finished |= tokens == eos_id
        if finished.all():
            return
        rows = np.concatenate([rows, tokens[:, None]], axis=1)
        segments = np.concatenate([segments, np.ones((len(prompts), 1), np.int32)], axis=1)
        step_ids, step_positions = tokens[:, None], step_positions[:, -1:] + 1


def chat(model: TelechatForCausalLM, tokenizer: TeleChatTokenizer, question: str, history: list[dict] | None = None,
         generation_config: dict | None = None, stream: bool = False, max_new_tokens: int | None = None, **sampling):
    """(answer, history) as the published chat(); stream=True yields (text so far, history) pairs. Settings come
    from generation_config (the model folder's generation_config.json), overridden by keyword arguments."""
    history = list(history or [])
    settings = check_generation({**GENERATION_DEFAULTS, **(generation_config or {}), **sampling,
                                 "max_new_tokens": max_new_tokens})
    prompt = chat_prompt(tokenizer, question, history, model.config.seq_length, settings["max_length"],
                         max_new_tokens)
    budget = max_new_tokens if max_new_tokens is not None else max(settings["max_length"] - len(prompt), 1)
    steps = generate(model, [prompt], budget, tokenizer.eos_id, tokenizer.pad_id, settings["do_sample"],
                     settings["temperature"], settings["top_k"], settings["top_p"], settings["repetition_penalty"])
    decoder = IncrementalDecoder(tokenizer, {tokenizer.eos_id, tokenizer.pad_id})

    def pieces():
        answer = ""
        for tokens in steps:
            answer += decoder.add([int(tokens[0])])
            yield answer, history
        answer += decoder.flush()
        yield answer, extend_history(history, question, answer)

    if stream:
        return pieces()
    *_, (answer, new_history) = pieces()
    return answer, new_history
