"""chat() as the published TeleChat model offers it, on transformers' generate(): prompt ids from the shared
render_chat, the answer decoded without its closing <_end>, history returned as a list of role/content dicts."""

from __future__ import annotations

import copy
import queue
import threading
from typing import Iterator

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from telechat_ascend.chat import IncrementalDecoder, chat_prompt, extend_history
from telechat_ascend.tokenizer import TeleChatTokenizer


class TextChunkStreamer(BaseStreamer):
    """Receives generated ids from generate() and yields text pieces that never split a UTF-8 character."""

    def __init__(self, tokenizer: TeleChatTokenizer, skip_ids: set[int]):
        self.decoder = IncrementalDecoder(tokenizer, skip_ids)
        self._pieces: queue.Queue[str | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() passes the prompt first
            self._prompt_seen = True
            return
        self._push(self.decoder.add(value.reshape(-1).tolist()))

    def end(self) -> None:
        self._push(self.decoder.flush())
        self._pieces.put(None)

    def _push(self, piece: str) -> None:
        if piece:
            self._pieces.put(piece)

    def __iter__(self) -> Iterator[str]:
        while (piece := self._pieces.get()) is not None:
            yield piece


def chat(model, tokenizer: TeleChatTokenizer, question: str, history: list[dict] | None = None,
         generation_config: GenerationConfig | None = None, stream: bool = False, **generate_kwargs):
    """(answer, history) like the published chat(); with stream=True, an iterator of (text so far, history) pairs,
    the history gaining the answer once it is complete."""
    history = list(history or [])
    config = copy.deepcopy(generation_config or model.generation_config)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_id
    prompt = chat_prompt(tokenizer, question, history, model.config.seq_length, config.max_length,
                         generate_kwargs.get("max_new_tokens", config.max_new_tokens))
    input_ids = torch.tensor([prompt], device=model.device)
    settings = dict(generation_config=config, eos_token_id=tokenizer.eos_id, **generate_kwargs)
    skip_ids = {tokenizer.eos_id, config.pad_token_id}

    if not stream:
        with torch.no_grad():
            output = model.generate(input_ids, **settings)
        answer = tokenizer.decode([i for i in output[0, len(prompt):].tolist() if i not in skip_ids])
        return answer, extend_history(history, question, answer)

    streamer = TextChunkStreamer(tokenizer, skip_ids)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(input_ids, streamer=streamer, **settings)
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
        yield answer, extend_history(history, question, answer)

    return pieces()
