"""What chat() needs besides a model, shared by both backends: the prompt budget, the history, and text streaming
that never splits a UTF-8 character."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator

from telechat_ascend.errors import TeleChatError
from telechat_ascend.tokenizer import TeleChatTokenizer, render_chat

# What generation uses where neither generation_config.json nor the caller says otherwise (transformers' defaults).
GENERATION_DEFAULTS = {"max_length": 8192, "do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                       "repetition_penalty": 1.0}

REPLACEMENT_CHARACTER = "\ufffd"
# A UTF-8 character is at most 4 bytes and byte-fallback pieces are one byte each: after this many held tokens a
# U+FFFD is real text, not a character still being completed (the published streamer waits 6 steps too).
MAX_HELD_TOKENS = 6


def chat_prompt(tokenizer: TeleChatTokenizer, question: str, history: list[dict], seq_length: int | None,
                max_length: int, max_new_tokens: int | None) -> list[int]:
    """Prompt ids with the published budget: seq_length - max_new_tokens when max_new_tokens is set, else
    max_length (generation_config)."""
    budget = (seq_length or max_length) - max_new_tokens if max_new_tokens else max_length
    return render_chat(tokenizer, question, history, max_length=budget)


def extend_history(history: list[dict], question: str, answer: str) -> list[dict]:
    return list(history) + [{"role": "user", "content": question}, {"role": "bot", "content": answer}]


class IncrementalDecoder:
    """Turns generated ids into text pieces, holding tokens back while their text ends in U+FFFD (a character whose
    bytes have not all arrived)."""

    def __init__(self, tokenizer: TeleChatTokenizer, skip_ids: set[int]):
        self.tokenizer, self.skip_ids = tokenizer, skip_ids
        self.ids: list[int] = []
        self._emitted = 0
        self._held = 0

    def add(self, ids: list[int]) -> str:
        self.ids.extend(i for i in ids if i not in self.skip_ids)
        text = self.tokenizer.decode(self.ids)
        self._held += 1
        if text.endswith(REPLACEMENT_CHARACTER) and self._held < MAX_HELD_TOKENS:
            return ""
        return self._take(text)

    def flush(self) -> str:
        return self._take(self.tokenizer.decode(self.ids))

    def _take(self, text: str) -> str:
        piece = text[self._emitted:]
        self._emitted, self._held = len(text), 0
        return piece


def check_generation(settings: dict) -> dict:
    """`settings` (generation_config.json values and overrides) with each sampling knob checked: a zero or negative
    max_new_tokens, temperature or repetition penalty, or a top_p outside (0, 1], would silently produce nothing or
    garbage. Errors name the setting."""
    def number(name, value, low, high=math.inf, low_open=True, integer=False):
        kind = int if integer else (int, float)
        ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value) and \
            (value > low if low_open else value >= low) and value <= high
        if not ok:
            bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
            raise TeleChatError(f"{name} must be {'an integer' if integer else 'a number'} {bound}, got {value!r}")

    for name, low, high, low_open, integer in (("max_new_tokens", 1, math.inf, False, True),
                                               ("max_length", 1, math.inf, False, True),
                                               ("temperature", 0, math.inf, True, False),
                                               ("top_k", 0, math.inf, False, True),
                                               ("top_p", 0, 1, True, False),
                                               ("repetition_penalty", 0, math.inf, True, False)):
        if settings.get(name) is not None:
            number(name, settings[name], low, high, low_open, integer)
    return settings


def chat_session(stream_answer: Callable[[str, list[dict]], Iterator[tuple[str, list[dict]]]],
                 questions: Iterable[str], out=None) -> list[dict]:
    """Answers each question in turn, streaming the text, keeping the history between turns. `stream_answer`
    (question, history) yields (answer so far, history), the last time with the new history: a backend's chat."""
    out = out or sys.stdout
    history: list[dict] = []
    for question in questions:
        printed = 0
        for answer, history in stream_answer(question, history):
            out.write(answer[printed:])
            out.flush()
            printed = len(answer)
        out.write("\n")
    return history
