"""OpenAI-style request bodies (chat completions, completions) checked and turned into a prompt and the engine's
SamplingParams; every refusal is an ApiError naming the parameter, answered as OpenAI answers:
HTTP 4xx with {"error": {"message", "type", "param", "code"}}.

Defaults come from the model folder's generation_config.json, as vLLM applies them. Roles: system, user,
assistant (TeleChat's bot turn). TeleChat v1 has no system turn: a system message's text goes, as it is, before the
first <_user>, as Tele-AI's later chat template places it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from telechat_ascend.chat import chat_prompt
from telechat_ascend.engine import SamplingParams
from telechat_ascend.errors import TeleChatError

ROLES = {"user": "user", "assistant": "bot", "system": "system"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


@dataclass
class Completion:
    prompt: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default, low: float, high: float = math.inf, low_open: bool = False,
            integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not ((value > low) if low_open else (value >= low)) or value > high:
        bound = f"{'>' if low_open else '>='} {low}" + ("" if high == math.inf else f" and <= {high}")
        raise ApiError(400, f"'{name}' must be {bound}, got {value!r}", name)
    return value


def sampling_params(body: dict, defaults: dict, max_tokens_name: str = "max_tokens") -> SamplingParams:
    """The sampling fields of a request; absent ones take the generation_config.json values (`defaults`)."""
    for name in ("n", "best_of"):
        if body.get(name, 1) != 1:
            raise ApiError(400, f"'{name}' must be 1: this server returns one choice per request", name)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    temperature = _number(body, "temperature", defaults.get("temperature", 1.0), 0, 2)
    sample = defaults.get("do_sample", False) if body.get("temperature") is None else temperature > 0
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    max_tokens = body.get(max_tokens_name, body.get("max_completion_tokens"))
    return SamplingParams(
        max_tokens=_number({max_tokens_name: max_tokens}, max_tokens_name, defaults.get("max_new_tokens", 256), 1,
                           integer=True),
        do_sample=bool(sample), temperature=temperature if temperature > 0 else 1.0,
        top_k=_number(body, "top_k", defaults.get("top_k", 0), 0, integer=True) if body.get("top_k") != -1 else 0,
        top_p=_number(body, "top_p", defaults.get("top_p", 1.0), 0, 1, low_open=True),
        repetition_penalty=_number(body, "repetition_penalty", defaults.get("repetition_penalty", 1.0), 0,
                                   low_open=True),
        stop=tuple(stop), seed=seed)


def chat_turns(messages: Any) -> tuple[str, list[dict[str, str]], str]:
    """(question, history as render_chat takes it, system text) of `messages`; the last must be the user's."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    turns, system = [], []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with role and content", where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        if isinstance(content, list):  # the content-parts form: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{where}.content: only text parts are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be text", f"{where}.content")
        if role == "system":
            system.append(content)
        else:
            turns.append({"role": ROLES[role], "content": content})
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's", "messages")
    return turns[-1]["content"], turns[:-1], "\n".join(system)


def chat_completion(body: Any, tokenizer, defaults: dict, seq_length: int | None) -> Completion:
    """The prompt has the budget of `telechat-ascend chat` (seq_length - max_tokens, less what a system text
    takes)."""
    body = _object(body)
    question, history, system = chat_turns(body.get("messages"))
    params = sampling_params(body, defaults)
    prefix = tokenizer.encode(system) if system else []
    try:
        prompt = chat_prompt(tokenizer, question, history, seq_length, defaults.get("max_length", 8192) - len(prefix),
                             params.max_tokens)
    except TeleChatError as exc:
        raise ApiError(400, f"no room for the prompt: {exc}", "max_tokens") from None
    return Completion(prefix + prompt, params, *_stream_flags(body))


def text_completion(body: Any, tokenizer, defaults: dict) -> Completion:
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        ids = prompt
        if not all(0 <= i < tokenizer.vocab_size for i in ids):
            raise ApiError(400, f"'prompt' holds token ids outside the vocabulary of {tokenizer.vocab_size}", "prompt")
    else:
        raise ApiError(400, "'prompt' must be a string or a list of token ids", "prompt")
    if not ids:
        raise ApiError(400, "'prompt' is empty", "prompt")
    return Completion(ids, sampling_params(body, defaults), *_stream_flags(body))


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    return stream, bool(options.get("include_usage", False))
