"""The request contract of Tele-AI's published TeleChat service (`service/telechat_service.py` of Tele-AI/Telechat),
so that its clients can talk to `telechat-ascend serve` unchanged: `POST /telechat/gptDialog/v2` (streamed text)
and `/telechat/gptDialog/v4` (JSON `{"role": "bot", "content": ...}`).

Body: `dialog`, a list of {"role", "content"} with `user` at even and `bot` at odd positions, the last item the
question; optional sampling fields with the service's defaults and open/closed ranges (DEFAULTS, RANGES): integers
must be integers and floats must be floats, as the service checks them. Errors come back with HTTP 200 as
{"seqid", "code", "message", "flag": "0", "data": "执行失败"}, with the service's codes and messages (CODES).

Where the published service would crash or answer a bot message, this one answers 10904 instead: a dialog that is
not a non-empty list of objects with text content, or whose last item is not the user's question.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from telechat_ascend.chat import chat_prompt
from telechat_ascend.engine import SamplingParams
from telechat_ascend.errors import TeleChatError

MISSING_FIELD, BAD_DIALOG, OUT_OF_RANGE, FAILED = 10301, 10904, 10305, 10903
CODES = {MISSING_FIELD: "服务必填参数缺失", BAD_DIALOG: "服务请求参数dialog错误", OUT_OF_RANGE: "请求参数范围错误",
         FAILED: "服务执行失败"}
DEFAULTS = {"do_sample": True, "max_length": 4096, "top_k": 20, "top_p": 0.2, "temperature": 0.1,
            "repetition_penalty": 1.03}
# field: (type, low, high, low included, high included)
RANGES = {"max_length": (int, 0, 4096, False, True), "top_k": (int, 0, 100, False, False),
          "top_p": (float, 0.0, 1.0, False, False), "temperature": (float, 0.0, 1.0, False, False),
          "repetition_penalty": (float, 1.0, 100.0, False, False)}


class DialogRequestError(TeleChatError):
    def __init__(self, code: int, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail

    def body(self) -> dict[str, str]:
        return error_body(self.code)


def error_body(code: int) -> dict[str, str]:
    return {"seqid": "", "code": str(code), "message": CODES[code], "flag": "0", "data": "执行失败"}


@dataclass
class DialogRequest:
    question: str
    history: list[dict[str, str]]  # earlier turns, as render_chat takes them
    settings: dict[str, Any]  # do_sample, max_length, top_k, top_p, temperature, repetition_penalty

    def prompt_and_params(self, tokenizer) -> tuple[list[int], SamplingParams]:
        """The prompt and the engine's settings as the published chat() uses max_length: one budget for the prompt
        and the answer together."""
        s = self.settings
        try:
            prompt = chat_prompt(tokenizer, self.question, self.history, None, s["max_length"], None)
        except TeleChatError as exc:
            raise DialogRequestError(FAILED, f"max_length leaves no room for the prompt: {exc}") from None
        return prompt, SamplingParams(max_tokens=max(s["max_length"] - len(prompt), 1), do_sample=s["do_sample"],
                                      temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                                      repetition_penalty=s["repetition_penalty"])


def parse_dialog_request(body: Any) -> DialogRequest:
    if not isinstance(body, dict) or "dialog" not in body:
        raise DialogRequestError(MISSING_FIELD, "the body needs a 'dialog' field")
    dialog = body["dialog"]
    if not isinstance(dialog, list) or not dialog:
        raise DialogRequestError(BAD_DIALOG, "'dialog' must be a non-empty list of {role, content} objects")
    for index, turn in enumerate(dialog):
        role = "user" if index % 2 == 0 else "bot"
        if not isinstance(turn, dict) or turn.get("role") != role:
            raise DialogRequestError(BAD_DIALOG, f"dialog[{index}] must have role '{role}' (user and bot alternate, "
                                                 f"starting with user)")
        if not isinstance(turn.get("content"), str):
            raise DialogRequestError(BAD_DIALOG, f"dialog[{index}].content must be text")
    if len(dialog) % 2 == 0:
        raise DialogRequestError(BAD_DIALOG, "the last dialog item must be the user's question")
    settings = {}
    for name, default in DEFAULTS.items():
        value = body.get(name)
        settings[name] = default if value is None else _checked(name, value)
    history = [{"role": turn["role"], "content": turn["content"]} for turn in dialog[:-1]]
    return DialogRequest(dialog[-1]["content"], history, settings)


def _checked(name: str, value: Any) -> Any:
    if name == "do_sample":
        if not isinstance(value, bool):
            raise DialogRequestError(OUT_OF_RANGE, f"do_sample must be true or false, got {value!r}")
        return value
    kind, low, high, low_in, high_in = RANGES[name]
    if isinstance(value, bool) or not isinstance(value, kind) or (kind is float and not math.isfinite(value)):
        raise DialogRequestError(OUT_OF_RANGE, f"{name} must be {'an integer' if kind is int else 'a float'}, "
                                               f"got {value!r}")
    above = value >= low if low_in else value > low
    below = value <= high if high_in else value < high
    if not (above and below):
        interval = f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
        raise DialogRequestError(OUT_OF_RANGE, f"{name} must be in {interval}, got {value!r}")
    return value
