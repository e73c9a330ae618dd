"""The serving engine: continuous batching over any backend's BatchRunner.

Requests join and leave the running batch between decode steps. Each engine step
  1. admits the next waiting request when a row is free and no prompt is being prefilled;
  2. prefills one chunk of that prompt (prefill_chunk tokens), so a long prompt is spread over many steps and
     never stalls the others for more than one chunk;
  3. runs one batched decode step for every running request: one forward, one token each.
Every request keeps its own sampling settings and random stream, its own KV cache row and its own stop conditions;
the batch never changes a request's tokens (greedy answers in a batch equal those served one at a time).

The runner holds the running requests' caches in rows 0 .. len(running) - 1: when a request leaves, the last row
moves into its place, so the batch is always the first rows and no step gathers rows.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from telechat_ascend.chat import IncrementalDecoder
from telechat_ascend.errors import TeleChatError
from telechat_ascend.sampling import choose_tokens, process_logits


class BatchRunner(Protocol):
    """What a backend supplies: a model forward over cache rows. Logits are float32 numpy [rows, vocab]."""

    def prefill(self, key: int, ids: list[int], start: int, stop: int) -> np.ndarray | None:
        """Feeds ids[start:stop] of request `key`'s prompt into its own cache (rotated in the regime of the whole
        prompt); returns the next-token logits [vocab] once stop == len(ids)."""

    def admit(self, key: int, row: int) -> None:
        """Moves request `key`'s prefilled cache into batch row `row` (the first free row)."""

    def decode(self, tokens: list[int]) -> np.ndarray:
        """One step for rows 0 .. len(tokens) - 1, token i going to row i: logits [len(tokens), vocab]."""

    def move(self, src: int, dst: int) -> None:
        """Row src's cache becomes row dst's (src is then free)."""

    def release(self, key: int) -> None:
        """Drops request `key`'s prefill cache, if any."""


class QueueFull(TeleChatError):
    pass


@dataclass
class SamplingParams:
    max_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Event:
    text: str  # new text (never splits a UTF-8 character)
    token: int | None  # the token that produced it
    finish_reason: str | None = None  # "stop" (end token or a stop string), "length", "cancelled"


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    key: int = 0
    output: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def __post_init__(self):
        self.cancel_requested = False
        self.decoder: IncrementalDecoder | None = None  # set when the first token comes
        self.listener = None  # called (from the engine's thread) whenever events were queued: an async waker
        self.sent = 0  # characters of `text` already queued as events
        self.events: deque[Event] = deque()
        self.ready = threading.Condition()
        self.prefilled = 0
        self.rng = np.random.default_rng(self.params.seed)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def next_events(self, timeout: float | None = None) -> list[Event]:
        """What the engine produced since the last call (waits up to `timeout` for something)."""
        with self.ready:
            if not self.events and not self.finished and timeout != 0:
                self.ready.wait(timeout)
            events = list(self.events)
            self.events.clear()
        return events


