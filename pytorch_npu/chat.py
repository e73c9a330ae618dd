"""chat() as the published TeleChat model offers it, on transformers' generate(): prompt ids from the shared
render_chat, answer decoded without its closing <_end>, history returned as a list of role/content dicts."""

from __future__ import annotations

import copy
import threading
from typing import Iterator

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from telechat_ascend.tokenizer import TeleChatTokenizer, render_chat

REPLACEMENT_CHARACTER = "\ufffd"
# A UTF-8 character is at most 4 bytes, and byte-fallback pieces are one byte each; after this many held tokens the
# U+FFFD is real text, not a character still being completed.
MAX_HELD_TOKENS = 6


class TextChunkStreamer(BaseStreamer):
    """Receives generated ids from generate() and yields text pieces that never split a UTF-8 character: tokens are
    held back while their decoded text ends in U+FFFD (an incomplete byte sequence), as the published streamer does."""

    def __init__(self, tokenizer: TeleChatTokenizer, stop_ids: set[int]):
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self._ids: list[int] = []
        self._emitted = 0  # characters of decode(self._ids) already yielded
        self._held = 0
        self._queue: list[str | None] = []
        self._prompt_seen = False
        self._ready = threading.Condition()

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt
            self._prompt_seen = True
            return
        ids = [i for i in value.reshape(-1).tolist() if i not in self.stop_ids]
        self._ids.extend(ids)
        text = self.tokenizer.decode(self._ids)
        self._held += 1
        if text.endswith(REPLACEMENT_CHARACTER) and self._held < MAX_HELD_TOKENS:
            return
        self._push(text[self._emitted:])
        self._emitted, self._held = len(text), 0

    def end(self) -> None:
        text = self.tokenizer.decode(self._ids)
        self._push(text[self._emitted:])
        self._push(None)

    def _push(self, piece: str | None) -> None:
        if piece == "":
            return
        with self._ready:
            self._queue.append(piece)
            self._ready.notify()

    def __iter__(self) -> Iterator[str]:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._queue)
                piece = self._queue.pop(0)
            if piece is None:
                return
            yield piece


def chat_generation_config(model, generation_config: GenerationConfig | None) -> GenerationConfig:
    config = copy.deepcopy(generation_config or model.generation_config)
    config.pad_token_id = getattr(config, "pad_token_id", None) or model.config.pad_token_id
    return config


def chat(model, tokenizer: TeleChatTokenizer, question: str, history: list[dict] | None = None,
         generation_config: GenerationConfig | None = None, stream: bool = False, **generate_kwargs):
    """(answer, history) like the published chat(); with stream=True, an iterator of (text so far, history) pairs,
    the history gaining the answer once it is complete."""
    history = list(history or [])
    config = chat_generation_config(model, generation_config)
    max_new_tokens = generate_kwargs.get("max_new_tokens", config.max_new_tokens)
    seq_length = model.config.seq_length or config.max_length
    budget = seq_length - max_new_tokens if max_new_tokens else config.max_length
    prompt = render_chat(tokenizer, question, history, max_length=budget)
    input_ids = torch.tensor([prompt], device=model.device)
    stop_ids = {tokenizer.eos_id}

    def finished(answer: str) -> list[dict]:
        return history + [{"role": "user", "content": question}, {"role": "bot", "content": answer}]

    if not stream:
        with torch.no_grad():
            output = model.generate(input_ids, generation_config=config, eos_token_id=tokenizer.eos_id,
                                    **generate_kwargs)
        answer_ids = [i for i in output[0, len(prompt):].tolist() if i not in stop_ids and i != config.pad_token_id]
        answer = tokenizer.decode(answer_ids)
        return answer, finished(answer)

    streamer = TextChunkStreamer(tokenizer, stop_ids | {config.pad_token_id})

    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(input_ids, generation_config=config, eos_token_id=tokenizer.eos_id, streamer=streamer,
                               **generate_kwargs)
        except BaseException as error:  # re-raised in the caller's thread below
            failure.append(error)
            streamer.end()

    def pieces():
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        answer = ""
        for piece in streamer:
            answer += piece
            yield answer, history
        worker.join()
        if failure:
            raise failure[0]
        yield answer, finished(answer)

    return pieces()
