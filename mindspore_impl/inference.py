"""The `generate` / `chat` commands of the CLI with --backend mindspore; the same functions as pytorch_npu.inference."""

from __future__ import annotations

import os
from pathlib import Path

import mindspore as ms

from mindspore_impl.generate import chat, generate
from mindspore_impl.pretrained import from_pretrained
from telechat_ascend.chat import GENERATION_DEFAULTS, check_generation
from telechat_ascend.chat import chat_session as shared_chat_session
from telechat_ascend.device import parse_device
from telechat_ascend.errors import TeleChatError
from telechat_ascend.files import read_json_object
from telechat_ascend.tokenizer import TeleChatTokenizer

# --device as the PyTorch backend spells it -> MindSpore device target.
DEVICE_TARGETS = {"cpu": "CPU", "npu": "Ascend", "cuda": "GPU"}


def set_device(device: str) -> str:
    """Sets MindSpore's device target (and device id for npu:N / cuda:N); returns the target."""
    kind, index = parse_device(device, os.environ)
    if kind == "auto":
        kind = "npu" if ms.hal.is_available("Ascend") else "cpu"
    target = DEVICE_TARGETS[kind]
    if target != "CPU" and not ms.hal.is_available(target):
        raise TeleChatError(f"--device {device}: MindSpore cannot reach an {target} device here (its {target} "
                            f"plugin or driver did not load); install MindSpore's {target} build and source the "
                            f"driver's environment (Ascend: CANN's set_env.sh), or use --device cpu")
    if (target, index or 0) != (ms.get_context("device_target"), ms.get_context("device_id")):
        ms.set_device(target, index)  # once per process: the runtime then stays put
    return target


def load_model(folder: str | Path, device: str = "cpu", dtype: str | None = None):
    target = set_device(device)
    dtype = dtype or ("bf16" if target == "Ascend" else "fp32")
    if target == "CPU" and dtype == "bf16":
        raise TeleChatError("MindSpore has no bf16 compute kernels on CPU (matmul, softmax): use --dtype fp32 or fp16")
    tokenizer = TeleChatTokenizer.from_pretrained(folder)
    model = from_pretrained(folder, dtype=dtype)
    model.set_train(False)
    return model, tokenizer


def _generation_settings(model, overrides: dict) -> dict:
    settings = read_json_object(model.source_folder / "generation_config.json", missing_ok=True)
    return check_generation({**GENERATION_DEFAULTS, **settings, **overrides})


def generate_text(model, tokenizer: TeleChatTokenizer, prompt: str, max_new_tokens: int | None = None,
                  **overrides) -> str:
    settings = _generation_settings(model, {**overrides, "max_new_tokens": max_new_tokens})
    ids = tokenizer.encode(prompt)
    budget = max_new_tokens if max_new_tokens is not None else max(settings["max_length"] - len(ids), 1)
    steps = generate(model, [ids], budget, tokenizer.eos_id, tokenizer.pad_id, settings["do_sample"],
                     settings["temperature"], settings["top_k"], settings["top_p"], settings["repetition_penalty"])
    ids = [int(step[0]) for step in steps]
    return tokenizer.decode([i for i in ids if i not in (tokenizer.eos_id, tokenizer.pad_id)])


def chat_session(model, tokenizer: TeleChatTokenizer, questions, out=None, max_new_tokens: int | None = None,
                 **overrides) -> list[dict]:
    settings = _generation_settings(model, overrides)
    return shared_chat_session(lambda question, history: chat(model, tokenizer, question, history, settings,
                                                              stream=True, max_new_tokens=max_new_tokens),
                               questions, out)


def batch_runner(model, rows: int):
    """The serving engine's runner over this model (telechat_ascend.engine.BatchRunner)."""
    from mindspore_impl.serving import MindSporeBatchRunner
    return MindSporeBatchRunner(model, rows)
