"""What chat() needs besides a model, shared by both backends: the prompt budget, the history, and text streaming
that never splits a UTF-8 character."""

from __future__ import annotations

from telechat_ascend.tokenizer import TeleChatTokenizer, render_chat

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
