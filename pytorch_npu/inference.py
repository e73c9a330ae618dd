"""Loading a TeleChat folder for inference and the `generate` / `chat` commands of the CLI (--backend torch)."""

from __future__ import annotations

from pathlib import Path

import torch

from pytorch_npu.device import resolve_device, resolve_dtype
from pytorch_npu.pretrained import from_pretrained
from telechat_ascend.chat import chat_session as shared_chat_session
from telechat_ascend.config import TeleChatConfig
from telechat_ascend.tokenizer import TeleChatTokenizer


def load_model(folder: str | Path, device: str = "cpu", dtype: str | None = None):
    """(model, tokenizer) on the resolved device, in the dtype the chip allows (see device.resolve_dtype)."""
    TeleChatConfig.from_file(folder)  # a clear error for a folder that is not TeleChat, before anything else
    tokenizer = TeleChatTokenizer.from_pretrained(folder)
    target = resolve_device(device)
    model = from_pretrained(folder, resolve_dtype(target, dtype)).to(target).eval()
    return model, tokenizer


def generate_text(model, tokenizer: TeleChatTokenizer, prompt: str, **generate_kwargs) -> str:
    """Raw continuation of `prompt` (no chat markers)."""
    ids = torch.tensor([tokenizer.encode(prompt)], device=model.device)
    with torch.no_grad():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=tokenizer.eos_id,
                                pad_token_id=tokenizer.pad_id, **generate_kwargs)
    return tokenizer.decode([i for i in output[0, ids.shape[1]:].tolist() if i != tokenizer.eos_id])


def chat_session(model, tokenizer: TeleChatTokenizer, questions, out=None, **generate_kwargs) -> list[dict]:
    return shared_chat_session(lambda question, history: model.chat(tokenizer, question, history, stream=True,
                                                                   **generate_kwargs), questions, out)