class Engine:
    def __init__(self, runner: BatchRunner, tokenizer, max_batch_size: int = 8, max_queue: int = 64,
                 max_model_len: int = 4096, prefill_chunk: int = 512):
        if min(max_batch_size, max_queue, max_model_len, prefill_chunk) < 1:
            raise TeleChatError("max_batch_size, max_queue, max_model_len and prefill_chunk must be >= 1")
        self.runner, self.tokenizer = runner, tokenizer
        self.stop_ids = {tokenizer.eos_id}
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_model_len, self.prefill_chunk = max_model_len, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.prefilling: Request | None = None
        self.running: list[Request] = []
        self.keys = itertools.count(1)
        self.lock = threading.Lock()  # submit/cancel come from other threads than step
        self.batch_sizes: list[int] = []  # rows of each decode step, for metrics

    # ---- requests ---------------------------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, listener=None) -> Request:
        if not prompt:
            raise TeleChatError("the prompt is empty")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise TeleChatError(f"the prompt has {len(prompt)} tokens and max_tokens is {params.max_tokens}: "
                                f"{len(prompt) + params.max_tokens} is more than the server's max_model_len "
                                f"{self.max_model_len}")
        request = Request(list(prompt), params, key=next(self.keys))
        request.listener = listener
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue {self.max_queue})")
            self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Frees the request's row at the next step (a client that went away)."""
        with self.lock:
            if request in self.waiting:
                self.waiting.remove(request)
                self._finish(request, "cancelled")
            elif not request.finished:
                request.cancel_requested = True

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    # ---- one step ---------------------------------------------------------------------------------------------

    def step(self) -> None:
        with self.lock:
            self._retire_cancelled()
            if self.prefilling is None and self.waiting and len(self.running) < self.max_batch_size:
                self.prefilling = self.waiting.popleft()
        if self.prefilling is not None:
            self._prefill_chunk()
        if self.running:
            self._decode()

    def _prefill_chunk(self) -> None:
        request = self.prefilling
        start = request.prefilled
        stop = min(start + self.prefill_chunk, len(request.prompt))
        logits = self.runner.prefill(request.key, request.prompt, start, stop)
        request.prefilled = stop
        if logits is None:
            return
        self.prefilling = None
        request.decoder = IncrementalDecoder(self.tokenizer, {self.tokenizer.eos_id, self.tokenizer.pad_id})
        self._emit(request, self._choose(request, logits))
        if request.finished:
            self.runner.release(request.key)
            return
        self.runner.admit(request.key, len(self.running))
        self.running.append(request)

    def _decode(self) -> None:
        rows = self.running
        self.batch_sizes.append(len(rows))
        logits = self.runner.decode([request.output[-1] for request in rows])
        for request, row_logits in zip(rows, logits):
            self._emit(request, self._choose(request, row_logits))
        for row in reversed(range(len(rows))):
            if rows[row].finished:
                self._leave(row)

    @staticmethod
    def _choose(request: Request, logits: np.ndarray) -> int:
        """The request's next token from its logits [vocab], under its own settings and random stream."""
        p = request.params
        history = np.array([request.prompt + request.output])
        scores = process_logits(logits[None], history, p.do_sample, p.temperature, p.top_k, p.top_p,
                                p.repetition_penalty)
        return int(choose_tokens(scores, p.do_sample, request.rng)[0])

    def _emit(self, request: Request, token: int) -> None:
        """Appends `token`, decides whether the request ends, and queues the text that is certain: a stop string
        is cut off with whatever follows it, so the last len(longest stop) - 1 characters wait until they cannot be
        the start of one."""
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.output.append(token)
        decoder = request.decoder
        finish = None
        if token in self.stop_ids:
            request.text += decoder.flush()
            finish = "stop"
        else:
            request.text += decoder.add([token])
            if len(request.output) >= request.params.max_tokens:
                request.text += decoder.flush()
                finish = "length"
        stops = [stop for stop in request.params.stop if stop]
        for stop in stops:
            cut = request.text.find(stop, max(0, request.sent - len(stop) + 1))
            if cut >= 0:
                request.text, finish = request.text[:cut], "stop"
                break
        if request.cancel_requested:
            finish = "cancelled"
        hold = 0 if finish else max(map(len, stops), default=1) - 1
        certain = max(request.sent, len(request.text) - hold)
        text, request.sent = request.text[request.sent:certain], certain
        with request.ready:
            request.events.append(Event(text, token))
            request.ready.notify_all()
        if finish:
            self._finish(request, finish)
        elif request.listener:
            request.listener()

    def _finish(self, request: Request, reason: str) -> None:
        with request.ready:
            request.finish_reason = reason
            if request.events:
                request.events[-1].finish_reason = reason
            else:
                request.events.append(Event("", None, reason))
            request.ready.notify_all()
        if request.listener:
            request.listener()

    def _leave(self, row: int) -> None:
        last = len(self.running) - 1
        if row != last:
            self.runner.move(last, row)
            self.running[row] = self.running[last]
        self.running.pop()

    def _retire_cancelled(self) -> None:
        for row in reversed(range(len(self.running))):
            request = self.running[row]
            if request.cancel_requested:
                self._finish(request, "cancelled")
                self._leave(row)
        if self.prefilling is not None and self.prefilling.cancel_requested:
            self.runner.release(self.prefilling.key)
            self._finish(self.prefilling, "cancelled")
            self.prefilling = None

    # ---- running in a thread ------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, idle_wait: float = 0.005) -> None:
        """Steps while there is work, until `stop` is set."""
        while not stop.is_set():
            if self.busy:
                self.step()
            else:
                stop.wait(idle_wait)

    def generate(self, prompt: list[int], params: SamplingParams) -> Request:
        """Serves one request to the end on this thread (no server): tests and one-off calls."""
        request = self.submit(prompt, params)
        while not request.finished:
            self.step()
        return request
